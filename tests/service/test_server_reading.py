"""How the server reads requests: nothing before the token and the call count are checked,
a bounded number at once, each within a timeout, and none left hanging at a drain; and how
many connections it keeps.

A call whose request never arrives is made with grpc's stream-unary form and a request
iterator that never yields: the server sees what it sees of a client that stalls mid-way."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from service.client import Client, Failure, failure
from service.gen.inference.v1 import inference_pb2 as pb
from tests.service.test_server_transport import TOKEN, InProcessServer, _code, _wait

TRANSLATE = "/inference.v1.Translator/Translate"


class Stalled:
    """Calls that start and never send their request, until `release`."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.method = self.channel.stream_unary(
            TRANSLATE,
            request_serializer=pb.TranslateRequest.SerializeToString,
            response_deserializer=pb.TranslateResponse.FromString,
        )
        self._stop = threading.Event()

    def _requests(self) -> Iterator[pb.TranslateRequest]:
        self._stop.wait()
        yield from ()

    def start(self, timeout: float = 30) -> Any:
        """One stalled call (a grpc future)."""
        return self.method.future(self._requests(), timeout=timeout)

    def release(self) -> None:
        self._stop.set()
        self.channel.close()


def _open_calls(server: InProcessServer) -> float:
    return server.metrics.registry.get_sample_value("inference_open_calls") or 0.0


def _unread_behind(port: int, calls: int, rate: float, **options: Any) -> Callable[[], Any]:
    """Run loadtest.stalled.unread on `port` in a thread; the function returned joins it
    and gives its UnreadResult."""
    from loadtest import stalled

    result: list[stalled.UnreadResult] = []
    worker = threading.Thread(
        target=lambda: result.append(
            stalled.unread("127.0.0.1", port, calls, rate=rate, hold_s=3, **options)
        )
    )
    worker.start()

    def joined() -> stalled.UnreadResult:
        worker.join(15)
        return result[0]

    return joined


def test_a_request_that_never_arrives_is_refused_at_the_read_timeout() -> None:
    server = InProcessServer(request_read_timeout_s=0.5)
    stalled = Stalled(server.address)
    try:
        started = time.monotonic()
        call = stalled.start()
        with pytest.raises(grpc.RpcError) as error:
            call.result(10)
        assert time.monotonic() - started >= 0.5
        assert _code(error) == grpc.StatusCode.DEADLINE_EXCEEDED
        details = error.value.details()  # type: ignore[attr-defined]
        assert "had not arrived 0.5 s after the server began reading it" in details
        assert "SERVE_REQUEST_READ_TIMEOUT_S, not the call's deadline" in details
        # No work was spent on it, as its details say (a client's code reads `admitted`).
        assert failure(error.value) == Failure("REQUEST_TIMEOUT", {"admitted": "false"}, {})
        assert server.failures("Translate", "unknown", "request_timeout") == 1
        _wait(lambda: _open_calls(server) == 0)
        # A call that sends its request is unaffected.
        with Client(server.address) as c:
            assert c.translate("on time").translations[0].hypotheses[0].text == "ON TIME"
    finally:
        stalled.release()
        server.stop()


def test_a_call_that_ends_without_a_request_is_invalid_argument() -> None:
    server = InProcessServer()
    try:
        with grpc.insecure_channel(server.address) as channel:
            empty = channel.stream_unary(
                TRANSLATE, response_deserializer=pb.TranslateResponse.FromString
            )
            with pytest.raises(grpc.RpcError) as error:
                empty(iter(()), timeout=10)
        assert _code(error) == grpc.StatusCode.INVALID_ARGUMENT
        assert "the call ended without a request message" in error.value.details()  # type: ignore[attr-defined]
    finally:
        server.stop()


def test_calls_over_max_calls_are_refused_at_once_and_the_room_comes_back() -> None:
    server = InProcessServer(max_calls=8, max_queue=4, max_batch_size=4)
    stalled = Stalled(server.address)
    try:
        calls = [stalled.start() for _ in range(8)]
        _wait(lambda: _open_calls(server) == 8)
        limit = server.metrics.registry.get_sample_value("inference_open_calls_limit")
        assert limit == 8  # what the alert compares the open calls with
        with Client(server.address, timeout=10) as c:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as error:
                c.translate("one too many")
            assert time.monotonic() - started < 5  # at once: not after the read timeout
            assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "holds 8 calls, its limit (SERVE_MAX_CALLS)" in error.value.details()  # type: ignore[attr-defined]
            assert server.failures("Translate", "unknown", "too_many_calls") == 1
            for call in calls:
                call.cancel()
            _wait(lambda: _open_calls(server) == 0)
            assert c.translate("room again").translations[0].hypotheses[0].text == "ROOM AGAIN"
    finally:
        stalled.release()
        server.stop()


@pytest.mark.parametrize("turns", [1, 2])
def test_read_turns_bound_the_requests_read_at_once(turns: int) -> None:
    """With one turn, a call whose request is ready waits for the stalled call holding it
    (refused at its timeout) and is then answered; with two, it is answered at once."""
    server = InProcessServer(max_reading_calls=turns, request_read_timeout_s=2)
    stalled = Stalled(server.address)
    try:
        holder = stalled.start()
        _wait(lambda: _open_calls(server) == 1)
        with Client(server.address, timeout=10) as c:
            answer = c.translate("ready")
        # The server had refused the holder (and counted it) by the time it answered?
        holder_refused_first = server.failures("Translate", "unknown", "request_timeout")
        assert answer.translations[0].hypotheses[0].text == "READY"
        with pytest.raises(grpc.RpcError) as error:
            holder.result(10)
        assert _code(error) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert holder_refused_first == (1 if turns == 1 else 0)
    finally:
        stalled.release()
        server.stop()


def test_a_caller_without_the_token_is_refused_before_its_request_is_read() -> None:
    """It takes no read turn: refused at once although its request never comes, while a
    caller with the token still gets the only turn."""
    server = InProcessServer(auth_token=TOKEN, max_reading_calls=1, request_read_timeout_s=30)
    anonymous = Stalled(server.address)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            anonymous.start().result(10)
        assert time.monotonic() - started < 5
        assert _code(error) == grpc.StatusCode.UNAUTHENTICATED
        assert server.failures("Translate", "unknown", "unauthenticated") == 1
        with Client(server.address, token=TOKEN, timeout=10) as c:
            assert c.translate("mine").translations[0].hypotheses[0].text == "MINE"
    finally:
        anonymous.release()
        server.stop()


def test_a_drain_refuses_calls_still_sending_their_request_instead_of_waiting() -> None:
    server = InProcessServer(request_read_timeout_s=60, drain_grace_s=20)
    stalled = Stalled(server.address)
    try:
        call = stalled.start(timeout=60)
        _wait(lambda: _open_calls(server) == 1)
        started = time.monotonic()
        server.call(server.server.drain())
        assert time.monotonic() - started < 10  # the grace is 20 s, the read timeout 60 s
        with pytest.raises(grpc.RpcError) as error:
            call.result(10)
        assert _code(error) == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in error.value.details()  # type: ignore[attr-defined]
        assert server.failures("Translate", "unknown", "draining") == 1
    finally:
        stalled.release()
        server.stop()


def test_calls_grpc_ends_before_their_request_is_read_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deadline passing while a call waits for a read turn is the server's doing
    (deadline_exceeded, in the error ratio); one passing while the request arrives is the
    caller's (request_timeout); a client going away while waiting is cancelled. None of
    them may go uncounted: a stalled sender holding the turns must show in the metrics."""
    caplog.set_level(logging.INFO, logger="service.server")
    server = InProcessServer(max_reading_calls=1, request_read_timeout_s=30)
    stalled = Stalled(server.address)
    try:
        holder = stalled.start(timeout=2)  # its own deadline passes while it holds the turn
        _wait(lambda: _open_calls(server) == 1)
        with Client(server.address, timeout=1) as c, pytest.raises(grpc.RpcError) as error:
            c.translate("waits for a turn")
        assert _code(error) == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait(lambda: server.failures("Translate", "unknown", "deadline_exceeded") == 1)
        assert server.counter("Translate", "unknown", "DEADLINE_EXCEEDED") == 1
        [line] = [r for r in caplog.records if "waited for a read turn" in r.getMessage()]
        assert len(getattr(line, "request_id", "")) == 32  # logged under its request id
        with grpc.insecure_channel(server.address) as channel:
            translate = channel.unary_unary(
                TRANSLATE, request_serializer=pb.TranslateRequest.SerializeToString
            )
            waiting = translate.future(pb.TranslateRequest(texts=["gives up"]))
            _wait(lambda: _open_calls(server) == 2)
            waiting.cancel()
            _wait(lambda: server.failures("Translate", "unknown", "cancelled") == 1)
        with pytest.raises(grpc.RpcError):
            holder.result(10)
        _wait(lambda: server.failures("Translate", "unknown", "request_timeout") == 1)
        _wait(lambda: _open_calls(server) == 0)
        assert server.counter("Translate", "unknown", "DEADLINE_EXCEEDED") == 2
    finally:
        stalled.release()
        server.stop()


def test_calls_whose_request_was_cut_short_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    """A client that goes away while sending its request, and a request over grpc's own
    size limit (2 x the max message size, refused by grpc itself), look alike to the
    handler: a request read as EOF, then grpc's cancellation. Both are counted and logged
    (request_cut, CANCELLED, under model unknown); they were in neither."""
    pytest.importorskip("h2", reason="loadtest.stalled needs the h2 package (the dev extra)")
    from loadtest import stalled

    caplog.set_level(logging.INFO, logger="service.server")
    server = InProcessServer(max_message_bytes=16384)
    try:
        host, port = server.address.rsplit(":", 1)
        stalled.run(host, int(port), calls=3, claim_bytes=1000, hold_s=0.5)  # then it closes
        _wait(lambda: server.failures("Translate", "unknown", "request_cut") == 3)
        with Client(server.address, timeout=5) as c, pytest.raises(grpc.RpcError) as error:
            c.translate("x" * 100_000)
        assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED  # grpc's own answer
        _wait(lambda: server.failures("Translate", "unknown", "request_cut") == 4)
        assert server.counter("Translate", "unknown", "CANCELLED") == 4
        lines = [r for r in caplog.records if "before its request arrived whole" in r.getMessage()]
        assert len(lines) == 4 and "over the 32,768 bytes grpc reads" in lines[0].getMessage()
        _wait(lambda: _open_calls(server) == 0)
    finally:
        server.stop()


def test_the_wait_for_a_read_turn_counts_in_the_request_duration() -> None:
    """inference_request_duration_seconds is the whole RPC: a call that waited for a read
    turn behind a stalled sender, and one refused at the read timeout, are observed with
    that wait, as their clients saw it (not from the moment their request was read)."""
    server = InProcessServer(max_reading_calls=1, request_read_timeout_s=3)
    stalled = Stalled(server.address)

    def duration(code: str, model: str) -> float:
        labels = {"method": "Translate", "model": model, "code": code}
        return (
            server.metrics.registry.get_sample_value(
                "inference_request_duration_seconds_sum", labels
            )
            or 0.0
        )

    try:
        holder = stalled.start()
        _wait(lambda: _open_calls(server) == 1)
        with Client(server.address, timeout=10) as c:
            started = time.monotonic()
            c.translate("ready")
            waited = time.monotonic() - started
        with pytest.raises(grpc.RpcError):
            holder.result(10)
        assert waited >= 1.0  # it waited for the holder's turn (slack for a loaded machine)
        assert duration("OK", "en-es") >= 0.5 * waited  # was the read-to-answer time alone
        assert duration("DEADLINE_EXCEEDED", "unknown") >= 2.9  # the read timeout, 3 s
    finally:
        stalled.release()
        server.stop()


# --- the open services (health, reflection): their own bounds (server.PublicReads) --------

HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _stalled_public(address: str, method: str, stop: threading.Event, timeout: float) -> Any:
    """A call of `method` that never sends its request (a grpc future)."""
    from grpc_health.v1 import health_pb2

    channel = grpc.insecure_channel(address)

    def requests() -> Iterator[Any]:
        stop.wait()
        yield from ()

    call = channel.stream_unary(
        method,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    ).future(requests(), timeout=timeout)
    call.add_done_callback(lambda _: channel.close())
    return call


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("port", ["main", "health"])
@pytest.mark.parametrize("method", [HEALTH_CHECK, "/grpc.health.v1.Health/Watch"])
def test_a_health_request_that_never_arrives_is_refused_at_the_read_timeout(
    port: str, method: str
) -> None:
    """grpc read a health request whole (up to 2 x max message size) for as long as its
    sender took, with no token and no count: any caller could fill the memory."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = InProcessServer(request_read_timeout_s=0.5, health_port=_free_port())
    address = server.address if port == "main" else f"127.0.0.1:{server.server.health_port}"
    stop = threading.Event()
    try:
        started = time.monotonic()
        call = _stalled_public(address, method, stop, timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            call.result(15)
        assert time.monotonic() - started < 5  # the server's read timeout, not the call's
        assert _code(error) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "had not arrived 0.5 s after the server began reading it" in error.value.details()  # type: ignore[attr-defined]
        with grpc.insecure_channel(address) as channel:  # one that sends its request is served
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
    finally:
        stop.set()
        server.stop()


def test_health_calls_sending_their_request_are_bounded_in_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service import server as server_module

    monkeypatch.setattr(server_module, "PUBLIC_MAX_READING", 2)
    server = InProcessServer(request_read_timeout_s=5)
    stop = threading.Event()
    try:
        held = [_stalled_public(server.address, HEALTH_CHECK, stop, timeout=20) for _ in range(2)]
        _wait(lambda: server.server.public_reads.reading == 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            _stalled_public(server.address, HEALTH_CHECK, stop, timeout=20).result(15)
        assert time.monotonic() - started < 3  # at once
        assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not any(call.done() for call in held)
    finally:
        stop.set()
        server.stop()


def test_open_health_watches_are_bounded_in_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc bounds no number of streams: watches (no token, 12-22 KiB each) could pile up."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service import server as server_module

    monkeypatch.setattr(server_module, "PUBLIC_MAX_STREAMS", 2)
    server = InProcessServer()
    try:
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=20) for _ in range(2)]
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as error:
                next(health.Watch(health_pb2.HealthCheckRequest(), timeout=20))
            assert _code(error) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == (
                health_pb2.HealthCheckResponse.SERVING
            )  # checks are not streams
            watches[0].cancel()
            _wait(lambda: server.server.public_reads.streams == 1)
            assert next(health.Watch(health_pb2.HealthCheckRequest(), timeout=20)).status == (
                health_pb2.HealthCheckResponse.SERVING
            )
    finally:
        server.stop()


def test_an_idle_reflection_stream_does_not_hold_up_health_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reflection client waits for its next request holding a read turn, up to the read
    timeout: its turns are apart from the health checks' (a probe would wait for them)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service import server as server_module

    monkeypatch.setattr(server_module, "PUBLIC_READ_TURNS", 1)
    server = InProcessServer(request_read_timeout_s=30)
    stop = threading.Event()

    def never() -> Iterator[bytes]:
        stop.wait()
        yield from ()

    try:
        with grpc.insecure_channel(server.address) as channel:
            reflection = channel.stream_stream(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            )(never(), timeout=30)
            _wait(lambda: server.server.public_reads.reading == 1)
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            reflection.cancel()
    finally:
        stop.set()
        server.stop()


def test_a_burst_of_calls_is_held_by_the_server_not_shed_by_grpc() -> None:
    """grpc cancels calls it holds before the event loop takes them past 1000 (at random)
    and 3000 (all), as a bare CANCELLED in no metric: a burst within max_calls reaches the
    server whole, and what is over max_calls is the server's to refuse, counted."""
    pytest.importorskip("h2", reason="the raw HTTP/2 client needs the h2 package (dev extra)")
    from loadtest import stalled

    server = InProcessServer(max_calls=4096, request_read_timeout_s=30)
    try:
        result = stalled.run("127.0.0.1", server.server.port, 3500, 1000, hold_s=3.0)
    finally:
        server.stop()
    assert result.statuses == {}
    assert result.open == 3500


# --- answers a caller never reads --------------------------------------------------------


def test_a_call_whose_answer_is_never_read_stays_counted_until_its_connection_closes() -> None:
    """grpc holds an answer its caller does not read until the connection closes: the
    call stays counted in SERVE_MAX_CALLS until then, so such calls cannot pile up."""
    pytest.importorskip("h2", reason="the raw HTTP/2 client needs the h2 package (dev extra)")

    server = InProcessServer(max_calls=8, max_queue=4, max_batch_size=4)
    try:
        unread = _unread_behind(server.server.port, 3, rate=100)
        _wait(lambda: server.counter("Translate", "en-es", "OK") == 3)
        assert _open_calls(server) == 3  # answered, and still held: none was read
        result = unread()
        assert result.open == 3 and not result.statuses
        _wait(lambda: _open_calls(server) == 0)  # the connection closed: grpc let them go
    finally:
        server.stop()


def test_answers_never_read_are_bounded_in_bytes_not_only_in_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An answer can be up to max_message_bytes (a Translate with alignments): counted
    alone, 2,048 unread ones held up to 8 GiB of answers (about 3 × that of memory: 200
    answers of 4 MB grew a server by 2.4 GB). Past SERVE_MAX_ANSWER_BYTES new calls are
    refused, counted, and the room comes back as the connection closes."""
    pytest.importorskip("h2", reason="the raw HTTP/2 client needs the h2 package (dev extra)")
    import struct

    from loadtest import stalled

    request = pb.TranslateRequest(texts=[" ".join(["a"] * 250)])
    request.options.return_alignment = True  # 250 × 250 weights: about 256 KB an answer
    body = request.SerializeToString()
    monkeypatch.setattr(stalled, "_request", lambda _: struct.pack(">BI", 0, len(body)) + body)
    server = InProcessServer(max_answer_bytes=1 << 20)
    try:
        unread = _unread_behind(server.server.port, 8, rate=5)
        _wait(lambda: server.failures("Translate", "unknown", "too_many_calls") >= 1)
        assert server.server.transport.answer_bytes > 1 << 20  # refused only past it
        result = unread()
        # At least 5 answers (4 of them reach 1 MiB, not past it) were held, unread; the
        # rest were refused. A call admitted before the answer of the one before it came
        # is held too (the check is at admission), so on a busy machine a 6th may be.
        held = result.open
        assert 5 <= held < 8
        assert server.failures("Translate", "unknown", "too_many_calls") == 8 - held
        (message,) = result.statuses
        assert message.startswith("8 the server holds ")
        assert message.endswith(
            "bytes of answers not yet delivered, over its limit of 1,048,576 "
            "(SERVE_MAX_ANSWER_BYTES); retry later or on another replica"
        )
        _wait(lambda: _open_calls(server) == 0)  # the connection closed: grpc let them go
        assert server.server.transport.answer_bytes == 0
        assert _translates(server.address)
    finally:
        server.stop()


@pytest.mark.parametrize("port", ["main", "health"])
def test_unary_health_calls_whose_answers_are_never_read_are_bounded_per_port(
    monkeypatch: pytest.MonkeyPatch, port: str
) -> None:
    """Health checks need no token: unread answers (14 KiB each in grpc) piled up without
    a bound. Each port has its own, so a flood of one does not fail the other's probes."""
    pytest.importorskip("h2", reason="the raw HTTP/2 client needs the h2 package (dev extra)")
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from loadtest import stalled
    from service import server as server_module

    monkeypatch.setattr(server_module, "PUBLIC_MAX_CALLS", 4)
    server = InProcessServer(health_port=_free_port())
    flooded, other = server.server.port, server.server.health_port
    if port == "health":
        flooded, other = other, flooded
    try:
        unread = _unread_behind(flooded, 10, rate=100, method=stalled.HEALTH_CHECK)
        reads = server.server.public_reads if port == "main" else server.server.health_reads
        _wait(lambda: reads.calls == 4)  # the flooded port holds all it may
        with grpc.insecure_channel(f"127.0.0.1:{other}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        result = unread()
        assert result.statuses == {"8 4 health or reflection calls are open; retry later": 6}
        assert result.open == 4
        _wait(lambda: reads.calls == 0)
    finally:
        server.stop()


# --- connections -------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def test_connections_over_max_connections_are_closed_as_they_open() -> None:
    """Idle connections cost a file descriptor each: without a bound, enough of them take
    the last descriptor and every accept fails, calls and health checks alike."""
    import socket

    server = InProcessServer(max_connections=2)
    held: list[socket.socket] = []
    try:
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.server.port), timeout=5)
            sock.sendall(PREFACE)
            held.append(sock)
        answers = [sock.recv(64) for sock in held]
        assert [bool(a) for a in answers] == [True, True, False]  # SETTINGS, SETTINGS, closed
        held.pop().close()
        for sock in held:
            sock.close()
        # The room comes back as connections close.
        _wait(lambda: _translates(server.address))
    finally:
        for sock in held:
            sock.close()
        server.stop()


def _translates(address: str) -> bool:
    try:
        with Client(address, timeout=2) as c:
            return c.translate("again").translations[0].hypotheses[0].text == "AGAIN"
    except grpc.RpcError:
        return False


def test_an_open_file_limit_below_max_connections_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import resource

    from service.server import OWN_FILES, check_open_files

    caplog.set_level(logging.WARNING, logger="service.server")
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    check_open_files(1024 - OWN_FILES, 1)
    assert not caplog.records
    check_open_files(2048, 1)
    check_open_files(512, 2)
    assert [r.getMessage() for r in caplog.records] == [
        f"the open-file limit (1024) is below what max_connections lets clients open "
        f"({n} on {p} port(s), plus about {OWN_FILES} of the server's own): lower "
        "SERVE_MAX_CONNECTIONS or raise the limit (ulimit -n)"
        for n, p in ((2048, 1), (512, 2))
    ]
