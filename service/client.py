"""A small Python client for the inference service, and its CLI (`python -m service.client`).

    client = Client("127.0.0.1:50051")
    client.translate(["In the beginning God created the heaven and the earth."])
    for chunk in client.generate("The Lord said", stream=True): print(chunk.text, end="")

CLI: `python -m service.client translate "In the beginning..." --beam-size 4 --n-best 2`,
`generate "The Lord said" --stream`, `models`, `describe en-es`, `reload`,
`--plot-alignment align.png` (translate: the cross-attention as a heatmap). `--target`,
`--token` (bearer auth), `--ca` or `--tls` (TLS), `--cert` and `--key` (a client
certificate, for a server that requires one), `--server-name` and `--timeout` work on every
command; SERVE_TARGET / SERVE_AUTH_TOKEN are read too. The CLI quiets grpc's own log
lines below ERROR unless GRPC_VERBOSITY is set (INFO shows them, e.g. a handshake's).

Every call raises grpc.RpcError with the server's status (INVALID_ARGUMENT names the field
and its limit), and ValueError for a value the wire cannot carry. `failure(error)` reads
what the server attached to a failed call for code to act on (its reason and facts, the
bad field), rather than parsing the message.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # The CLI reports a failed call itself (status, then a hint), but grpc's C core would log
    # its own line about it first (a failed TLS handshake, at INFO). grpc reads the variable
    # once, on import; the user's own value stands, and a library user's process is left alone.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import contextlib
import dataclasses
import importlib.util
import json
import math
import ssl
import struct
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Protocol, overload, runtime_checkable

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from service.domain import REQUEST_ID, bearer_token
from service.gen.inference.v1 import inference_pb2 as pb
from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# DecodingOptions fields that are unsigned on the wire, and their upper bounds.
_UNSIGNED = {
    "max_new_tokens": 2**32 - 1,
    "beam_size": 2**32 - 1,
    "n_best": 2**32 - 1,
    "top_k": 2**32 - 1,
    "seed": 2**64 - 1,
}
# DecodingOptions fields that are 32-bit floats on the wire.
_FLOAT32 = ("length_penalty", "temperature", "top_p")
# The longest deadline a call may ask for: grpc turns a far larger one into an instant
# DEADLINE_EXCEEDED.
MAX_TIMEOUT_S = 7 * 24 * 3600.0
# grpc caps a retry policy's maxAttempts at 5: the first attempt and 4 retries.
MAX_RETRIES = 4
PLOT_FORMATS = (".png", ".svg", ".pdf")
PLOT_NEEDS = (
    "drawing needs matplotlib, which the serving image leaves out: "
    "pip install 'transformer-serving[plot]' (or matplotlib)"
)


def service_config(health_checked: bool = False, retries: int = 0) -> str:
    """The channel's gRPC service config (JSON): round_robin, so that several replicas
    behind one DNS name share the calls, not just the connections; with health_checked,
    client-side health checking (only replicas whose "" health reads SERVING get calls);
    with retries, a retry policy on UNAVAILABLE for every method, throttled: once failed
    attempts outnumber successful ones by about ten, the channel stops retrying until
    successes make up for them, so a backend that is down is not sent `retries` + 1 calls
    for each one, while one draining replica among several is retried around."""
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_checked:
        config["healthCheckConfig"] = {"serviceName": ""}
    if retries:
        config["retryThrottling"] = {"maxTokens": 20, "tokenRatio": 1}
        config["methodConfig"] = [
            {
                "name": [{}],  # every method of every service
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why the server failed a call, beside its status code and message.

    `reason`: QUEUE_FULL, DEADLINE_UNMEETABLE (refused at admission: retry elsewhere or with
    a longer deadline), DEADLINE_EXCEEDED, INVALID_ARGUMENT, ... (service/errors.py lists
    them); `facts`: the model, limits and estimates it concerns, e.g. `admitted` ("false":
    no work was spent on the call); `fields`: for INVALID_ARGUMENT, each bad field and what
    is wrong with it."""

    reason: str
    facts: dict[str, str]
    fields: dict[str, str]


def failure(error: grpc.RpcError) -> Failure | None:
    """The reason and facts the server sent with a failed call (in its google.rpc.Status
    trailer), or None when there are none: the failure was the channel's (the server down,
    a failed handshake, the client's own deadline) or not this server's."""
    if not hasattr(error, "trailing_metadata"):  # not a call's error (grpc raises Calls)
        return None
    try:
        status = rpc_status.from_call(error)
    except (ValueError, DecodeError):  # one that disagrees with the call's, or unreadable
        return None
    if status is None:
        return None
    reason = ""
    facts: dict[str, str] = {}
    fields: dict[str, str] = {}
    for detail in status.details:
        info, bad = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
        if detail.Unpack(info):
            reason, facts = info.reason, dict(info.metadata)
        elif detail.Unpack(bad):
            fields.update((v.field, v.description) for v in bad.field_violations)
    return Failure(reason, facts, fields) if reason else None


@runtime_checkable
class TokenStream(Protocol):
    """A streaming call as grpc returns it: its TokenChunks as decoded, and cancel() to end
    it early (the server stops decoding), which a plain Iterator type would hide."""

    def __iter__(self) -> Iterator[pb.TokenChunk]: ...

    def __next__(self) -> pb.TokenChunk: ...

    def cancel(self) -> bool: ...


class Client:
    """Synchronous client of Translator, Generator and Models (one channel, reusable).

    token: sent as `authorization: Bearer <token>`. ca: PEM file of the CA (or self-signed
    certificate) to trust; given (or tls=True: the system's trusted CAs), the channel uses
    TLS. server_name: the host name the server's certificate must carry when it is not the
    target's (TLS only: ValueError without). cert and key: PEM files of a client certificate
    chain and its unencrypted private key, for a server that requires client certificates
    (mutual TLS); both or neither, and they imply TLS (ClientCertificateError, a ValueError,
    when they are not a matching pair). timeout: seconds per call (the gRPC deadline
    the server decodes within), at most MAX_TIMEOUT_S, None for no deadline. request_id
    (each call): sent as x-request-id, which the server logs; a fresh one when unset, kept
    in last_request_id (per thread: the calling thread's latest call, whatever other threads
    sharing the client call); 1 to 128 of A-Z a-z 0-9 . _ : / + = - (ValueError otherwise:
    the server would log the call under another id). health_checked: for a target of several
    replicas (`dns:///` of a headless Service), call only those whose health reads SERVING,
    so a draining one stops getting calls at once; off by default, as a lone server's own
    refusal (and its reason) then becomes the client's "backend unhealthy", and model
    listing while it loads or drains is refused too. retries: how often grpc retries a call
    refused with UNAVAILABLE (a replica draining, loading, or whose engine failed; a lost
    connection), after 0.1 s, 0.2 s, ... (randomized, at most 1 s) and within the call's
    deadline; over several replicas a retry usually goes to the next one (round_robin). A
    stream is retried only before its first message, so no token comes twice; a request over
    grpc's retry buffer (256 KiB) is never retried; retries stop while failures outnumber
    successes (see service_config). Off by default: every attempt is a call the server
    counts and logs.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        token: str | None = None,
        ca: str | Path | None = None,
        tls: bool = False,
        timeout: float | None = 60.0,
        server_name: str | None = None,
        max_message_bytes: int = 64 << 20,
        health_checked: bool = False,
        retries: int = 0,
        cert: str | Path | None = None,
        key: str | Path | None = None,
    ) -> None:
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:
            raise ValueError(
                f"timeout: must be in (0, {MAX_TIMEOUT_S:g}] seconds, or None for no "
                f"deadline; got {timeout}"
            )
        # An int: grpc refuses a float maxAttempts, and then every call on the channel.
        if not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
            raise ValueError(
                f"retries: must be a whole number in [0, {MAX_RETRIES}] (grpc's cap); got {retries}"
            )
        # Checked before the channel exists, which a refused token would otherwise leak.
        self.token = None if token is None else bearer_token(token)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", service_config(health_checked, retries)),
        ]
        pair = client_certificate(cert, key)
        secure = ca is not None or tls or pair is not None
        if server_name and not secure:
            raise ValueError(
                "server_name: names the certificate's host, so it needs TLS (ca, cert and key, "
                "or tls=True); without it the call would go out in plaintext"
            )
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if secure:
            root = Path(ca).read_bytes() if ca is not None else None
            if root is not None and b"-----BEGIN CERTIFICATE-----" not in root:
                raise ValueError(f"{ca}: not a PEM certificate (-----BEGIN CERTIFICATE-----)")
            chain, private_key = pair or (None, None)
            creds = grpc.ssl_channel_credentials(
                root_certificates=root, private_key=private_key, certificate_chain=chain
            )
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.timeout = timeout
        self.translator = pb_grpc.TranslatorStub(self.channel)
        self.generator = pb_grpc.GeneratorStub(self.channel)
        self.models_stub = pb_grpc.ModelsStub(self.channel)
        # Per thread: a shared attribute named another thread's call as often as not.
        self._request_ids = threading.local()

    @property
    def last_request_id(self) -> str:
        """The x-request-id of the latest call this thread made on this client ("" before
        one): the id the server logged it under, also for an error with no trailer (a
        deadline the client enforced, a lost connection)."""
        request_id: str = getattr(self._request_ids, "value", "")
        return request_id

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (a `with` block does it on leaving)."""
        self.channel.close()

    def _metadata(self, request_id: str | None = None) -> list[tuple[str, str]]:
        if request_id and not REQUEST_ID.fullmatch(request_id):
            raise ValueError(
                f"request_id: {request_id[:40]!r} is not 1 to 128 of A-Z a-z 0-9 . _ : / + = -; "
                "the server would log the call under a fresh id instead"
            )
        self._request_ids.value = request_id = request_id or uuid.uuid4().hex
        metadata = [("x-request-id", request_id)]
        if self.token:
            metadata.append(("authorization", f"Bearer {self.token}"))
        return metadata

    # --- calls ------------------------------------------------------------------------

    def translate(
        self,
        texts: str | Sequence[str],
        model: str = "",
        version: int = 0,
        request_id: str | None = None,
        **options: Any,
    ) -> pb.TranslateResponse:
        """Translate one text or many (one call; the server decodes them concurrently)."""
        request = pb.TranslateRequest(
            model=model,
            version=version,
            texts=[texts] if isinstance(texts, str) else list(texts),
            options=decoding_options(**options),
        )
        response: pb.TranslateResponse = self.translator.Translate(
            request, timeout=self.timeout, metadata=self._metadata(request_id)
        )
        return response

    def translate_stream(
        self,
        text: str,
        model: str = "",
        version: int = 0,
        request_id: str | None = None,
        **options: Any,
    ) -> TokenStream:
        """One translation's TokenChunks as decoded; the last one carries finished, usage,
        score and alignment. Iterating raises grpc.RpcError; `.cancel()` ends the call."""
        request = pb.TranslateStreamRequest(
            model=model, version=version, text=text, options=decoding_options(**options)
        )
        stream: TokenStream = self.translator.TranslateStream(
            request, timeout=self.timeout, metadata=self._metadata(request_id)
        )
        return stream

    @overload
    def generate(
        self,
        prompt: str,
        model: str = ...,
        version: int = ...,
        stream: Literal[False] = ...,
        request_id: str | None = ...,
        **options: Any,
    ) -> pb.GenerateResponse: ...

    @overload
    def generate(
        self,
        prompt: str,
        model: str = ...,
        version: int = ...,
        *,
        stream: Literal[True],
        request_id: str | None = ...,
        **options: Any,
    ) -> TokenStream: ...

    @overload
    def generate(
        self,
        prompt: str,
        model: str = ...,
        version: int = ...,
        stream: bool = ...,
        request_id: str | None = ...,
        **options: Any,
    ) -> pb.GenerateResponse | TokenStream: ...

    def generate(
        self,
        prompt: str,
        model: str = "",
        version: int = 0,
        stream: bool = False,
        request_id: str | None = None,
        **options: Any,
    ) -> pb.GenerateResponse | TokenStream:
        """The continuation of `prompt`: one answer, or (stream=True) TokenChunks as decoded."""
        request = pb.GenerateRequest(
            model=model, version=version, prompt=prompt, options=decoding_options(**options)
        )
        if stream:
            chunks: TokenStream = self.generator.Generate(
                request, timeout=self.timeout, metadata=self._metadata(request_id)
            )
            return chunks
        response: pb.GenerateResponse = self.generator.GenerateUnary(
            request, timeout=self.timeout, metadata=self._metadata(request_id)
        )
        return response

    def list_models(self, request_id: str | None = None) -> list[pb.ModelInfo]:
        """Every loaded version, by name then version: a model has several while a reload
        swaps them, or when the server keeps more than one (ModelInfo.versions lists them)."""
        response = self.models_stub.ListModels(
            pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata(request_id)
        )
        return list(response.models)

    def describe_model(
        self, name: str, version: int = 0, request_id: str | None = None
    ) -> pb.ModelInfo:
        """One model version (0 = latest): languages, limits, dtype, provider."""
        info: pb.ModelInfo = self.models_stub.DescribeModel(
            pb.DescribeModelRequest(name=name, version=version),
            timeout=self.timeout,
            metadata=self._metadata(request_id),
        )
        return info

    def reload(self, request_id: str | None = None) -> pb.ReloadResponse:
        """Load new versions from the server's repository (needs the token when auth is on)."""
        response: pb.ReloadResponse = self.models_stub.Reload(
            pb.ReloadRequest(), timeout=self.timeout, metadata=self._metadata(request_id)
        )
        return response


class ClientCertificateError(ValueError):
    """cert and key that do not make a client certificate (the message says why)."""


def client_certificate(
    cert: str | Path | None, key: str | Path | None
) -> tuple[bytes, bytes] | None:
    """The PEM certificate chain and private key a client presents to a server that
    requires client certificates (mutual TLS), read and matched now: a bad pair would fail
    each call as a connection the server closed, saying nothing of why. None when neither
    is given. Raises ClientCertificateError, and OSError for a file it cannot read."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ClientCertificateError(
            "cert and key go together: give the client certificate chain and its private key, "
            "or neither"
        )
    pair = Path(cert).read_bytes(), Path(key).read_bytes()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Any key size: the server's CA judges the certificate, not Python's security level.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        # password="": an encrypted key is refused, not asked for on the terminal.
        context.load_cert_chain(cert, key, password="")
    except ssl.SSLError as error:
        raise ClientCertificateError(
            f"{cert} and {key}: not a PEM certificate chain and its unencrypted private key "
            f"({error.reason or error})"
        ) from None
    return pair


def decoding_options(
    max_new_tokens: int | None = None,
    beam_size: int | None = None,
    n_best: int | None = None,
    length_penalty: float | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = (),
    return_scores: bool = False,
    return_alignment: bool = False,
) -> pb.DecodingOptions:
    """DecodingOptions from keyword arguments (None leaves an optional field unset; a
    string `stop` is one stop string). Raises ValueError naming the field for a value its
    wire type cannot carry; the server checks the rest against its limits."""
    given = locals()
    for name, bound in _UNSIGNED.items():
        value = given[name]
        if value is not None and not 0 <= value <= bound:
            raise ValueError(f"{name}: must be in [0, {bound}], got {value}")
    for name in _FLOAT32:
        value = given[name]
        if value is not None and math.isfinite(value) and not _fits_float32(value):
            raise ValueError(
                f"{name}: {value} is outside the range of a 32-bit float (the field's wire "
                "type), where it would arrive as 0 or infinity"
            )
    options = pb.DecodingOptions(
        max_new_tokens=max_new_tokens,
        beam_size=beam_size,
        n_best=n_best,
        length_penalty=length_penalty,
        top_p=top_p,
        seed=seed,
        temperature=temperature,
        top_k=top_k,
        stop=[stop] if isinstance(stop, str) else list(stop or ()),
        return_scores=return_scores,
        return_alignment=return_alignment,
    )
    return options


def _fits_float32(value: float) -> bool:
    """Whether a finite value survives as a float32 without becoming 0 or infinity."""
    try:
        stored: float = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return False
    return stored != 0.0 or value == 0.0


def plot_alignment(
    source_tokens: Sequence[str],
    target_tokens: Sequence[str],
    weights: Sequence[Sequence[float]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Draw cross-attention [target × source] as a labelled heatmap (PNG, or the format
    the file name's suffix names). Needs matplotlib (the `plot` extra)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError(PLOT_NEEDS)
    # A Figure of its own, not pyplot's: pyplot is the embedding program's global state
    # (matplotlib.use("Agg") switched away the backend it chose, e.g. Jupyter's inline one,
    # and pyplot's figures are not thread-safe); savefig needs no backend.
    from matplotlib.figure import Figure

    rows = [list(r) for r in weights]
    if not rows or not source_tokens:
        raise ValueError(
            "no alignment to plot: the translation is empty, or the server was not asked "
            "for it (return_alignment)"
        )
    width = max(4.0, 0.45 * len(source_tokens) + 2)
    height = max(3.0, 0.4 * len(target_tokens) + 1.5)
    fig = Figure(figsize=(min(width, 40), min(height, 40)))
    ax = fig.subplots()
    image = ax.imshow(rows, cmap="viridis", aspect="auto", vmin=0.0)
    # parse_math off: a `$` in a text or token is a dollar sign, not mathtext.
    ax.set_xticks(range(len(source_tokens)))
    ax.set_xticklabels(list(source_tokens), rotation=60, ha="right", fontsize=8, parse_math=False)
    ax.set_yticks(range(len(target_tokens)))
    ax.set_yticklabels(list(target_tokens), fontsize=8, parse_math=False)
    ax.set_xlabel("source tokens")
    ax.set_ylabel("target tokens")
    if title:
        ax.set_title(title, fontsize=9, parse_math=False)
    fig.colorbar(image, ax=ax, label="attention")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    return out


# --- CLI ------------------------------------------------------------------------------------

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Client of the inference service. `COMMAND --help` lists a command's options; "
    "SERVE_TARGET and SERVE_AUTH_TOKEN set --target and --token.",
)

Target = Annotated[str, typer.Option(envvar="SERVE_TARGET", help="host:port of the server.")]
Token = Annotated[
    str | None, typer.Option(envvar="SERVE_AUTH_TOKEN", help="Bearer token (if auth is on).")
]
Ca = Annotated[
    Path | None,
    typer.Option(help="CA/certificate PEM to trust; enables TLS.", exists=True, dir_okay=False),
]
Tls = Annotated[
    bool,
    typer.Option(
        "--tls", help="TLS, trusting the system's CAs (--ca or --cert implies TLS).", metavar=""
    ),
]
Cert = Annotated[
    Path | None,
    typer.Option(
        help="Client certificate chain PEM, for a server that requires one (mutual TLS); "
        "needs --key; enables TLS.",
        exists=True,
        dir_okay=False,
    ),
]
Key = Annotated[
    Path | None,
    typer.Option(help="Unencrypted private key PEM of --cert.", exists=True, dir_okay=False),
]
ServerName = Annotated[
    str | None,
    typer.Option(help="TLS: the name the server's certificate must carry (default: target's)."),
]
Timeout = Annotated[float, typer.Option(help="Deadline in seconds.", min=0.001, max=MAX_TIMEOUT_S)]
Retries = Annotated[
    int,
    typer.Option(
        help="Retry a call refused with UNAVAILABLE (draining, loading) up to this often.",
        min=0,
        max=MAX_RETRIES,
    ),
]
Model = Annotated[str, typer.Option(help="Model name (default: the server's for the task).")]
Version = Annotated[
    int, typer.Option(help="Model version (0 = the newest taking calls).", min=0, max=2**64 - 1)
]
MaxNew = Annotated[
    int | None,
    typer.Option(help="Tokens to generate at most (default: the server's).", min=1, max=2**32 - 1),
]
Beam = Annotated[
    int | None, typer.Option(help="Beam width (default 1 = greedy).", min=1, max=2**32 - 1)
]
NBest = Annotated[
    int | None,
    typer.Option(help="Hypotheses to return, ≤ beam size (default 1).", min=1, max=2**32 - 1),
]
Temperature = Annotated[float, typer.Option(help="> 0 samples.")]
TopK = Annotated[
    int, typer.Option(help="Sample among the k most likely (0 = off).", min=0, max=2**32 - 1)
]
TopP = Annotated[float | None, typer.Option(help="Nucleus mass in (0, 1].")]
Seed = Annotated[int | None, typer.Option(help="Sampling seed.", min=0, max=2**64 - 1)]
LengthPenalty = Annotated[float | None, typer.Option(help="Beam length penalty.")]
Stop = Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")]
Scores = Annotated[
    bool,
    typer.Option(
        "--scores",
        help="Print each hypothesis's score and normalized score (--stream: its score).",
        metavar="",
    ),
]
Json = Annotated[
    bool,
    typer.Option(
        "--json",
        help="Print the raw reply as JSON, one object per line (a stream: one per chunk).",
        metavar="",
    ),
]
Stream = Annotated[bool, typer.Option("--stream", help="Print tokens as decoded.", metavar="")]


@contextlib.contextmanager
def _connected(
    target: str,
    token: str | None,
    ca: Path | None,
    timeout: float,
    server_name: str | None,
    tls: bool = False,
    retries: int = 0,
    cert: Path | None = None,
    key: Path | None = None,
) -> Iterator[Client]:
    """A client for one command; a call that fails ends the command with its status."""
    if (cert is None) != (key is None):
        given, missing = ("--cert", "--key") if key is None else ("--key", "--cert")
        raise typer.BadParameter(
            f"needs {missing} too: a client certificate chain and its private key go together",
            param_hint=given,
        )
    secure = tls or ca is not None or cert is not None
    if server_name and not secure:
        raise typer.BadParameter(
            "names the certificate's host, so it needs --ca or --tls (without them the call "
            "would go out in plaintext)",
            param_hint="--server-name",
        )
    _check_texts([target], "--target")
    _check_texts([server_name or ""], "--server-name")
    if not target.strip():
        raise typer.BadParameter(
            "is empty: give the server's host:port, e.g. 127.0.0.1:50051", param_hint="--target"
        )
    try:
        token = None if token is None else bearer_token(token)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--token") from None
    try:
        client = Client(
            target,
            token=token,
            ca=ca,
            tls=secure,
            timeout=timeout,
            server_name=server_name,
            retries=retries,
            cert=cert,
            key=key,
        )
    except ClientCertificateError as error:
        raise typer.BadParameter(str(error), param_hint="--cert / --key") from None
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--ca") from None
    with client:
        try:
            yield client
        except grpc.RpcError as error:
            _fail(error, secure, token is not None, retries, cert is not None)
        except ValueError as error:  # a value the wire cannot carry (decoding_options)
            raise typer.BadParameter(str(error)) from None


_HINTS = {
    grpc.StatusCode.UNAUTHENTICATED: "(the server wants a token: --token or SERVE_AUTH_TOKEN)",
    grpc.StatusCode.DEADLINE_EXCEEDED: "(the call ran past --timeout: raise it)",
}


def _fail(
    error: grpc.RpcError,
    tls: bool,
    token: bool = False,
    retries: int = 0,
    client_cert: bool = False,
) -> NoReturn:
    """Print the status, the server's request id and what to do; `token`: one was sent
    (a refusal then is of that token, not for the want of one); `retries`: --retries,
    which a refusal then outlasted; `client_cert`: --cert was presented."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    typer.echo(f"error: {code.name if code else 'UNKNOWN'}: {details}", err=True)
    # The id the server logged the call under (INTERNAL's message points to it).
    trailer = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    request_id = dict(trailer or ()).get("x-request-id")
    if request_id:
        typer.echo(f"(request id: {request_id})", err=True)
    if code == grpc.StatusCode.UNAVAILABLE and request_id and retries:
        typer.echo(
            f"(the server refused the call for now, through --retries {retries}: retry later)",
            err=True,
        )
    elif code == grpc.StatusCode.UNAVAILABLE and request_id:  # the server answered: it is up
        typer.echo("(the server refused the call for now: retry, or pass --retries)", err=True)
    elif code == grpc.StatusCode.UNAVAILABLE and not tls:
        typer.echo("(is the server up at --target? if it serves TLS, pass --ca)", err=True)
    elif code == grpc.StatusCode.UNAVAILABLE and (hint := tls_hint(details, client_cert)):
        typer.echo(hint, err=True)
    elif code == grpc.StatusCode.UNAUTHENTICATED and token:
        typer.echo(
            "(the server refused the token given by --token or SERVE_AUTH_TOKEN: check it "
            "against the server's SERVE_AUTH_TOKEN)",
            err=True,
        )
    elif code in _HINTS:
        typer.echo(_HINTS[code], err=True)
    raise typer.Exit(2)


def tls_hint(details: str, client_cert: bool = False) -> str | None:
    """What to do when the TLS handshake failed, mostly on the server's certificate: the
    status is UNAVAILABLE, as for a server that is down; grpc's details (BoringSSL's) say
    why. `client_cert`: --cert was presented."""
    unverified = "(the server's certificate could not be verified: "
    if "WRONG_VERSION_NUMBER" in details:  # what a plaintext server answers
        return "(does the server at --target serve TLS? if not, drop --ca, --tls, --cert and --key)"
    # Under TLS 1.3 a server that requires client certificates checks the client's after
    # the client's side of the handshake is done, and refuses by closing the connection:
    # all the client sees ("Handshake read failed (Socket closed)" is a connection closed
    # before the handshake, as past the server's connection limit; "Stream removed (Socket
    # closed)" one closed mid-call, past the handshake: a server that stopped or crashed).
    if "Socket closed" in details and not any(
        what in details for what in ("Handshake read failed", "Stream removed")
    ):
        if client_cert:
            return (
                "(the server closed the connection after the TLS handshake: if it requires "
                "client certificates (mutual TLS), it refused --cert, which must be issued by "
                "the CA it trusts (its SERVE_TLS_CLIENT_CA), or chain to it through the "
                "intermediate certificates that follow it in the --cert file, and be within its "
                "validity period)"
            )
        return (
            "(the server closed the connection after the TLS handshake: if it requires "
            "client certificates (mutual TLS), pass --cert and --key, issued by the CA it "
            "trusts (its SERVE_TLS_CLIENT_CA))"
        )
    if "Hostname Verification Check failed" in details:
        return unverified + (
            "it does not carry the host name of --target; pass a name it carries with "
            "--server-name)"
        )
    if "CERTIFICATE_VERIFY_FAILED" not in details:
        return None
    if "certificate has expired" in details or "certificate is not yet valid" in details:
        return unverified + (
            "it is outside its validity period, or this machine's clock is off; the server "
            "needs a renewed certificate, and a restart to read it)"
        )
    return unverified + (
        "pass the CA that issued it with --ca, and --server-name if the certificate names "
        "another host than --target)"
    )


def _print_json(message: Any) -> None:
    typer.echo(
        json_format.MessageToJson(
            message, preserving_proto_field_name=True, ensure_ascii=False, indent=None
        )
    )


def _check_texts(texts: Sequence[str], field: str) -> None:
    """Refuse an argument that is not valid UTF-8 (the shell passed bytes as surrogates)."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            where = f"{field}[{i}]" if len(texts) > 1 else field
            raise typer.BadParameter(
                f"{where} is not valid UTF-8 (at character {error.start})"
            ) from None


def _check_plot_path(path: Path) -> None:
    """Refuse a plot file that cannot be written before the call, not after it."""
    hint = "--plot-alignment"
    if importlib.util.find_spec("matplotlib") is None:
        raise typer.BadParameter(PLOT_NEEDS, param_hint=hint)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise typer.BadParameter(
            f"{path}: the file name must end in one of {', '.join(PLOT_FORMATS)}",
            param_hint=hint,
        )
    if not path.parent.is_dir():
        raise typer.BadParameter(f"{path.parent} is not a folder", param_hint=hint)
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder", param_hint=hint)
    writable = os.access(path, os.W_OK) if path.exists() else os.access(path.parent, os.W_OK)
    if not writable:
        raise typer.BadParameter(f"{path}: not writable here", param_hint=hint)


def _print_stream(chunks: Iterable[Any], head: str, as_json: bool, scores: bool) -> Any:
    """A stream as it comes: each chunk as JSON, or `head` then the text, and the score
    (which the last chunk carries) after it. Returns the last chunk, the finished one; a
    stream that ended without it (the server or a proxy cut it short, though its status
    read OK) ends the command with exit code 1: its text may be cut short, and it has no
    finish reason, usage or alignment."""
    chunk = None
    try:
        for chunk in chunks:
            if as_json:
                _print_json(chunk)
                continue
            typer.echo(head + chunk.text, nl=False)
            head = ""
            if chunk.finished and scores:
                typer.echo(f"\t{chunk.score:.3f}", nl=False)
            sys.stdout.flush()
    finally:  # an error ends the stream: its message goes on a line of its own
        if not as_json and chunk is not None:
            typer.echo()
    if chunk is None or not chunk.finished:
        typer.echo(
            "error: the stream ended before its last chunk (no finish reason): the answer "
            "may be cut short",
            err=True,
        )
        raise typer.Exit(1)
    return chunk


def _note_if_cut(finish_reason: int, tokens: int, what: str) -> None:
    """Say on stderr when an answer stopped at max_new_tokens: its text is cut short."""
    if finish_reason == pb.FINISH_REASON_LENGTH:
        typer.echo(
            f"note: {what} stopped at max_new_tokens ({tokens} tokens): raise "
            "--max-new-tokens for more (the model's limit: `describe`)",
            err=True,
        )


def _plot(
    source_tokens: Sequence[str],
    tokens: Sequence[str],
    alignment: Iterable[Any],
    path: Path,
    title: str,
) -> None:
    if not tokens:
        typer.echo("error: the translation is empty: no alignment to plot", err=True)
        raise typer.Exit(1)
    try:
        plot_alignment(source_tokens, tokens, [list(row.weights) for row in alignment], path, title)
    except OSError as error:
        typer.echo(f"error: cannot write {path}: {error.strerror or error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"alignment written to {path}", err=True)


@app.command()
def translate(
    texts: Annotated[list[str], typer.Argument(help="Text(s) to translate.")],
    target: Target = DEFAULT_TARGET,
    token: Token = None,
    ca: Ca = None,
    tls: Tls = False,
    cert: Cert = None,
    key: Key = None,
    server_name: ServerName = None,
    timeout: Timeout = 60.0,
    retries: Retries = 0,
    model: Model = "",
    version: Version = 0,
    max_new_tokens: MaxNew = None,
    beam_size: Beam = None,
    n_best: NBest = None,
    length_penalty: LengthPenalty = None,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = None,
    seed: Seed = None,
    stop: Stop = None,
    scores: Scores = False,
    stream: Stream = False,
    plot_alignment_to: Annotated[
        Path | None,
        typer.Option(
            "--plot-alignment",
            help="Write the first text's cross-attention heatmap (.png, .svg or .pdf).",
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Translate English text(s) to Spanish."""
    _check_texts(texts, "texts")
    _check_texts([model], "--model")
    _check_texts(stop or [], "--stop")
    if plot_alignment_to is not None:
        _check_plot_path(plot_alignment_to)
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        beam_size=beam_size,
        n_best=n_best,
        length_penalty=length_penalty,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        return_scores=scores,
        return_alignment=plot_alignment_to is not None,
    )
    with _connected(target, token, ca, timeout, server_name, tls, retries, cert, key) as client:
        if stream:
            lasts = [
                _print_stream(
                    client.translate_stream(text, model, version, **options), "", as_json, scores
                )
                for text in texts
            ]
        else:
            response = client.translate(texts, model, version, **options)
    if stream:
        if not as_json:
            for i, last in enumerate(lasts):
                _note_if_cut(last.finish_reason, last.usage.output_tokens, f"text {i + 1}")
        if plot_alignment_to is not None:  # the last chunk carries the alignment and labels
            last = lasts[0]
            title = f"{last.model} v{last.version}: {texts[0][:60]}"
            _plot(last.source_tokens, last.tokens, last.alignment, plot_alignment_to, title)
        return
    if as_json:
        _print_json(response)
    else:
        for i, translation in enumerate(response.translations):
            for rank, hyp in enumerate(translation.hypotheses):
                prefix = f"[{rank}] " if len(translation.hypotheses) > 1 else ""
                suffix = f"\t{hyp.score:.3f}\t{hyp.normalized_score:.3f}" if scores else ""
                typer.echo(f"{prefix}{hyp.text}{suffix}")
            best = translation.hypotheses[0]
            _note_if_cut(best.finish_reason, best.output_tokens, f"text {i + 1}")
    if plot_alignment_to is not None:
        first = response.translations[0]
        best = first.hypotheses[0]
        title = f"{response.model} v{response.version}: {texts[0][:60]}"
        _plot(first.source_tokens, best.tokens, best.alignment, plot_alignment_to, title)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    target: Target = DEFAULT_TARGET,
    token: Token = None,
    ca: Ca = None,
    tls: Tls = False,
    cert: Cert = None,
    key: Key = None,
    server_name: ServerName = None,
    timeout: Timeout = 60.0,
    retries: Retries = 0,
    model: Model = "",
    version: Version = 0,
    max_new_tokens: MaxNew = None,
    beam_size: Beam = None,
    n_best: NBest = None,
    length_penalty: LengthPenalty = None,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    top_p: TopP = None,
    seed: Seed = None,
    stop: Stop = None,
    scores: Scores = False,
    stream: Stream = False,
    as_json: Json = False,
) -> None:
    """Continue a prompt with the language model (prints the prompt, then its continuation;
    --json prints the replies, whose text is the continuation alone)."""
    _check_texts([prompt], "prompt")
    _check_texts([model], "--model")
    _check_texts(stop or [], "--stop")
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        beam_size=beam_size,
        n_best=n_best,
        length_penalty=length_penalty,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        return_scores=scores,
    )
    with _connected(target, token, ca, timeout, server_name, tls, retries, cert, key) as client:
        if stream:
            chunks = client.generate(prompt, model, version, stream=True, **options)
            last = _print_stream(chunks, "" if as_json else prompt, as_json, scores)
            if not as_json:
                _note_if_cut(last.finish_reason, last.usage.output_tokens, "the generation")
            return
        response = client.generate(prompt, model, version, **options)
    if as_json:
        _print_json(response)
        return
    for rank, hyp in enumerate(response.hypotheses):
        prefix = f"[{rank}] " if len(response.hypotheses) > 1 else ""
        suffix = f"\t{hyp.score:.3f}\t{hyp.normalized_score:.3f}" if scores else ""
        typer.echo(f"{prefix}{prompt}{hyp.text}{suffix}")
    best = response.hypotheses[0]
    _note_if_cut(best.finish_reason, best.output_tokens, "the generation")


@app.command()
def models(
    target: Target = DEFAULT_TARGET,
    token: Token = None,
    ca: Ca = None,
    tls: Tls = False,
    cert: Cert = None,
    key: Key = None,
    server_name: ServerName = None,
    timeout: Timeout = 10.0,
    retries: Retries = 0,
    as_json: Json = False,
) -> None:
    """List the loaded models."""
    with _connected(target, token, ca, timeout, server_name, tls, retries, cert, key) as client:
        infos = client.list_models()
    if as_json:
        _print_json(pb.ListModelsResponse(models=infos))
        return
    typer.echo("# name\tversion\ttask\tlanguages\tdtype\tprovider\tloaded versions\tready")
    for info in infos:
        _print_model(info)


@app.command()
def describe(
    name: Annotated[str, typer.Argument(help="Model name, e.g. en-es.")],
    version: Version = 0,
    target: Target = DEFAULT_TARGET,
    token: Token = None,
    ca: Ca = None,
    tls: Tls = False,
    cert: Cert = None,
    key: Key = None,
    server_name: ServerName = None,
    timeout: Timeout = 10.0,
    retries: Retries = 0,
    as_json: Json = False,
) -> None:
    """One model version (by default the newest serving): languages, limits, dtype, provider."""
    _check_texts([name], "name")
    with _connected(target, token, ca, timeout, server_name, tls, retries, cert, key) as client:
        info = client.describe_model(name, version)
    if as_json:
        _print_json(info)
        return
    _print_model(info)
    limits = info.limits
    typer.echo(
        f"limits: max_input_tokens {limits.max_input_tokens}, "
        f"max_new_tokens {limits.max_new_tokens}, max_positions {limits.max_positions}, "
        f"max_texts_per_request {limits.max_texts_per_request}, "
        f"max_beam_size {limits.max_beam_size}, max_batch_tokens {limits.max_batch_tokens}"
    )
    typer.echo(f"config: {info.config_json}")


def _print_model(info: pb.ModelInfo) -> None:
    versions = ",".join(str(v) for v in info.versions)
    typer.echo(
        f"{info.name}\tv{info.version}\t{info.task}\t"
        f"{info.source_language}->{info.target_language}\t{info.dtype}\t"
        f"{info.provider}\tversions={versions}\tready={info.ready}"
    )


@app.command()
def reload(
    target: Target = DEFAULT_TARGET,
    token: Token = None,
    ca: Ca = None,
    tls: Tls = False,
    cert: Cert = None,
    key: Key = None,
    server_name: ServerName = None,
    timeout: Timeout = 120.0,
    retries: Retries = 0,
    as_json: Json = False,
) -> None:
    """Ask the server to load new model versions from its repository."""
    with _connected(target, token, ca, timeout, server_name, tls, retries, cert, key) as client:
        response = client.reload()
    if as_json:
        _print_json(response)
        raise typer.Exit(1 if response.failed else 0)
    typer.echo(f"loaded: {', '.join(response.loaded) or '-'}")
    typer.echo(f"retired: {', '.join(response.retired) or '-'}")
    for folder, why in sorted(response.failed.items()):
        typer.echo(f"failed: {folder}: {why}", err=True)
    if response.failed:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
