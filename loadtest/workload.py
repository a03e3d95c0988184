"""What a load test sends: inputs, the request mix, the target check and the gRPC calls.

Inputs are the held-out test verses drawn at random with replacement, so the length mix of
the load is the real one. The calls report what the generator needs to account latency
without coordinated omission: the status code, token counts and the arrival time of each
streamed chunk (the generator measures everything from the *intended* send time).
"""

from __future__ import annotations

import csv
import ipaddress
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

KINDS: tuple[str, ...] = ("translate", "stream", "generate")
Kind = Literal["translate", "stream", "generate"]

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INPUTS = ROOT / "data" / "pairs.test.tsv"
FALLBACK_INPUTS = ROOT / "tests" / "fixtures" / "verses.tsv"
DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class ChannelSecurity:
    """How to reach a server with TLS or bearer auth on (the service's --tls-*, auth)."""

    token: str | None = None
    ca: Path | None = None  # PEM to trust; given, the channel uses TLS
    server_name: str | None = None  # the name the certificate carries, if not the target's
    cert: Path | None = None  # client certificate chain and its key (mutual TLS): imply TLS
    key: Path | None = None


class TargetRefused(ValueError):
    """A non-loopback target without --allow-remote: a load test must not hit a shared host."""


@dataclass(frozen=True)
class WorkItem:
    """One request to send: which RPC and the English text (a verse or a prompt)."""

    kind: Kind
    text: str


@dataclass
class CallOutcome:
    """What one RPC returned; `chunk_times` are perf_counter() arrivals of token chunks."""

    code: str = "OK"
    input_tokens: int = 0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    detail: str = ""
    reason: str = ""  # why the server failed it (QUEUE_FULL, ...), when it said


# Outcomes of a stream that ended with status OK but not with its whole answer: the server
# cut it (finish reason CANCELLED, as at the end of a drain) or it had no finished message.
STREAM_CANCELLED = "STREAM_CANCELLED"
STREAM_UNFINISHED = "STREAM_UNFINISHED"

# The generator calls this for each item; tests pass a fake slow "server" of this shape.
Caller = Callable[[WorkItem], Awaitable[CallOutcome]]


# --- inputs --------------------------------------------------------------------------------


def resolve_inputs(path: Path | None) -> Path:
    """The given file, else data/pairs.test.tsv, else the committed fixture; fail naming all."""
    candidates = [path] if path is not None else [DEFAULT_INPUTS, FALLBACK_INPUTS]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no input verses found (tried {tried}); run `make data` or --inputs")


def load_texts(path: Path) -> list[str]:
    """English texts of a pairs TSV (header with column `en`), or one text per line."""
    with path.open(encoding="utf-8", newline="") as f:
        first = f.readline()
        header = [h.strip() for h in first.rstrip("\r\n").split("\t")]
        if "en" in header:
            # Same dialect as transformer.data.write_pairs (csv, quotes doubled).
            col = header.index("en")
            texts = [r[col].strip() for r in csv.reader(f, delimiter="\t") if len(r) > col]
        else:
            texts = [line.strip() for line in [first, *f]]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"{path}: no non-empty texts")
    return texts


def prompt_of(verse: str) -> str:
    """An LM prompt from a verse: its first half (at least 3 words), so lengths stay real."""
    words = verse.split()
    return " ".join(words[: max(3, len(words) // 2)])


# --- mix -----------------------------------------------------------------------------------


def parse_mix(spec: str) -> dict[str, float]:
    """'translate=0.6,stream=0.2,generate=0.2' -> normalised weights; unknown kinds refused."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in KINDS:
            raise ValueError(f"mix: unknown request kind {name!r}; known: {', '.join(KINDS)}")
        try:
            weight = float(value) if sep else 1.0
        except ValueError as error:
            raise ValueError(f"mix: weight of {name} must be a number, got {value!r}") from error
        if weight < 0 or weight != weight:
            raise ValueError(f"mix: weight of {name} must be >= 0, got {weight}")
        weights[name] = weights.get(name, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix: weights must sum to > 0, got {spec!r}")
    return {k: v / total for k, v in weights.items() if v > 0}


class Workload:
    """Seeded stream of WorkItems: kind by the mix, text drawn from the verses."""

    def __init__(self, texts: Sequence[str], mix: dict[str, float], seed: int = 0) -> None:
        if not texts:
            raise ValueError("workload needs at least one text")
        self.texts = list(texts)
        self.kinds = list(mix)
        self.weights = [mix[k] for k in self.kinds]
        self.rng = random.Random(seed)

    def next(self) -> WorkItem:
        kind: Kind = self.rng.choices(self.kinds, self.weights)[0]  # type: ignore[assignment]
        verse = self.rng.choice(self.texts)
        return WorkItem(kind, prompt_of(verse) if kind == "generate" else verse)

    def take(self, n: int) -> list[WorkItem]:
        return [self.next() for _ in range(n)]


# --- target --------------------------------------------------------------------------------


def split_target(target: str) -> tuple[str, int | None]:
    """Host and port of 'host:port', '[v6]:port', 'dns:///host:port' (no DNS lookup)."""
    rest = target
    for scheme in ("dns:///", "ipv4:", "ipv6:", "dns:"):
        if rest.startswith(scheme):
            rest = rest[len(scheme) :]
            break
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail.lstrip(":")
    elif rest.count(":") > 1:  # bare IPv6 without a port
        host, port = rest, ""
    else:
        host, _, port = rest.partition(":")
    return host, int(port) if port.isdigit() else None


def is_loopback(target: str) -> bool:
    """True for unix sockets, localhost and literal loopback addresses (127/8, ::1)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host, _ = split_target(target)
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name we would have to resolve: not provably local


def check_target(target: str, allow_remote: bool) -> str:
    if not allow_remote and not is_loopback(target):
        raise TargetRefused(
            f"target {target!r} is not a loopback address; pass --allow-remote to load a "
            "remote server on purpose"
        )
    return target


# --- gRPC callers --------------------------------------------------------------------------


class GrpcCaller:
    """Sends WorkItems over one grpc.aio channel; never raises for an RPC error."""

    def __init__(
        self,
        target: str,
        timeout_s: float = 30.0,
        max_new_tokens: int = 0,
        translate_model: str = "",
        generate_model: str = "",
        security: ChannelSecurity | None = None,
    ) -> None:
        import grpc

        from service.client import client_certificate, failure
        from service.gen.inference.v1 import inference_pb2 as pb
        from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

        self._grpc = grpc
        self._failure = failure  # the reason a server sent with a failed call
        self.pb = pb
        security = security or ChannelSecurity()
        # Many concurrent streams share one HTTP/2 connection; raise the stream limit.
        options: list[tuple[str, int | str]] = [("grpc.max_concurrent_streams", 1 << 20)]
        if security.server_name:
            options.append(("grpc.ssl_target_name_override", security.server_name))
        pair = client_certificate(security.cert, security.key)
        if security.ca is not None or pair is not None:
            chain, key = pair or (None, None)
            credentials = grpc.ssl_channel_credentials(
                security.ca.read_bytes() if security.ca is not None else None, key, chain
            )
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {security.token}"),) if security.token else None
        self.translator = pb_grpc.TranslatorStub(self.channel)
        self.generator = pb_grpc.GeneratorStub(self.channel)
        self.timeout_s = timeout_s
        # 0 leaves the field unset: the server's default (an explicit 0 is refused).
        self.options = pb.DecodingOptions(max_new_tokens=max_new_tokens or None)
        self.translate_model = translate_model
        self.generate_model = generate_model

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Until the server's overall health is SERVING (its models loaded and warm), so no
        request of the run meets a loading server; TimeoutError after timeout_s, saying
        what the last check met (a refused connection, a failed TLS handshake, a status)."""
        import asyncio

        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(self.channel)
        serving = health_pb2.HealthCheckResponse.SERVING
        last = ["no answer"]

        async def serving_reached() -> None:
            while True:
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == serving:
                        return
                    last[0] = (
                        f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                    )
                except self._grpc.aio.AioRpcError as error:  # not listening yet, loading, ...
                    last[0] = f"{error.code().name}: {error.details()}"
                await asyncio.sleep(0.2)

        try:
            await asyncio.wait_for(serving_reached(), timeout_s)
        except TimeoutError:
            raise TimeoutError(last[0]) from None

    async def close(self) -> None:
        await self.channel.close()

    def _cut_short(self, last: Any, tokens: int) -> tuple[str, str] | None:
        """The error of a stream that ended OK without its whole answer, None if whole.

        A server that stops (its drain grace spent) ends the streams in flight with what
        they have, status OK and finish reason CANCELLED: counted OK, each would add a
        short latency and a partial answer to a run that lost it.
        """
        if last is None:
            return STREAM_UNFINISHED, f"the stream ended after {tokens} tokens with no last message"
        if last.finish_reason == self.pb.FINISH_REASON_CANCELLED:
            return STREAM_CANCELLED, (
                f"the server ended the stream after {tokens} tokens, before its answer did "
                "(finish reason CANCELLED)"
            )
        return None

    async def __call__(self, item: WorkItem) -> CallOutcome:
        grpc = self._grpc
        out = CallOutcome()
        try:
            if item.kind == "translate":
                response = await self.translator.Translate(
                    self.pb.TranslateRequest(
                        model=self.translate_model, texts=[item.text], options=self.options
                    ),
                    timeout=self.timeout_s,
                    metadata=self.metadata,
                )
                out.input_tokens = response.usage.input_tokens
                out.output_tokens = response.usage.output_tokens
            else:
                if item.kind == "stream":
                    call = self.translator.TranslateStream(
                        self.pb.TranslateStreamRequest(
                            model=self.translate_model, text=item.text, options=self.options
                        ),
                        timeout=self.timeout_s,
                        metadata=self.metadata,
                    )
                else:
                    call = self.generator.Generate(
                        self.pb.GenerateRequest(
                            model=self.generate_model, prompt=item.text, options=self.options
                        ),
                        timeout=self.timeout_s,
                        metadata=self.metadata,
                    )
                counted = 0
                last = None
                async for chunk in call:
                    now = time.perf_counter()
                    n = len(chunk.token_ids)
                    if n:
                        out.chunk_times.append(now)
                        out.chunk_tokens.append(n)
                        counted += n
                    if chunk.finished:
                        last = chunk
                        out.input_tokens = chunk.usage.input_tokens
                        out.output_tokens = chunk.usage.output_tokens or counted
                if not out.output_tokens:
                    out.output_tokens = counted
                cut = self._cut_short(last, counted)
                if cut is not None:
                    out.code, out.detail = cut
        except grpc.aio.AioRpcError as error:
            out.code = error.code().name
            out.detail = (error.details() or "")[:200]
            found = self._failure(error)
            out.reason = found.reason if found is not None else ""
        except Exception as error:  # a client-side failure must not stop the run
            out.code = "CLIENT_ERROR"
            out.detail = f"{type(error).__name__}: {error}"[:200]
        return out
