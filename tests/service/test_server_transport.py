"""The gRPC transport against a fake backend, in-process: fast, no models needed.

What the transport alone owns is tested here: validation and status codes, auth, request
ids, deadlines, cancellation, drain, metrics. The real server with real models is tested
in test_server.py.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client import Client, Failure, decoding_options, failure
from service.domain import (
    DeadlineUnmeetable,
    FinishReason,
    HypothesisResult,
    InvalidArgument,
    ModelNotFound,
    ModelStatus,
    QueueFull,
    ReloadSummary,
    SequenceRequest,
    SequenceResult,
    Task,
    TokenEvent,
    Unavailable,
)
from service.errors import MAX_MESSAGE_BYTES
from service.gen.inference.v1 import inference_pb2 as pb
from service.metrics import Metrics
from service.server import InferenceServer, StartupError, Transport, serve
from service.settings import MIN_MESSAGE_BYTES, load_settings
from tests._tls import self_signed
from tests.conftest import free_port

TOKEN = "s3cret-token"
LIMIT = MIN_MESSAGE_BYTES  # the smallest max message size a server may have
# Settings of a server whose texts may be as long as LIMIT (32 characters a token).
LONG_TEXTS: dict[str, Any] = {"max_input_tokens": LIMIT // 32}


class FakeBackend:
    """Echoes the text upper-cased, word by word; special texts trigger failures."""

    def __init__(self) -> None:
        self.requests: list[SequenceRequest] = []
        self.cancelled: list[str] = []
        self.release = asyncio.Event()
        self.closed = False
        self.down: list[str] = []  # what missing() reports
        self.failed: list[str] = []  # what broken() reports
        self.watchers: list[Callable[[], None]] = []
        self.queue_room = 64  # what check_room lets a call queue at once
        self.refuse = 0  # how many of the next calls are refused as by a draining replica
        self.loading_stopped = False  # stop_loading() came (a drain began)

    async def start(self) -> ReloadSummary:
        self.release = asyncio.Event()
        return ReloadSummary(loaded=["en-es:1", "en-lm:1"], retired=[])

    def _check(self, request: SequenceRequest) -> str:
        self.requests.append(request)
        name = request.model or ("en-es" if request.task is Task.TRANSLATION else "en-lm")
        if name == "zoo":  # a repository of many models, which a refusal lists
            listing = "; ".join(f"model-{i:03d} (translation: versions 1)" for i in range(400))
            raise ModelNotFound(f"model 'zoo' is not loaded; loaded models: {listing}", model=name)
        if name == "zoo-𠮷":  # ... whose names are not ASCII (4 bytes of UTF-8 a character)
            listing = "; ".join("𠮷" * 60 for _ in range(400))
            message = f"model {name!r} is not loaded; loaded models: {listing}"
            raise ModelNotFound(message, model=name)
        if name not in ("en-es", "en-lm"):
            raise ModelNotFound(f"model {name!r} is not loaded")
        if request.text == "queue full":
            raise QueueFull("queue full (2 waiting); retry later", max_queue=2, queued=2)
        if request.text == "too late":
            raise DeadlineUnmeetable("estimated wait 9s exceeds the 1s left")
        if request.text == "bug":
            raise RuntimeError("secret internal detail")
        if self.refuse > 0:
            self.refuse -= 1
            raise Unavailable(
                "server is shutting down; retry on another replica", reason="draining"
            )
        return name

    def _result(self, name: str, request: SequenceRequest) -> SequenceResult:
        words = request.text.upper().split()
        hyps = [
            HypothesisResult(
                text=" ".join(words) + ("" if k == 0 else f" #{k}"),
                token_ids=list(range(len(words))),
                tokens=words,
                score=-1.0 - k,
                normalized_score=-0.5 - k,
                finish_reason=FinishReason.EOS,
                alignment=[[1.0 / len(words)] * len(words) for _ in words],
            )
            for k in range(request.params.n_best)
        ]
        return SequenceResult(name, 1, hyps, len(words) + 1, source_tokens=words)

    async def _maybe_block(self, request: SequenceRequest) -> None:
        if request.text.startswith("block"):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(request.text)
                raise

    async def submit_all(
        self,
        requests: Sequence[SequenceRequest],
        check: Callable[[int, SequenceResult], None] | None = None,
    ) -> list[SequenceResult]:
        if len(requests) > self.queue_room:
            raise QueueFull(f"{len(requests)} texts, {self.queue_room} queue places free")

        async def one(i: int, request: SequenceRequest) -> SequenceResult:
            result = await self.submit(request)
            if check is not None:
                check(i, result)
            return result

        tasks = [asyncio.ensure_future(one(i, r)) for i, r in enumerate(requests)]
        try:
            return list(await asyncio.gather(*tasks))
        finally:  # the first failure cancels the rest, as the scheduler's does
            for task in tasks:
                task.cancel()

    async def submit(self, request: SequenceRequest) -> SequenceResult:
        name = self._check(request)
        await self._maybe_block(request)
        return self._result(name, request)

    async def stream(self, request: SequenceRequest) -> AsyncIterator[TokenEvent | SequenceResult]:
        name = self._check(request)
        if request.text == "flood":  # endless 16 KiB chunks: writes wait on flow control
            try:
                for i in itertools.count():
                    yield TokenEvent([i], "x" * 16384)
            finally:
                self.cancelled.append(request.text)
        result = self._result(name, request)
        for i, word in enumerate(result.hypotheses[0].text.split()):
            yield TokenEvent([i], (" " if i else "") + word)
            await self._maybe_block(request)
        yield result

    async def reload(self) -> ReloadSummary:
        return ReloadSummary(loaded=["en-es:2"], retired=[])

    def models(self) -> list[ModelStatus]:
        return [self.describe("en-es", None), self.describe("en-lm", None)]

    def describe(self, name: str, version: int | None) -> ModelStatus:
        if name not in ("en-es", "en-lm") or version not in (None, 1):
            raise ModelNotFound(f"model {name!r} version {version} is not loaded")
        task = Task.TRANSLATION if name == "en-es" else Task.GENERATION
        return ModelStatus(
            name, 1, task, "en", "es" if name == "en-es" else "en", "int8",
            "CPUExecutionProvider", 64, 64, (1,), True, {"d_model": 32},
        )  # fmt: skip

    def model_label(self, task: Task | None, name: str) -> str:
        if name in ("en-es", "en-lm"):
            return name
        if not name and task is not None:
            return "en-es" if task is Task.TRANSLATION else "en-lm"
        return "unknown"

    def tasks(self) -> set[Task]:
        tasks = {Task.TRANSLATION, Task.GENERATION}
        return tasks - {Task.GENERATION} if "en-lm" in self.down else tasks

    def missing(self) -> list[str]:
        return list(self.down)

    def watch(self, callback: Callable[[], None]) -> None:
        self.watchers.append(callback)

    def broken(self) -> list[str]:
        return list(self.failed)

    def stop_loading(self) -> None:
        self.loading_stopped = True

    async def close(self) -> None:
        self.closed = True


class InProcessServer:
    """An InferenceServer on its own event-loop thread, for a synchronous test client."""

    def __init__(self, backend: Callable[[Metrics], Any] | None = None, **overrides: Any) -> None:
        """`backend`: made from the server's metrics (default: a FakeBackend)."""
        settings: dict[str, Any] = dict(
            port=0, metrics_port=0, max_texts_per_request=4, max_beam_size=4,
            max_new_tokens=32, default_max_new_tokens=8, max_input_tokens=16, drain_grace_s=5,
        )  # fmt: skip
        settings.update(overrides)
        self.settings = load_settings(**settings)
        self.metrics = Metrics()
        self.backend = FakeBackend() if backend is None else backend(self.metrics)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: InferenceServer = self.call(self._make())
        self.call(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"

    async def _make(self) -> InferenceServer:
        return InferenceServer(self.settings, self.backend, self.metrics)  # type: ignore[arg-type]

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def unblock(self) -> None:
        self.loop.call_soon_threadsafe(self.backend.release.set)

    def stop(self) -> None:
        if not self.server._stopped.is_set():
            self.call(self.server.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def counter(self, method: str, model: str, code: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "inference_requests_total", {"method": method, "model": model, "code": code}
        )
        return value or 0.0

    def failures(self, method: str, model: str, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "inference_request_failures_total",
            {"method": method, "model": model, "reason": reason},
        )
        return value or 0.0


@pytest.fixture(scope="module")
def fake() -> Iterator[InProcessServer]:
    server = InProcessServer()
    yield server
    server.stop()


@pytest.fixture
def client(fake: InProcessServer) -> Iterator[Client]:
    with Client(fake.address, timeout=10) as c:
        yield c


def _code(error: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return error.value.code()  # type: ignore[attr-defined,no-any-return]


# --- happy paths ---------------------------------------------------------------------------


def test_translate_many_texts_in_order(client: Client, fake: InProcessServer) -> None:
    response = client.translate(["one two", "three"], return_scores=True)
    assert [t.hypotheses[0].text for t in response.translations] == ["ONE TWO", "THREE"]
    assert response.model == "en-es" and response.version == 1
    assert response.usage.input_tokens == 3 + 2
    assert response.translations[0].hypotheses[0].score == -1.0
    assert not response.translations[0].source_tokens  # only with return_alignment


def test_call_log_lines_carry_the_tokens_and_the_peer(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="service.server"):
        unary = client.translate(["one two", "three"])
        chunks = list(client.translate_stream("in the beginning"))
    finished = {
        r.__dict__["method"]: r.__dict__ for r in caplog.records if r.msg == "call finished"
    }
    assert finished["Translate"]["version"] == unary.version == 1
    assert finished["TranslateStream"]["version"] == chunks[-1].version
    assert finished["Translate"]["input_tokens"] == unary.usage.input_tokens == 5
    assert finished["Translate"]["output_tokens"] == unary.usage.output_tokens
    last = chunks[-1].usage
    assert finished["TranslateStream"]["output_tokens"] == last.output_tokens == 3
    assert finished["TranslateStream"]["input_tokens"] == last.input_tokens
    # The client's address, to find one that holds calls (InferenceOpenCallsNearLimit).
    assert finished["Translate"]["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:"))


def test_translate_n_best_and_alignment(client: Client) -> None:
    response = client.translate("a b", beam_size=3, n_best=2, return_alignment=True)
    hyps = response.translations[0].hypotheses
    assert [h.text for h in hyps] == ["A B", "A B #1"]
    assert list(response.translations[0].source_tokens) == ["A", "B"]
    assert list(hyps[0].tokens) == ["A", "B"]
    assert [list(r.weights) for r in hyps[0].alignment] == [[0.5, 0.5], [0.5, 0.5]]
    assert hyps[0].score == 0.0  # scores only when asked


def test_streams_end_with_a_finished_chunk(client: Client) -> None:
    chunks = list(client.translate_stream("in the beginning", return_scores=True))
    assert "".join(c.text for c in chunks) == "IN THE BEGINNING"
    assert [c.finished for c in chunks] == [False, False, False, True]
    last = chunks[-1]
    assert last.finish_reason == pb.FINISH_REASON_EOS and last.model == "en-es"
    assert last.usage.output_tokens == 3 and last.score == -1.0
    gen = list(client.generate("the lord said", stream=True))
    assert gen[-1].finished and gen[-1].model == "en-lm"


def test_generate_unary_and_models(client: Client) -> None:
    response = client.generate("and god said")
    assert isinstance(response, pb.GenerateResponse)
    assert response.hypotheses[0].text == "AND GOD SAID"
    names = [m.name for m in client.list_models()]
    assert names == ["en-es", "en-lm"]
    info = client.describe_model("en-es")
    assert info.limits.max_input_tokens == 16  # the lower of settings and model
    assert info.limits.max_beam_size == 4 and '"d_model": 32' in info.config_json
    assert list(client.reload().loaded) == ["en-es:2"]


def test_request_id_is_echoed_or_generated(fake: InProcessServer) -> None:
    with Client(fake.address) as c:
        _, call = c.translator.Translate.with_call(
            pb.TranslateRequest(texts=["x"]), metadata=[("x-request-id", "abc-123")]
        )
        assert ("x-request-id", "abc-123") in list(call.trailing_metadata())
        _, call = c.translator.Translate.with_call(pb.TranslateRequest(texts=["x"]))
        generated = dict(call.trailing_metadata())["x-request-id"]
        assert len(generated) == 32
        assert fake.backend.requests[-1].request_id == generated


def test_a_request_id_is_echoed_only_if_it_is_a_valid_header_value_whole() -> None:
    """A raw HTTP/2 client can send "abc\\n": echoed in the trailer, grpc refused to send
    it (the call failed with INTERNAL "Invalid metadata" while it was counted as OK)."""
    transport = Transport(load_settings(), Metrics())
    for given in ("abc-123", "a" * 128, "x/y:z+1=2.3_4"):
        assert transport.request_id({"x-request-id": [given]}) == given
    for given in ("abc\n", "abc\r\n", "a" * 129, "a b", "", "é", 'x","level":"ERROR'):
        generated = transport.request_id({"x-request-id": [given]})
        assert generated != given and len(generated) == 32 and generated.isalnum()


def test_deadline_reaches_the_sequence_request(fake: InProcessServer) -> None:
    with Client(fake.address, timeout=5.0) as c:
        before = time.monotonic()
        c.translate("x")
        deadline = fake.backend.requests[-1].deadline
        assert deadline is not None and before + 3.0 < deadline < before + 5.5
    with Client(fake.address, timeout=None) as c:
        c.translate("x")
        assert fake.backend.requests[-1].deadline is None


def test_unset_options_take_the_defaults_and_set_ones_are_kept(
    client: Client, fake: InProcessServer
) -> None:
    client.translate("x")
    params = fake.backend.requests[-1].params
    assert (params.max_new_tokens, params.beam_size, params.n_best) == (8, 1, 1)
    assert params.max_new_tokens_default  # the model may lower it to fit
    client.translate("x", max_new_tokens=1, beam_size=3, n_best=2)
    params = fake.backend.requests[-1].params
    assert (params.max_new_tokens, params.beam_size, params.n_best) == (1, 3, 2)
    assert not params.max_new_tokens_default


# --- refusals ------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("texts", {"texts": []}, "texts: is empty"),
    ("texts", {"texts": ["a"] * 5}, "5 texts exceed the limit 4"),
    ("texts[1]", {"texts": ["a", "  "]}, "texts[1]: is empty"),
    ("texts[0]", {"texts": ["\u200b\ufeff\u200b"]}, "texts[0]: has no visible characters"),
    ("texts[1]", {"texts": ["a", "\x00 \x07"]}, "texts[1]: has no visible characters"),
    ("texts[0]", {"texts": ["a" * 600]}, "600 characters exceed the limit 512 (max_input_tok"),
    ("texts[0]", {"texts": ["a b  " * 300]}, "at least 820 characters exceed the limit 512"),
    # NFKC makes 18 characters of U+FDFA: the bound counts what the tokenizer reads
    ("texts[0]", {"texts": ["\ufdfa" * 40]}, "720 characters exceed the limit 512"),
    ("max_new_tokens", {"max_new_tokens": 33}, "33 exceeds the limit 32"),
    ("max_new_tokens", {"max_new_tokens": 0}, "must be at least 1, got 0 (leave it unset"),
    ("beam_size", {"beam_size": 0}, "must be at least 1, got 0"),
    ("n_best", {"n_best": 0}, "must be at least 1, got 0"),
    ("beam_size", {"beam_size": 5}, "5 exceeds the limit 4"),
    ("n_best", {"beam_size": 2, "n_best": 3}, "n_best: 3 exceeds beam_size 2"),
    ("n_best", {"n_best": 2}, "exceeds beam_size 1"),
    ("temperature", {"temperature": -0.5}, "must be ≥ 0"),
    ("temperature", {"temperature": math.nan}, "must be a finite number"),
    ("temperature", {"temperature": math.inf}, "must be a finite number"),
    ("temperature", {"temperature": 1e-40}, "below the smallest sampling temperature 1e-06"),
    ("temperature", {"temperature": 9.9e-7}, "below the smallest sampling temperature 1e-06"),
    ("top_p", {"temperature": 1.0, "top_p": 0.0}, "must be in (0, 1]"),
    ("top_p", {"temperature": 1.0, "top_p": 1.5}, "must be in (0, 1]"),
    ("top_p", {"temperature": 1.0, "top_p": math.nan}, "finite"),
    ("top_p", {"top_p": 0.5}, "only applies when sampling"),
    ("top_k", {"top_k": 5}, "only applies when sampling"),
    ("length_penalty", {"length_penalty": -1.0}, "must be in [0, 10"),
    ("length_penalty", {"length_penalty": math.inf}, "finite"),
    ("length_penalty", {"length_penalty": 0.6}, "only applies to beam search"),
    ("seed", {"seed": 7}, "only applies when sampling"),
    ("beam_size", {"temperature": 0.7, "beam_size": 2}, "sampling (temperature > 0)"),
    ("stop", {"stop": ["x"] * 9}, "9 strings exceed the limit 8"),
    ("stop[1]", {"stop": ["ok", "y" * 65]}, "65 characters exceed the limit 64"),
    ("stop[0]", {"stop": [""]}, "stop[0]: is empty"),
    # One beyond each upper limit, named with the limit (those values themselves are
    # accepted: test_options_at_their_limits_are_accepted_and_kept).
    ("temperature", {"temperature": 101.0}, "101.0 exceeds the limit 100.0"),
    # float32's next value above 100: the limit is tight, not "about 100".
    ("temperature", {"temperature": 100.00001}, "exceeds the limit 100.0"),
    ("top_k", {"temperature": 1.0, "top_k": (1 << 20) + 1}, "1048577 exceeds the limit 1048576"),
    ("length_penalty", {"beam_size": 2, "length_penalty": 10.5}, "must be in [0, 10.0], got 10.5"),
]


@pytest.mark.parametrize(("field", "request_args", "message"), BAD_REQUESTS)
def test_bad_translate_requests_are_invalid_argument(
    client: Client, field: str, request_args: dict[str, Any], message: str
) -> None:
    args = dict(request_args)
    texts = args.pop("texts", ["In the beginning"])
    request = pb.TranslateRequest(texts=texts, options=decoding_options(**args))
    with pytest.raises(grpc.RpcError) as error:
        client.translator.Translate(request, timeout=5)
    assert _code(error) == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details()  # type: ignore[attr-defined]
    assert field in details and message in details, details


# Each option at its documented limit: accepted, and the value reaches the backend as given.
AT_THE_LIMIT: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"max_new_tokens": 32}, {"max_new_tokens": 32}),  # the server's max_new_tokens
    ({"beam_size": 4, "n_best": 4}, {"beam_size": 4, "n_best": 4}),  # max_beam_size
    ({"beam_size": 2, "length_penalty": 0.0}, {"beam_size": 2, "length_penalty": 0.0}),
    ({"beam_size": 2, "length_penalty": 10.0}, {"beam_size": 2, "length_penalty": 10.0}),
    ({"temperature": 100.0}, {"temperature": 100.0}),
    # what the float32 field makes of the smallest temperature the refusal names
    ({"temperature": 1e-6}, {"temperature": pytest.approx(1e-6, rel=1e-6)}),
    ({"temperature": 1.0, "top_k": 1 << 20}, {"top_k": 1 << 20}),
]


@pytest.mark.parametrize(("request_args", "expected"), AT_THE_LIMIT)
def test_options_at_their_limits_are_accepted_and_kept(
    client: Client, fake: InProcessServer, request_args: dict[str, Any], expected: dict[str, Any]
) -> None:
    response = client.translator.Translate(
        pb.TranslateRequest(texts=["In the beginning"], options=decoding_options(**request_args)),
        timeout=5,
    )
    assert response.translations[0].hypotheses[0].text == "IN THE BEGINNING"
    params = fake.backend.requests[-1].params
    assert {key: getattr(params, key) for key in expected} == expected


def test_runs_of_spaces_do_not_count_against_the_length_bound(client: Client) -> None:
    """The tokenizer reads a run of whitespace as one space: a short text padded with
    thousands of spaces is not refused as too long."""
    padded = "Hello" + " " * 2000 + "world."
    assert len(padded) > 16 * 32  # over the bound, counted character by character
    assert client.translate(padded).translations[0].hypotheses[0].text


def test_a_text_far_over_the_bound_as_sent_is_refused_before_it_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs of spaces count as one, but a megabyte of them (or of combining marks) took
    the event loop most of a second to look at character by character: past
    SENT_CHARS_FACTOR × the bound as sent, a text is refused before any such look."""
    import service.validation as validation

    limits = validation.RequestLimits()  # 256 tokens: 8,192 characters, 32,768 as sent
    sent = validation.SENT_CHARS_FACTOR * limits.max_input_tokens * 32
    assert validation.text("t", "a" + " " * (sent - 2) + "b", limits)  # one run: counted

    class Untouched:
        def __getattr__(self, name: str) -> None:
            raise AssertionError(f"unicodedata.{name} called on a text over the limit")

    monkeypatch.setattr(validation, "unicodedata", Untouched())
    for huge in (" " * 4_000_000 + "a", "a" + "\u0301" * 2_000_000):
        with pytest.raises(InvalidArgument, match=f"characters exceed the limit {sent} as sent"):
            validation.text("t", huge, limits)


def test_the_length_bound_counts_the_whole_text_across_chunks() -> None:
    """Normalized a chunk at a time, a text counts what it does whole: a run of spaces or
    a letter's combining mark across a chunk boundary is not counted twice."""
    from service.validation import RequestLimits, text

    small = RequestLimits(max_input_tokens=16)  # 512 characters
    assert text("t", "x" * 500 + " " * 1000 + "y" * 11, small)  # 500 + 1 + 11 = 512
    with pytest.raises(InvalidArgument, match="t: 514 characters exceed the limit 512"):
        text("t", "x" * 511 + " " * 1000 + "y" * 2, small)
    large = RequestLimits(max_input_tokens=64)  # 2,048: e + U+0301 composes to one é
    assert text("t", "a" * 1023 + "e\u0301" + "b" * 1024, large)
    with pytest.raises(InvalidArgument, match="t: 2049 characters exceed the limit 2048"):
        text("t", "a" * 1023 + "e\u0301" + "b" * 1025, large)


def test_the_health_port_is_not_shared_with_another_server() -> None:
    """As the gRPC port: a second server on the same health port fails to start, rather
    than splitting the kubelet's probes with it."""
    first = InProcessServer(health_port=free_port())
    try:
        settings = first.settings.model_copy(update={"port": 0})

        async def second() -> InferenceServer:
            return InferenceServer(settings, FakeBackend(), Metrics())  # type: ignore[arg-type]

        other = first.call(second())
        with pytest.raises(StartupError, match=r"cannot listen for health checks on .* in use"):
            first.call(other.start())
        first.call(other.close_ports())
    finally:
        first.stop()


def test_tls_files_grpc_cannot_serve_are_named_not_the_port(tmp_path: Path) -> None:
    """A key on a curve Python's OpenSSL takes (the settings' check) and grpc's BoringSSL
    does not (brainpool) fails the bind: the message names the TLS files, not a busy port;
    a busy port with servable files is still named as such."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    cert, key = tmp_path / "brainpool.pem", tmp_path / "brainpool.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:brainpoolP256r1", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-subj", "/CN=localhost", "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    good_cert, good_key = self_signed(tmp_path)

    async def server(**tls: Any) -> InferenceServer:
        settings = load_settings(port=tls.pop("port", 0), metrics_port=0, **tls)
        return InferenceServer(settings, FakeBackend(), Metrics())  # type: ignore[arg-type]

    runner = asyncio.new_event_loop()
    try:
        refused = runner.run_until_complete(server(tls_cert=cert, tls_key=key))
        with pytest.raises(StartupError, match=r"grpc cannot serve tls_cert .*brainpool\.pem"):
            refused._bind()
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            taken = runner.run_until_complete(
                server(tls_cert=good_cert, tls_key=good_key, port=port)
            )
            with pytest.raises(StartupError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
                taken._bind()
        for each in (refused, taken):
            runner.run_until_complete(each.close_ports())
    finally:
        runner.close()


def test_bad_generate_and_stream_requests(client: Client) -> None:
    cases = [
        (lambda: client.generate(""), "prompt: is empty"),
        (lambda: client.generate("x", return_alignment=True), "options.return_alignment"),
        (lambda: list(client.generate("x", stream=True, beam_size=2, n_best=2)), "a stream"),
        (lambda: list(client.translate_stream("")), "text: is empty"),
        (lambda: client.describe_model(""), "name: is empty"),
        # a name no model folder can have, refused before it is echoed in an error: a
        # long one in a NOT_FOUND message overflowed grpc's metadata limit
        (lambda: client.describe_model("é" * 3000), "name: 3000 characters exceed the limit 255"),
        (lambda: client.translate("x", model="m" * 256), "model: 256 characters exceed"),
        (lambda: client.generate("x", model="m" * 20000), "model: 20000 characters exceed"),
    ]
    for call, message in cases:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert _code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()  # type: ignore[attr-defined]


def test_domain_errors_map_to_status_codes(
    client: Client, fake: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    full = Failure("QUEUE_FULL", {"max_queue": "2", "queued": "2"}, {})
    unknown = Failure("MODEL_NOT_FOUND", {}, {})
    cases = [
        (lambda: client.translate("x", model="xx-yy"), grpc.StatusCode.NOT_FOUND, unknown),
        (lambda: client.describe_model("xx-yy"), grpc.StatusCode.NOT_FOUND, unknown),
        (
            lambda: list(client.translate_stream("x", model="nope")),
            grpc.StatusCode.NOT_FOUND,
            unknown,
        ),
        (lambda: client.translate("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED, full),
        (
            lambda: client.translate("too late"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Failure("DEADLINE_UNMEETABLE", {}, {}),
        ),
        # A bug's details are as generic as its message.
        (
            lambda: client.translate(["ok", "bug"]),
            grpc.StatusCode.INTERNAL,
            Failure("INTERNAL", {}, {}),
        ),
    ]
    with caplog.at_level(logging.INFO, logger="service.server"):
        for call, code, expected in cases:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert _code(error) == code
            # The status's details tell the two RESOURCE_EXHAUSTED apart for code, too.
            assert failure(error.value) == expected
    assert "secret" not in error.value.details()  # type: ignore[attr-defined]
    # The server's own refusals warn (they stay in logs at level WARNING); bad calls inform.
    # Each line names the reason, which the code alone does not tell.
    levels = {
        (r.__dict__["code"], r.__dict__.get("reason"), r.levelname)
        for r in caplog.records
        if "code" in r.__dict__
    }
    assert levels == {
        ("NOT_FOUND", "model_not_found", "INFO"),
        ("RESOURCE_EXHAUSTED", "queue_full", "WARNING"),
        ("RESOURCE_EXHAUSTED", "deadline_unmeetable", "WARNING"),
        ("INTERNAL", "internal", "ERROR"),
    }
    # An unknown model name never becomes a metric label.
    assert fake.counter("Translate", "unknown", "NOT_FOUND") >= 1
    assert fake.counter("Translate", "en-es", "RESOURCE_EXHAUSTED") >= 2
    # The failures counter tells the two RESOURCE_EXHAUSTED apart.
    assert fake.failures("Translate", "unknown", "model_not_found") >= 1
    assert fake.failures("Translate", "en-es", "queue_full") >= 1
    assert fake.failures("Translate", "en-es", "deadline_unmeetable") >= 1
    assert fake.failures("Translate", "en-es", "internal") >= 1


def test_a_long_refusal_is_sent_cut_and_logged_whole(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """A message of 14,000 characters, sent twice in the trailers (grpc-message and the
    google.rpc.Status), made grpc fail the call RESOURCE_EXHAUSTED ("received metadata
    size exceeds soft limit") instead of NOT_FOUND: it is cut, saying so, with its details
    intact, and the call's log line keeps it whole."""
    with (
        caplog.at_level(logging.INFO, logger="service.server"),
        pytest.raises(grpc.RpcError) as error,
    ):
        client.translate("x", model="zoo")
    assert _code(error) == grpc.StatusCode.NOT_FOUND
    message = error.value.details()  # type: ignore[attr-defined]
    assert len(message) == MAX_MESSAGE_BYTES and message.startswith("model 'zoo' is not loaded")
    assert "characters in all; the server log has the whole message" in message
    assert failure(error.value) == Failure("MODEL_NOT_FOUND", {"model": "zoo"}, {})
    [logged] = [r for r in caplog.records if r.__dict__.get("reason") == "model_not_found"]
    assert "model-399 (translation: versions 1)" in logged.__dict__["error"]


def test_a_long_refusal_past_ascii_is_cut_to_what_the_trailers_hold(client: Client) -> None:
    """grpc-message percent-encodes each byte past ASCII as three: cut at 1,024 characters,
    a refusal listing models whose names are not ASCII made 14 KiB of trailers (10 KiB of
    grpc-message), and grpc failed most such calls RESOURCE_EXHAUSTED ("received metadata
    size exceeds soft limit") instead of NOT_FOUND. It is cut at 1,024 bytes of UTF-8, at a
    character's end."""
    for _ in range(5):  # between 8 and 16 KiB, grpc fails a call at random
        with pytest.raises(grpc.RpcError) as error:
            client.translate("x", model="zoo-𠮷")
        assert _code(error) == grpc.StatusCode.NOT_FOUND
    message = error.value.details()  # type: ignore[attr-defined]
    assert MAX_MESSAGE_BYTES - 4 < len(message.encode()) <= MAX_MESSAGE_BYTES
    assert message.startswith("model 'zoo-𠮷' is not loaded; loaded models: 𠮷𠮷")
    assert message.endswith("the server log has the whole message under this call's request id)")
    assert failure(error.value) == Failure("MODEL_NOT_FOUND", {"model": "zoo-𠮷"}, {})


def test_a_multi_text_call_without_queue_room_queues_none_of_its_texts(
    client: Client, fake: InProcessServer
) -> None:
    fake.backend.queue_room = 2
    try:
        submitted = len(fake.backend.requests)
        with pytest.raises(grpc.RpcError) as error:
            client.translate(["a", "b", "c"])
        assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 texts, 2 queue places free" in error.value.details()  # type: ignore[attr-defined]
        assert len(fake.backend.requests) == submitted  # checked before any was submitted
        assert len(client.translate(["a", "b"]).translations) == 2
    finally:
        fake.backend.queue_room = 64


def test_metrics_count_calls_by_code(client: Client, fake: InProcessServer) -> None:
    before = fake.counter("GenerateUnary", "en-lm", "OK")
    client.generate("x")
    assert fake.counter("GenerateUnary", "en-lm", "OK") == before + 1
    invalid = fake.counter("GenerateUnary", "en-lm", "INVALID_ARGUMENT")
    with pytest.raises(grpc.RpcError):
        client.generate("x", temperature=-1)
    assert fake.counter("GenerateUnary", "en-lm", "INVALID_ARGUMENT") == invalid + 1
    assert fake.failures("GenerateUnary", "en-lm", "invalid_argument") == invalid + 1
    # Every call that did not end OK is counted once among the failures, under one reason.
    samples = [s for m in fake.metrics.registry.collect() for s in m.samples]
    not_ok = sum(
        s.value
        for s in samples
        if s.name == "inference_requests_total" and s.labels["code"] != "OK"
    )
    failed = sum(s.value for s in samples if s.name == "inference_request_failures_total")
    assert not_ok == failed > 0
    # Durations by status too: a refusal answered at once stays out of the OK latencies.
    for code in ("OK", "INVALID_ARGUMENT"):
        labels = {"method": "GenerateUnary", "model": "en-lm", "code": code}
        count = fake.metrics.registry.get_sample_value(
            "inference_request_duration_seconds_count", labels
        )
        assert count == fake.counter("GenerateUnary", "en-lm", code)


@pytest.mark.parametrize(
    ("path", "payload", "message"),
    [
        # texts[0] = b"\xff\xfeA": a string field that is not UTF-8
        ("/inference.v1.Translator/Translate", b"\x1a\x03\xff\xfeA", "TranslateRequest"),
        ("/inference.v1.Generator/Generate", b"\x1a\x02\xc3\x28", "GenerateRequest"),
        ("/inference.v1.Models/DescribeModel", b"\xff\xff\xff", "DescribeModelRequest"),
    ],
)
def test_a_request_that_is_not_valid_protobuf_is_invalid_argument(
    fake: InProcessServer, path: str, payload: bytes, message: str
) -> None:
    """Answered, counted and logged by the transport like any bad input, not UNKNOWN
    from grpc before the call is seen."""
    method = path.rsplit("/", 1)[1]
    before = fake.counter(method, "unknown", "INVALID_ARGUMENT")
    with grpc.insecure_channel(fake.address) as channel:
        streaming = method == "Generate"
        call = (channel.unary_stream if streaming else channel.unary_unary)(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as error:
            result = call(payload, timeout=5)
            if streaming:
                list(result)
    assert _code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request: not a valid inference.v1.{message}" in error.value.details()  # type: ignore[attr-defined]
    assert fake.counter(method, "unknown", "INVALID_ARGUMENT") == before + 1


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/grpc.health.v1.Health/Check", b"\xff\xff\xff"),
        ("/grpc.health.v1.Health/Check", b"\x0a\x02\xc3\x28"),  # service: not UTF-8
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", b"\xff\xff\xff"),
    ],
)
def test_an_open_service_request_that_is_not_valid_protobuf_is_invalid_argument(
    fake: InProcessServer, caplog: pytest.LogCaptureFixture, path: str, payload: bytes
) -> None:
    """Health and reflection, open to any caller, answer bad bytes as bad input too: not
    grpc's UNKNOWN with a traceback logged at ERROR for each call."""
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(fake.address) as channel:
        streaming = "Reflection" in path
        call = (channel.stream_stream if streaming else channel.unary_unary)(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.RpcError) as error:
            if streaming:
                list(call(iter([payload]), timeout=5))
            else:
                call(payload, timeout=5)
    assert _code(error) == grpc.StatusCode.INVALID_ARGUMENT
    assert "request: not valid protobuf" in error.value.details()  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert _health(fake.address) == health_pb2.HealthCheckResponse.SERVING


def test_a_request_over_the_max_message_size_is_refused_and_counted() -> None:
    """Named with the limit and counted like any refusal, instead of grpc's uncounted
    RESOURCE_EXHAUSTED; grpc still refuses by itself one over twice the limit."""
    server = InProcessServer(max_message_bytes=LIMIT, **LONG_TEXTS)
    try:
        with Client(server.address, timeout=10) as c:
            assert c.translate(["a" * (LIMIT // 3)] * 2).translations  # 2/3 of it: within
            for texts, counted in ((["a" * (LIMIT // 3)] * 4, 1), (["a" * 3 * LIMIT], 0)):
                with pytest.raises(grpc.RpcError) as error:
                    c.translate(texts)
                assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = error.value.details()  # type: ignore[attr-defined]
                if counted:
                    assert f"over the server's max message size of {LIMIT:,}" in details
                    assert "(SERVE_MAX_MESSAGE_BYTES): send fewer or shorter texts" in details
            with pytest.raises(grpc.RpcError) as error:
                list(c.translate_stream("a" * (3 * LIMIT // 2)))
            assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert server.counter("Translate", "unknown", "RESOURCE_EXHAUSTED") == 1
        assert server.counter("TranslateStream", "unknown", "RESOURCE_EXHAUSTED") == 1
        assert server.failures("Translate", "unknown", "request_too_large") == 1
        assert server.failures("TranslateStream", "unknown", "request_too_large") == 1
    finally:
        server.stop()


def test_an_answer_over_the_max_message_size_is_refused_and_counted() -> None:
    """grpc would fail such an answer on the wire after the call counted as OK: the
    transport refuses it instead, naming the size, the limit and what to ask for."""
    server = InProcessServer(max_message_bytes=LIMIT)
    text = " ".join(f"w{i}" for i in range(70))  # the fake aligns every word with every word
    try:
        with Client(server.address, timeout=10) as c:
            assert c.translate(text).translations  # small enough without alignment
            calls = [
                lambda: c.translate(text, return_alignment=True, beam_size=4, n_best=4),
                lambda: list(c.translate_stream(text, return_alignment=True)),
            ]
            for call in calls:
                with pytest.raises(grpc.RpcError) as error:
                    call()
                assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
                details = error.value.details()  # type: ignore[attr-defined]
                assert f"over the server's max message size of {LIMIT:,}" in details
                assert "no alignment" in details
        assert server.counter("Translate", "en-es", "RESOURCE_EXHAUSTED") == 1
        assert server.counter("TranslateStream", "en-es", "RESOURCE_EXHAUSTED") == 1
        assert server.counter("Translate", "en-es", "OK") == 1
        assert server.failures("Translate", "en-es", "response_too_large") == 1
        assert server.failures("TranslateStream", "en-es", "response_too_large") == 1
    finally:
        server.stop()


def test_a_multi_text_answer_over_the_max_message_size_is_refused_before_the_rest_decodes() -> None:
    """Once the texts decoded are over the max message size the call is refused (their
    size a lower bound), and the texts left are cancelled, not decoded for nothing."""
    server = InProcessServer(max_message_bytes=LIMIT)
    text = " ".join(f"w{i}" for i in range(70))  # the fake aligns every word with every word
    try:
        with Client(server.address, timeout=10) as c:
            with pytest.raises(grpc.RpcError) as error:
                c.translate([text, "block until released"], return_alignment=True)
            assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = error.value.details()  # type: ignore[attr-defined]
            assert "the answer is at least " in details
            assert "bytes with 1 of 2 texts decoded, over the server's max message size" in details
            assert "no alignment" in details
        # The refusal can reach the client before the cancel of the text left is done.
        _wait(lambda: server.backend.cancelled == ["block until released"])
        assert server.counter("Translate", "en-es", "RESOURCE_EXHAUSTED") == 1
    finally:
        server.stop()


def test_the_max_message_size_is_a_tight_bound() -> None:
    """An answer of exactly max_message_bytes goes out; one byte more is refused by the
    transport (RESOURCE_EXHAUSTED, counted as such), not only answers far over it."""

    def texts(n: int) -> list[str]:
        return ["a" * (LIMIT // 2), "b" * (LIMIT // 2), "c" * n]

    wide = InProcessServer(**LONG_TEXTS)  # a 4 MiB limit
    try:
        with Client(wide.address, timeout=10) as c:
            size = c.translate(texts(300)).ByteSize()
            assert c.translate(texts(301)).ByteSize() == size + 1 and size >= LIMIT
    finally:
        wide.stop()
    server = InProcessServer(max_message_bytes=size, **LONG_TEXTS)
    try:
        with Client(server.address, timeout=10) as c:
            assert c.translate(texts(300)).ByteSize() == size  # exactly the limit
            with pytest.raises(grpc.RpcError) as error:
                c.translate(texts(301))
            assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = error.value.details()  # type: ignore[attr-defined]
            assert (
                f"the answer is {size + 1:,} bytes, over the server's max message size of {size:,}"
                in details
            )
        assert server.counter("Translate", "en-es", "OK") == 1
        assert server.counter("Translate", "en-es", "RESOURCE_EXHAUSTED") == 1
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("budget", "remaining", "code"),
    [
        (30.0, 0.3, grpc.StatusCode.DEADLINE_EXCEEDED),  # the client's deadline, arrived late
        (30.0, 0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (1.0, 0.08, grpc.StatusCode.DEADLINE_EXCEEDED),  # the 0.1 s floor
        (30.0, 5.0, grpc.StatusCode.CANCELLED),  # the client went away
        (1.0, 0.2, grpc.StatusCode.CANCELLED),
        (60.0, 0.9, grpc.StatusCode.DEADLINE_EXCEEDED),
        (60.0, 2.0, grpc.StatusCode.CANCELLED),  # 5 % of a minute, past the 1 s cap
        (None, None, grpc.StatusCode.CANCELLED),  # no deadline at all
    ],
)
def test_a_cancellation_near_the_deadline_counts_as_deadline_exceeded(
    budget: float | None, remaining: float | None, code: grpc.StatusCode
) -> None:
    """The server's copy of the deadline runs later than the client's by the call's time in
    transit: a cancellation in the deadline's last 5 % (0.1 s to 1 s) is the client's
    deadline."""

    class Context:
        def time_remaining(self) -> float | None:
            return remaining

    status, _, reason = Transport._cancel_status(Context(), budget)  # type: ignore[arg-type]
    assert status == code
    assert reason == code.name.lower()  # deadline_exceeded or cancelled


def test_client_cancellation_cancels_the_backend_task(
    fake: InProcessServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.server")
    fake.backend.cancelled.clear()  # the server is the module's: another test's cancels
    with Client(fake.address, timeout=10) as c:
        future = c.translator.Translate.future(pb.TranslateRequest(texts=["block a", "block b"]))
        _wait(lambda: sum(r.text.startswith("block") for r in fake.backend.requests) >= 2)
        future.cancel()
        _wait(lambda: sorted(fake.backend.cancelled) == ["block a", "block b"])
        stream = c.generate("block stream", stream=True)
        assert next(iter(stream)).text == "BLOCK"
        stream.cancel()
        _wait(lambda: "block stream" in fake.backend.cancelled)
    _wait(lambda: fake.server.transport.in_flight == 0)
    assert fake.counter("Translate", "en-es", "CANCELLED") >= 1
    # Each is logged as cancelled, with who cancelled it, not as a call that finished.
    lines = {r.__dict__["method"]: r for r in caplog.records if "code" in r.__dict__}
    for method in ("Translate", "Generate"):
        assert lines[method].getMessage() == "call cancelled: cancelled by the client"
        assert (lines[method].levelname, lines[method].__dict__["reason"]) == ("INFO", "cancelled")


@pytest.mark.parametrize("method", ["Generate", "TranslateStream"])
def test_stream_cancelled_mid_write_ends_cleanly(
    fake: InProcessServer, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    """A client that cancels while a chunk is being written (flow control holds an endless
    stream) gets a CANCELLED call that ends in its own task: no ERROR log (grpc.aio used
    to abandon the stream generator, whose late close in a foreign Context failed to reset
    the request id: "Task exception was never retrieved"; nor grpc's failed-write error)."""
    caplog.set_level(logging.INFO)
    before = fake.counter(method, "en-lm" if method == "Generate" else "en-es", "CANCELLED")
    fake.backend.cancelled.clear()
    with Client(fake.address, timeout=10) as c:
        if method == "Generate":
            stream = c.generate("flood", stream=True)
        else:
            stream = c.translate_stream("flood")
        assert len(next(iter(stream)).text) == 16384
        time.sleep(0.3)  # the server fills the flow-control window and waits in a write
        stream.cancel()
        _wait(lambda: fake.backend.cancelled == ["flood"])  # the backend stream was closed
    _wait(lambda: fake.server.transport.in_flight == 0)
    gc.collect()  # finalize anything grpc abandoned, then let the loop run its callbacks
    fake.call(asyncio.sleep(0.1))
    label = "en-lm" if method == "Generate" else "en-es"
    assert fake.counter(method, label, "CANCELLED") == before + 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not errors, errors


def test_a_failed_write_frees_the_request_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails because the client went away (grpc's ExecuteBatchError) closes
    the stream, and so frees its row, at once: not after the wait for grpc's cancel."""
    from service import server as server_module

    monkeypatch.setattr(server_module, "WRITE_FAILURE_GRACE_S", 0.5)
    closed: list[float] = []

    async def items() -> AsyncIterator[str]:
        try:
            while True:
                yield "chunk"
        finally:
            closed.append(time.monotonic())

    class GoneClient:
        async def write(self, item: str) -> None:
            raise RuntimeError("ExecuteBatchError: the client went away")

    async def main() -> float:
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            await server_module._write_all(GoneClient(), items())  # type: ignore[arg-type]
        assert time.monotonic() - start >= 0.5  # it still waited for grpc's cancel
        return start

    start = asyncio.run(main())
    assert closed and closed[0] - start < 0.1


class _Context:
    """The part of a grpc.aio servicer context Transport reads, for calls run without grpc:
    `remaining` seconds before the deadline."""

    remaining = 1.0

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_trailing_metadata(self, metadata: object) -> None:
        pass

    def time_remaining(self) -> float:
        return self.remaining


def test_a_failed_abort_waits_for_grpc_to_cancel_the_call() -> None:
    """When the status cannot go out because the client went away, the handler waits to
    be cancelled (no ERROR from grpc) instead of raising grpc's error."""
    settings = load_settings(port=0, metrics_port=0)
    metrics = Metrics()

    class GoneContext(_Context):
        async def abort(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("ExecuteBatchError: the client went away")

    async def refused(state: object) -> None:
        raise QueueFull("queue full (2 waiting); retry later")

    async def main() -> None:
        from service.server import Transport

        transport = Transport(settings, metrics)
        transport.ready = True
        call = asyncio.create_task(transport.unary("Translate", GoneContext(), refused))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        assert not call.done()  # waiting to be cancelled, not failing
        call.cancel()  # what grpc does once it sees the client gone
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(main())
    assert metrics.registry.get_sample_value(
        "inference_requests_total",
        {"method": "Translate", "model": "unknown", "code": "RESOURCE_EXHAUSTED"},
    )


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("late", [False, True])
def test_an_answer_ready_after_the_deadline_is_not_sent(late: bool, stream: bool) -> None:
    """A unary answer made while the deadline passed would reach its client after
    DEADLINE_EXCEEDED (or race it): it is not sent, and the call counts as
    DEADLINE_EXCEEDED, not OK (a metrics audit found such calls counted OK). A stream
    whose deadline passed as it ended counts so too: its client sees that status."""
    settings = load_settings(port=0, metrics_port=0)
    metrics = Metrics()
    aborted: list[tuple[grpc.StatusCode, str]] = []

    class Context(_Context):
        async def abort(self, code: grpc.StatusCode, message: str, **_: object) -> None:
            aborted.append((code, message))
            raise grpc.aio.AbortError()

    context = Context()

    method = "TranslateStream" if stream else "Translate"

    async def answer(state: object) -> pb.TranslateResponse:
        if late:
            context.remaining = 0.0  # grpc's time left stops at 0
        return pb.TranslateResponse()

    async def chunks(state: object) -> AsyncGenerator[pb.TokenChunk]:
        yield pb.TokenChunk(text="a")
        if late:
            context.remaining = 0.0
        yield pb.TokenChunk(text="b")

    async def main() -> None:
        from service.server import Transport

        transport = Transport(settings, metrics)
        transport.ready = True
        sent: list[object] = []

        async def read() -> None:
            if stream:
                chunked: AsyncIterator[pb.TokenChunk] = transport.stream(
                    method,
                    context,  # type: ignore[arg-type]
                    chunks,
                    model="en-es",
                )
                async for item in chunked:
                    sent.append(item)
            else:
                sent.append(await transport.unary(method, context, answer, model="en-es"))  # type: ignore[arg-type]

        if late:
            with pytest.raises(grpc.aio.AbortError):
                await read()
        else:
            await read()
        assert len(sent) == (2 if stream else 0 if late else 1)

    asyncio.run(main())

    def count(code: str) -> float | None:
        labels = {"method": method, "model": "en-es", "code": code}
        return metrics.registry.get_sample_value("inference_requests_total", labels)

    if late:
        [(code, message)] = aborted
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and message.startswith(
            "the deadline passed while the " + ("stream was being sent" if stream else "answer")
        )
        assert count("DEADLINE_EXCEEDED") == 1 and count("OK") is None
    else:
        assert not aborted and count("OK") == 1


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """`_wait` on the event loop: polls, where a fixed sleep is too short on a loaded machine."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# --- health, reflection, auth, drain --------------------------------------------------------


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)


def test_health_per_service(fake: InProcessServer) -> None:
    for service in ("", "inference.v1.Translator", "inference.v1.Generator", "inference.v1.Models"):
        assert _health(fake.address, service) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_and_health_answer_at_the_smallest_max_message_size() -> None:
    """Reflection's answers are bound by the max message size too (a proto file's
    descriptor in one message): at the floor every service is listed and described, so
    grpcurl works against any server the settings let start."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    server = InProcessServer(max_message_bytes=LIMIT)
    try:
        for service in ("", "inference.v1.Translator"):
            assert _health(server.address, service) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(server.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            assert services == {
                "inference.v1.Translator",
                "inference.v1.Generator",
                "inference.v1.Models",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            pool = DescriptorPool(database)
            for name in services:
                assert pool.FindServiceByName(name).methods, name
            translate = pool.FindMethodByName("inference.v1.Translator.Translate")
            assert "texts" in translate.input_type.fields_by_name
    finally:
        server.stop()


def test_a_model_that_stops_serving_unreadies_the_server_but_not_the_other_service() -> None:
    """ "" (readiness) needs every model; each service's own health needs its task. A
    version that stops on its own (its engine died) tells the server through watch(), and
    then inference.v1.Models (the liveness probe's) reads NOT_SERVING: only a restart
    brings that engine back."""
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    server = InProcessServer()
    try:
        assert _health(server.address) == serving
        server.backend.down = ["en-lm"]
        for callback in server.backend.watchers:
            server.loop.call_soon_threadsafe(callback)
        _wait(lambda: _health(server.address) == not_serving)
        assert _health(server.address, "inference.v1.Generator") == not_serving
        assert _health(server.address, "inference.v1.Translator") == serving
        assert _health(server.address, "inference.v1.Models") == serving
        # Its engine died (not a failed load): the liveness probe's service says so too.
        server.backend.failed = ["en-lm:1"]
        for callback in server.backend.watchers:
            server.loop.call_soon_threadsafe(callback)
        _wait(lambda: _health(server.address, "inference.v1.Models") == not_serving)
        assert _health(server.address, "inference.v1.Translator") == serving
    finally:
        server.stop()


def test_auth_token_required_except_health(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.server")  # whatever the root's level
    server = InProcessServer(auth_token=TOKEN)
    assert "the bearer token travels unencrypted" in caplog.text  # no TLS here
    try:
        for token, code in [
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("wrong", grpc.StatusCode.UNAUTHENTICATED),
        ]:
            with Client(server.address, token=token) as c:
                for call in (lambda: c.translate("x"), c.list_models, c.reload):
                    with pytest.raises(grpc.RpcError) as error:
                        call()  # type: ignore[operator]
                    assert _code(error) == code
        with Client(server.address, token=TOKEN) as c:
            assert c.translate("x").translations[0].hypotheses[0].text == "X"
            assert c.reload().loaded
        # Lower-case scheme is accepted too; health stays open.
        with grpc.insecure_channel(server.address) as channel:
            from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.ModelsStub(channel)
            stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", f"bearer {TOKEN}")])
            # A token without its scheme: told what the header must read.
            with pytest.raises(grpc.RpcError) as error:
                stub.ListModels(pb.ListModelsRequest(), metadata=[("authorization", TOKEN)])
            assert "must read `Bearer <token>`" in error.value.details()  # type: ignore[attr-defined]
        assert _health(server.address) == health_pb2.HealthCheckResponse.SERVING
        # Refused before its request is read (an unauthenticated caller holds no memory),
        # so counted under model "unknown": the model it asked for is in the unread request.
        assert server.counter("Translate", "unknown", "UNAUTHENTICATED") == 2
        assert server.counter("Translate", "en-es", "UNAUTHENTICATED") == 0
    finally:
        server.stop()


@pytest.mark.parametrize("header", [f"Basic {TOKEN}", f"Token {TOKEN}", "Bearer", f"Bearer{TOKEN}"])
def test_the_right_token_under_another_scheme_is_unauthenticated(header: str) -> None:
    """Only `Bearer <token>` authenticates: the right token after another scheme (or with
    no scheme separated from it) does not reach the backend."""
    server = InProcessServer(auth_token=TOKEN)
    try:
        with grpc.insecure_channel(server.address) as channel:
            from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

            stub = pb_grpc.TranslatorStub(channel)
            with pytest.raises(grpc.RpcError) as error:
                stub.Translate(
                    pb.TranslateRequest(texts=["x"]),
                    metadata=[("authorization", header)],
                    timeout=5,
                )
            assert _code(error) == grpc.StatusCode.UNAUTHENTICATED
            assert "must read `Bearer <token>`" in error.value.details()  # type: ignore[attr-defined]
            # The same token as a bearer token is accepted.
            stub.Translate(
                pb.TranslateRequest(texts=["x"]),
                metadata=[("authorization", f"Bearer {TOKEN}")],
                timeout=5,
            )
        assert [r.text for r in server.backend.requests] == ["x"]
        assert server.counter("Translate", "unknown", "UNAUTHENTICATED") == 1
    finally:
        server.stop()


def test_two_authorization_headers_are_unauthenticated_whatever_their_values() -> None:
    """A call with two `authorization` headers is refused, whichever comes last (a dict of
    the metadata kept only that one): a proxy that adds its own header must not make a
    wrong token pass, nor the right one fail as "invalid"."""
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc

    right, wrong = f"Bearer {TOKEN}", "Bearer wrong"
    server = InProcessServer(auth_token=TOKEN)
    try:
        with grpc.insecure_channel(server.address) as channel:
            translator = pb_grpc.TranslatorStub(channel)
            generator = pb_grpc.GeneratorStub(channel)
            models = pb_grpc.ModelsStub(channel)
            calls: dict[str, Callable[[Any], object]] = {
                "Translate": lambda md: translator.Translate(
                    pb.TranslateRequest(texts=["x"]), metadata=md, timeout=5
                ),
                "Generate": lambda md: list(
                    generator.Generate(pb.GenerateRequest(prompt="x"), metadata=md, timeout=5)
                ),
                "Reload": lambda md: models.Reload(pb.ReloadRequest(), metadata=md, timeout=5),
            }
            for headers in ((wrong, right), (right, wrong), (right, right)):
                for call in calls.values():
                    with pytest.raises(grpc.RpcError) as error:
                        call([("authorization", value) for value in headers])
                    assert _code(error) == grpc.StatusCode.UNAUTHENTICATED
                    assert error.value.details() == (  # type: ignore[attr-defined]
                        "2 `authorization` metadata headers: exactly one "
                        "`authorization: Bearer <token>` header is allowed"
                    )
            assert server.backend.requests == []
            for call in calls.values():  # one header with the token is served
                call([("authorization", right)])
        assert [r.text for r in server.backend.requests] == ["x", "x"]
        for method in calls:
            assert server.counter(method, "unknown", "UNAUTHENTICATED") == 3
    finally:
        server.stop()


def test_before_the_models_load_inference_is_unavailable_and_model_calls_answer() -> None:
    """Until the backend's start() returns, Translate answers UNAVAILABLE ("models are
    loading") without reaching the backend; the public Models calls skip that admission
    and answer OK. Once started, Translate serves."""

    class SlowStart(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.starting = threading.Event()
            self.loaded = threading.Event()

        async def start(self) -> ReloadSummary:
            self.starting.set()
            while not self.loaded.is_set():
                await asyncio.sleep(0.01)
            return await super().start()

    backend = SlowStart()
    settings = load_settings(port=0, metrics_port=0, drain_grace_s=1)
    metrics = Metrics()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def make() -> InferenceServer:
        return InferenceServer(settings, backend, metrics)  # type: ignore[arg-type]

    server = asyncio.run_coroutine_threadsafe(make(), loop).result(10)
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        assert backend.starting.wait(10)  # listening; the backend is loading
        with Client(f"127.0.0.1:{server.port}", timeout=5) as c:
            with pytest.raises(grpc.RpcError) as error:
                c.translate("x")
            assert _code(error) == grpc.StatusCode.UNAVAILABLE
            assert "models are loading" in error.value.details()  # type: ignore[attr-defined]
            with pytest.raises(grpc.RpcError) as error:
                list(c.generate("x", stream=True))
            assert _code(error) == grpc.StatusCode.UNAVAILABLE
            assert backend.requests == []  # never called
            assert [m.name for m in c.list_models()] == ["en-es", "en-lm"]
            assert c.describe_model("en-es").name == "en-es"
            assert list(c.reload().loaded) == ["en-es:2"]
            assert not server.transport.ready
            backend.loaded.set()
            started.result(10)
            assert c.translate("x").translations[0].hypotheses[0].text == "X"
        labels = {"method": "Translate", "model": "en-es", "code": "UNAVAILABLE"}
        assert metrics.registry.get_sample_value("inference_requests_total", labels) == 1
        labels = {"method": "Translate", "model": "en-es", "reason": "loading"}
        assert metrics.registry.get_sample_value("inference_request_failures_total", labels) == 1
    finally:
        backend.loaded.set()
        asyncio.run_coroutine_threadsafe(server.drain(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_sigterm_while_the_models_load_stops_without_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A drain that starts before the models are loaded ends the server: start() returns
    without SERVING or a "serving" line once the backend's start comes back."""
    caplog.set_level(logging.INFO, logger="service.server")

    class SlowStart(FakeBackend):
        async def start(self) -> ReloadSummary:
            await loaded.wait()
            return await super().start()

    async def main() -> None:
        settings = load_settings(port=0, metrics_port=0, drain_grace_s=1)
        server = InferenceServer(settings, SlowStart(), Metrics())  # type: ignore[arg-type]
        starting = asyncio.create_task(server.start())
        await asyncio.sleep(0.2)
        server.request_drain()
        await asyncio.wait_for(server.wait_stopped(), 10)
        loaded.set()
        await asyncio.wait_for(starting, 5)
        assert not server.transport.ready

    loaded = asyncio.Event()
    asyncio.run(main())
    messages = [r.getMessage() for r in caplog.records if r.name == "service.server"]
    assert "stopped" in messages and "serving" not in messages, messages


def test_a_sighup_while_the_models_load_is_not_dropped() -> None:
    """A version published while the models load (after their scan) and its SIGHUP: the
    reload runs, it is not dropped until the next SIGHUP."""

    class SlowStart(FakeBackend):
        def __init__(self) -> None:
            super().__init__()
            self.loaded = asyncio.Event()
            self.reloads = 0

        async def start(self) -> ReloadSummary:
            await self.loaded.wait()
            return await super().start()

        async def reload(self) -> ReloadSummary:
            self.reloads += 1
            return await super().reload()

    async def main() -> int:
        backend = SlowStart()
        default = signal.getsignal(signal.SIGHUP)
        serving = asyncio.create_task(
            serve(load_settings(port=0, metrics_port=0, drain_grace_s=1), backend)  # type: ignore[arg-type]
        )
        # Loading (start() waits for `loaded`) once serve() has its handler: before it, a
        # SIGHUP would end the test process.
        await _until(lambda: signal.getsignal(signal.SIGHUP) is not default)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0.2)
        backend.loaded.set()
        for _ in range(100):
            if backend.reloads:
                break
            await asyncio.sleep(0.05)
        assert backend.reloads == 1
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(serving, 10)

    assert asyncio.run(main()) == 0


def test_a_sighup_while_draining_is_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Counting(FakeBackend):
        reloads = 0

        async def reload(self) -> ReloadSummary:
            self.reloads += 1
            return await super().reload()

    async def main() -> int:
        backend = Counting()
        serving = asyncio.create_task(
            serve(load_settings(port=0, metrics_port=0, drain_grace_s=3), backend)  # type: ignore[arg-type]
        )
        await _until(lambda: "serving" in caplog.messages)
        os.kill(os.getpid(), signal.SIGTERM)
        await _until(lambda: "draining" in caplog.messages)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: "reload signal ignored: the server is draining" in caplog.messages)
        assert backend.reloads == 0
        return await asyncio.wait_for(serving, 10)

    caplog.set_level(logging.INFO, logger="service.server")
    assert asyncio.run(main()) == 0


class GatedReload(FakeBackend):
    """Reloads wait for `go` (set from the test) and are counted; once the drain began,
    refused as Scheduler.reload refuses them once stop() or stop_loading() came."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.stopping = False
        self.reloads = 0

    async def reload(self) -> ReloadSummary:
        self.reloads += 1
        if self.stopping:
            raise Unavailable("the scheduler is stopping; reload refused", reason="draining")
        await self.go.wait()
        return await super().reload()

    def stop_loading(self) -> None:
        self.stopping = True
        super().stop_loading()

    async def close(self) -> None:
        self.stopping = True
        await super().close()


def test_a_reload_still_queued_when_the_drain_begins_ends_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGHUPs in a row queue their reloads (one at a time); one still queued at SIGTERM
    meets a stopping scheduler (Unavailable, draining) and is ignored like a SIGHUP during
    the drain: it was logged as an ERROR "reload failed" with a traceback, at the end of
    a clean stop."""

    async def main() -> int:
        backend = GatedReload()
        serving = asyncio.create_task(
            serve(load_settings(port=0, metrics_port=0, drain_grace_s=1), backend)  # type: ignore[arg-type]
        )
        await _until(lambda: "serving" in caplog.messages)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: backend.reloads == 1)
        os.kill(os.getpid(), signal.SIGHUP)  # waits for the first one's end
        await asyncio.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        await _until(lambda: backend.stopping)
        backend.go.set()
        await _until(lambda: backend.reloads == 2)
        code = await asyncio.wait_for(serving, 10)
        await asyncio.sleep(0.1)  # the refused reload's end is logged
        return code

    caplog.set_level(logging.INFO, logger="service.server")
    assert asyncio.run(main()) == 0
    assert "reload not run: the server is draining" in caplog.messages
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_burst_of_sighups_runs_one_reload_after_the_running_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Signals that come while a SIGHUP's reload still waits for its turn join it (it scans
    after them anyway): 100 SIGHUPs ran 100 reloads one after another."""

    async def main() -> int:
        backend = GatedReload()
        serving = asyncio.create_task(
            serve(load_settings(port=0, metrics_port=0, drain_grace_s=1), backend)  # type: ignore[arg-type]
        )
        await _until(lambda: "serving" in caplog.messages)
        os.kill(os.getpid(), signal.SIGHUP)
        await _until(lambda: backend.reloads == 1)
        for _ in range(5):
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.02)
        backend.go.set()
        await _until(lambda: caplog.messages.count("reloaded") == 2)
        await asyncio.sleep(0.2)
        assert backend.reloads == 2
        assert caplog.messages.count("reload signal joins the reload waiting for its turn") == 4
        os.kill(os.getpid(), signal.SIGHUP)  # none waits now: a reload of its own
        await _until(lambda: caplog.messages.count("reloaded") == 3)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(serving, 10)

    caplog.set_level(logging.INFO, logger="service.server")
    assert asyncio.run(main()) == 0


class SlowReload(FakeBackend):
    """A reload that waits for `loaded` (set from the test), then succeeds or fails."""

    def __init__(self, fails: bool = False) -> None:
        super().__init__()
        self.loaded = asyncio.Event()
        self.fails = fails
        self.outcome = ""

    async def reload(self) -> ReloadSummary:
        try:
            await self.loaded.wait()
        except asyncio.CancelledError:
            self.outcome = "cut"
            raise
        self.outcome = "done"
        if self.fails:
            raise OSError("the disk is gone")
        return await super().reload()


def test_a_reload_runs_to_its_end_when_its_caller_gives_up() -> None:
    """A Reload call past its deadline (a `reload --timeout` shorter than a model's load)
    leaves the reload running: cut between loading a version and starting it, the version
    stayed listed but never served, and the next reload retired the one it replaces."""
    backend = SlowReload()
    server = InProcessServer(lambda _: backend)
    try:
        with Client(server.address, timeout=0.3) as c, pytest.raises(grpc.RpcError) as error:
            c.reload()
        assert _code(error) == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait(lambda: server.server.transport.in_flight == 0)  # the server gave up too
        server.loop.call_soon_threadsafe(backend.loaded.set)
        _wait(lambda: backend.outcome != "")
        assert backend.outcome == "done"
    finally:
        server.stop()


def test_a_reload_that_fails_after_its_caller_gave_up_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = SlowReload(fails=True)
    server = InProcessServer(lambda _: backend)
    try:
        with Client(server.address, timeout=0.3) as c, pytest.raises(grpc.RpcError):
            c.reload()
        server.loop.call_soon_threadsafe(backend.loaded.set)
        _wait(lambda: "reload failed: the disk is gone" in caplog.text)
    finally:
        server.stop()


def test_a_drain_that_fails_still_ends_the_process_with_exit_code_1(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend whose close raises: the drain is logged as failed and serve returns 1,
    instead of waiting forever for a stop that never comes (then SIGKILL)."""

    class BrokenClose(FakeBackend):
        async def close(self) -> None:
            raise RuntimeError("model loop died")

    async def main() -> int:
        serving = asyncio.create_task(
            serve(load_settings(port=0, metrics_port=0, drain_grace_s=0.2), BrokenClose())  # type: ignore[arg-type]
        )
        # Serving, its SIGTERM handler installed: a fixed sleep may end before (and the
        # SIGTERM the test process).
        await _until(lambda: any(r.getMessage() == "serving" for r in caplog.records))
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(serving, 10)

    with caplog.at_level(logging.INFO, logger="service.server"):
        assert asyncio.run(main()) == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "service.server"]
    assert "serving" in messages and "drain failed; stopping now" in messages, messages


def test_an_open_health_watch_ends_with_the_drain_instead_of_holding_it() -> None:
    """A Watch gets each status change, then NOT_SERVING and its end when the drain starts:
    the stop no longer waits the whole grace for it (grpcio-health-checking's never ends)."""
    server = InProcessServer(drain_grace_s=20)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
            assert _code(unknown) == grpc.StatusCode.NOT_FOUND
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            later = stub.Watch(health_pb2.HealthCheckRequest(service="later"), timeout=30)
            assert next(later).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            server.call(server.server.health.set("later", health_pb2.HealthCheckResponse.SERVING))
            assert next(later).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            server.call(server.server.drain())
            assert time.monotonic() - started < 10  # the grace is 20 s
            for stream in (watch, later):
                assert [r.status for r in stream] == [health_pb2.HealthCheckResponse.NOT_SERVING]
                assert stream.code() == grpc.StatusCode.OK
    finally:
        server.stop()


def test_a_call_longer_than_the_drain_grace_outlives_its_connections_max_age() -> None:
    """A connection at its max age takes no new calls (GOAWAY), and the calls running on it
    have max_connection_age_grace_s to end, not the drain's grace: before, a call running
    over max(drain_grace_s, 1 s) then was cut UNAVAILABLE and counted as the client's
    cancel."""
    server = InProcessServer(max_connection_age_s=1, max_connection_age_grace_s=30, drain_grace_s=0)
    try:
        with Client(server.address, timeout=20) as c:
            in_flight = c.translator.Translate.future(pb.TranslateRequest(texts=["block me"]))
            _wait(lambda: any(r.text == "block me" for r in server.backend.requests))
            time.sleep(3.5)  # past the age (± 10 % in grpc) and the old 1 s grace
            assert not in_flight.done()
            server.unblock()
            assert in_flight.result(10).translations[0].hypotheses[0].text == "BLOCK ME"
            assert c.translate("after").translations[0].hypotheses[0].text == "AFTER"
        assert server.counter("Translate", "en-es", "OK") == 2
    finally:
        server.stop()


def test_drain_refuses_new_calls_and_finishes_in_flight_ones() -> None:
    """While draining: NOT_SERVING, new inference calls UNAVAILABLE, the call in flight
    finishes. ListModels and DescribeModel skip the drain's refusal (public calls); Reload
    is public too, but refuses itself while the server drains."""
    server = InProcessServer()
    try:
        with Client(server.address, timeout=10) as c:
            in_flight = c.translator.Translate.future(pb.TranslateRequest(texts=["block me"]))
            _wait(lambda: any(r.text == "block me" for r in server.backend.requests))
            drained = server.submit(server.server.drain())
            _wait(lambda: server.server.transport.draining)
            assert _health(server.address) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as error:
                c.translate("new call")
            assert _code(error) == grpc.StatusCode.UNAVAILABLE
            assert [m.name for m in c.list_models()] == ["en-es", "en-lm"]
            assert c.describe_model("en-lm").task == "generation"
            with pytest.raises(grpc.RpcError) as error:
                c.reload()
            assert _code(error) == grpc.StatusCode.UNAVAILABLE
            assert "reload refused" in error.value.details()  # type: ignore[attr-defined]
            assert not drained.done()
            server.unblock()
            assert in_flight.result(10).translations[0].hypotheses[0].text == "BLOCK ME"
            drained.result(10)
            assert server.backend.closed
        assert server.counter("ListModels", "all", "OK") == 1
        assert server.counter("DescribeModel", "en-lm", "OK") == 1
    finally:
        server.stop()


def test_a_drain_without_grace_and_no_call_in_flight_cancels_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """drain_grace_s=0 gives calls in flight no time; with none in flight, there is nothing
    to cancel and no "drain grace over" warning."""
    caplog.set_level(logging.INFO, logger="service.server")
    server = InProcessServer(drain_grace_s=0)
    server.stop()
    messages = [r.getMessage() for r in caplog.records if r.name == "service.server"]
    assert "stopped" in messages and "drain grace over; cancelling calls" not in messages


@pytest.mark.parametrize(("health_checked", "retries"), [(True, 0), (False, 0), (False, 1)])
def test_a_health_checked_client_stops_calling_a_draining_replica(
    health_checked: bool, retries: int
) -> None:
    """Two replicas, one draining (its health NOT_SERVING, its new calls UNAVAILABLE): a
    client with client-side health checks sends every call to the other at once; a plain
    round_robin client keeps picking the draining one, unless it retries UNAVAILABLE (the
    retry goes to the next replica)."""
    draining, serving = InProcessServer(), InProcessServer()
    target = f"ipv4:{draining.address},{serving.address}"
    try:
        with Client(target, timeout=10, health_checked=health_checked, retries=retries) as c:
            for _ in range(50):  # until both replicas take calls (both connected)
                c.translate("warm")
                if draining.backend.requests and serving.backend.requests:
                    break
            assert draining.backend.requests and serving.backend.requests
            # A call in flight keeps the draining replica up, refusing new calls, meanwhile.
            with Client(draining.address, timeout=10) as direct:
                in_flight = direct.translator.Translate.future(
                    pb.TranslateRequest(texts=["block me"])
                )
                _wait(lambda: any(r.text == "block me" for r in draining.backend.requests))
                drained = draining.submit(draining.server.drain())
                _wait(
                    lambda: _health(draining.address) == health_pb2.HealthCheckResponse.NOT_SERVING
                )
                time.sleep(0.5)  # the client's health watch sees it
                codes = []
                for _ in range(6):
                    try:
                        c.translate("after")
                        codes.append(grpc.StatusCode.OK)
                    except grpc.RpcError as error:
                        codes.append(error.code())  # type: ignore[attr-defined]
                assert not drained.done()
                draining.unblock()
                in_flight.result(10)
                drained.result(15)
        if health_checked or retries:
            assert codes == [grpc.StatusCode.OK] * 6
        else:
            assert grpc.StatusCode.UNAVAILABLE in codes
        if retries:  # the draining replica refused some attempts, each one counted
            assert draining.failures("Translate", "en-es", "draining") >= 1
    finally:
        draining.stop()
        serving.stop()


def test_a_retrying_client_gets_past_unavailable_and_streams_no_token_twice(
    fake: InProcessServer,
) -> None:
    refused = fake.failures("Translate", "en-es", "draining")
    stream_refused = fake.failures("TranslateStream", "en-es", "draining")
    with Client(fake.address, timeout=10, retries=2) as c:
        fake.backend.refuse = 2
        assert c.translate("in the beginning").translations[0].hypotheses[0].text == (
            "IN THE BEGINNING"
        )
        fake.backend.refuse = 1
        chunks = list(c.translate_stream("let there be light"))
        assert "".join(chunk.text for chunk in chunks) == "LET THERE BE LIGHT"
        fake.backend.refuse = 3  # one more than it retries
        with pytest.raises(grpc.RpcError) as error:
            c.translate("darkness")
        assert _code(error) == grpc.StatusCode.UNAVAILABLE
    with Client(fake.address, timeout=10) as c:  # no retries by default
        fake.backend.refuse = 1
        with pytest.raises(grpc.RpcError) as error:
            c.translate("darkness")
        assert _code(error) == grpc.StatusCode.UNAVAILABLE
    assert fake.backend.refuse == 0
    assert fake.failures("Translate", "en-es", "draining") == refused + 2 + 3 + 1
    assert fake.failures("TranslateStream", "en-es", "draining") == stream_refused + 1


def test_retries_stop_while_most_attempts_fail(fake: InProcessServer) -> None:
    """A backend that refuses every call gets about one attempt per call once the
    channel's retry tokens are spent (20 attempts for 12 calls here), not retries + 1."""
    before = fake.failures("Translate", "en-es", "draining")
    fake.backend.refuse = 10_000
    try:
        with Client(fake.address, timeout=10, retries=4) as c:
            for _ in range(12):
                with pytest.raises(grpc.RpcError) as error:
                    c.translate("darkness")
                assert _code(error) == grpc.StatusCode.UNAVAILABLE
    finally:
        fake.backend.refuse = 0
    attempts = fake.failures("Translate", "en-es", "draining") - before
    assert 12 <= attempts <= 25 < 12 * 5


def test_retries_are_bounded_by_grpcs_cap() -> None:
    for retries in (-1, 5):
        with pytest.raises(ValueError, match=r"retries: must be a whole number in \[0, 4\]"):
            Client("127.0.0.1:1", retries=retries)
    Client("127.0.0.1:1", retries=4).close()


def test_server_options_bound_messages_and_connection_age() -> None:
    from service.server import server_options

    options = dict(
        server_options(load_settings(max_message_bytes=1 << 20, max_connection_age_s=60))
    )
    # grpc reads up to twice the limit: the transport refuses what is over it, counted
    assert options["grpc.max_receive_message_length"] == 2 << 20
    assert options["grpc.max_send_message_length"] == 1 << 20
    assert options["grpc.max_connection_age_ms"] == 60_000
    assert options["grpc.max_connection_age_grace_ms"] == 120_000
    assert options["grpc.so_reuseport"] == 0
    assert "grpc.max_connection_age_ms" not in dict(
        server_options(load_settings(max_connection_age_s=0))
    )
    # grpc sheds calls waiting for the event loop only past what the server holds itself
    # (tests/service/test_server_reading.py has the burst), never earlier than by default.
    pending = dict(server_options(load_settings(max_calls=4096)))
    assert pending["grpc.server.max_pending_requests"] == 4096
    assert pending["grpc.server.max_pending_requests_hard_limit"] == 8192
    small = dict(server_options(load_settings(max_calls=200, max_queue=64, max_batch_size=32)))
    assert small["grpc.server.max_pending_requests"] == 1000
    assert small["grpc.server.max_pending_requests_hard_limit"] == 3000


def test_json_logs_carry_the_request_id() -> None:
    import io
    import json
    import logging

    from service import logging as json_logging
    from service.logging import request_id_var

    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    json_logging.configure("INFO", stream)
    token = request_id_var.set("rid-1")
    try:
        logging.getLogger("test").info("hello %s", "world", extra={"model": "en-es"})
    finally:
        request_id_var.reset(token)
        root.handlers[:] = handlers
        root.setLevel(level)
    entry = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert entry["message"] == "hello world" and entry["request_id"] == "rid-1"
    assert entry["model"] == "en-es" and entry["level"] == "INFO"


def test_grpcs_error_for_an_answer_its_gone_client_never_got_is_one_info_line() -> None:
    """grpc logs an ERROR with a traceback when a unary answer cannot go out because the
    client went away (its connection closed with answers unread): an INFO line naming the
    method instead. A batch grpc refused to start (a misuse of the call) stays an ERROR."""
    import io
    import json
    import logging

    from grpc._cython import cygrpc

    from service import logging as json_logging

    stream = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    json_logging.configure("INFO", stream)
    grpc_log = logging.getLogger(json_logging.GRPC_LOGGER)
    method = "/inference.v1.Translator/Translate"
    message = f"ExecuteBatchError raised in core by servicer method [{method}]"  # grpc's
    try:
        for error in (
            cygrpc.ExecuteBatchError('Failed "execute_batch": (<SendMessageOperation>,)'),
            cygrpc.ExecuteBatchError("Failed grpc_call_start_batch: 8 with grpc_call_error"),
        ):
            try:
                raise error
            except cygrpc.ExecuteBatchError:
                grpc_log.exception(message)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    gone, misuse = (json.loads(line) for line in stream.getvalue().strip().splitlines()[-2:])
    assert gone["level"] == "INFO" and "exception" not in gone
    assert gone["message"] == f"a call's answer was not sent: its client had gone ({method})"
    assert misuse["level"] == "ERROR" and "grpc_call_start_batch" in misuse["exception"]


def test_the_metrics_endpoint_drops_a_connection_that_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its server holds a thread per connection: one that sends nothing is closed after
    METRICS_READ_TIMEOUT_S instead of holding its thread for good; scrapes still work."""
    import socket
    import urllib.request

    from service import server as server_module

    monkeypatch.setattr(server_module, "METRICS_READ_TIMEOUT_S", 0.5)
    server = InProcessServer(metrics_port=free_port())
    try:
        port = server.server.metrics_port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
            started = time.monotonic()
            assert idle.recv(1) == b""  # the server closed it
            assert time.monotonic() - started < 5
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            assert b"inference_requests_total" in page.read()
    finally:
        server.stop()
