"""loadtest.stalled against a real server: what calls that never finish their request can
make it hold is bounded by its settings."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner, Result

from loadtest import stalled
from service.client import Client
from tests.service.test_server_transport import InProcessServer

pytest.importorskip("h2", reason="loadtest.stalled needs the h2 package (the dev extra)")

CLAIM = 256 << 10
WINDOW = 65_535  # HTTP/2's default stream window, what the server keeps (no BDP growth)


def _cli(server: InProcessServer, *args: str) -> Result:
    """`python -m loadtest.stalled --target <server> ARGS`, run in this process."""
    return CliRunner().invoke(stalled.app, ["--target", f"127.0.0.1:{server.server.port}", *args])


def test_stalled_calls_hold_a_window_each_and_over_max_calls_are_refused() -> None:
    server = InProcessServer(
        max_calls=32, max_queue=16, max_batch_size=8, max_reading_calls=2,
        request_read_timeout_s=30,
    )  # fmt: skip
    try:
        result = stalled.run("127.0.0.1", server.server.port, 40, CLAIM, hold_s=2.0)
    finally:
        server.stop()
    sent_all = CLAIM + 4
    # The two being read took all but the last byte; every other held call no more than
    # one window, however much it claimed.
    assert result.let_in.count(sent_all) == 2
    assert max(n for n in result.let_in if n != sent_all) <= WINDOW
    refusal = (
        "8 the server holds 32 calls, its limit (SERVE_MAX_CALLS); retry later or on "
        "another replica"
    )
    assert result.statuses == {refusal: 8}
    assert result.open == 32
    assert server.failures("Translate", "unknown", "too_many_calls") == 8


def test_the_cli_reports_and_refuses_a_remote_target() -> None:
    server = InProcessServer(request_read_timeout_s=30)
    try:
        out = _cli(server, "--calls", "3", "--claim-bytes", "1000", "--hold-s", "1")
    finally:
        server.stop()
    assert out.exit_code == 0, out.output
    assert "3 calls, each claiming 1,000 bytes: 3 let in all but the last byte" in out.output
    assert "3 still open when the connection closed" in out.output
    assert "command: python -m loadtest.stalled" in out.output
    refused = CliRunner().invoke(stalled.app, ["--target", "10.1.2.3:50051"])
    assert refused.exit_code != 0
    assert "not a loopback address" in str(refused.exception) + refused.output
    for args, error in (
        (("--flood", "ping", "--unread-answers"), "two tests: choose one"),
        (("--rate", "50"), "--rate and --method go with --unread-answers"),
        (("--method", "health", "--flood", "ping"), "--rate and --method go with"),
    ):
        mixed = _cli(server, *args)  # refused before it connects: the server is stopped
        assert mixed.exit_code != 0, args
        assert error in mixed.output, (args, mixed.output)


def test_unread_answers_are_reported_held_up_to_max_calls_and_the_rest_refused() -> None:
    server = InProcessServer(max_calls=16, max_queue=8, max_batch_size=8)
    try:
        out = _cli(server, "--unread-answers", "--calls", "20", "--rate", "200", "--hold-s", "1")
    finally:
        server.stop()
    assert out.exit_code == 0, out.output
    assert "20 whole /inference.v1.Translator/Translate requests at 200/s" in out.output
    assert "4 answered: 8 the server holds 16 calls, its limit (SERVE_MAX_CALLS)" in out.output
    assert "16 still open when the connection closed" in out.output
    assert server.counter("Translate", "en-es", "OK") == 16


def _frame(kind: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + bytes(4) + payload


def test_the_flood_finds_a_goaway_followed_by_frames_h2_refuses() -> None:
    """The GOAWAY read from the server's bytes, frame by frame, whatever follows it (a
    PING's ACK, which h2 refuses after a GOAWAY) and however the reads split the frames."""
    goaway = _frame(0x7, bytes(4) + (11).to_bytes(4, "big") + b"too_many_pings")
    stream = _frame(0x4) + _frame(0x6, bytes(8)) + goaway + _frame(0x6, bytes(8))
    assert stalled._goaway_in(stream) == ("GOAWAY ENHANCE_YOUR_CALM too_many_pings", 9 + 17 + 31)
    half = 9 + 17 + 20  # the GOAWAY cut mid-frame: not found yet, parsed up to it
    assert stalled._goaway_in(stream[:half]) == (None, 9 + 17)
    assert stalled._goaway_in(stream, 9 + 17)[0] == "GOAWAY ENHANCE_YOUR_CALM too_many_pings"
    assert stalled._goaway_in(_frame(0x4) + _frame(0x6, bytes(8))) == (None, 9 + 17)


def test_a_ping_flood_is_cut_off_by_the_server() -> None:
    server = InProcessServer()
    try:
        result = stalled.flood("127.0.0.1", server.server.port, stalled.Flood.ping, 50_000)
        with Client(server.address) as client:  # others are served
            assert client.translate("still here").translations[0].hypotheses[0].text
    finally:
        server.stop()
    assert result.closed is not None and "too_many_pings" in result.closed
    assert result.sent < 50_000


def test_a_rapid_reset_flood_is_reported_with_the_server_cpu_it_cost() -> None:
    server = InProcessServer()
    try:
        out = _cli(server, "--flood", "reset", "--calls", "2000", "--pid", str(os.getpid()))
        with Client(server.address) as client:
            assert client.translate("still here").translations[0].hypotheses[0].text
    finally:
        server.stop()
    assert out.exit_code == 0, out.output
    assert "2,000 of 2,000 rapid resets sent in" in out.output
    assert (
        "the server kept it open" in out.output or "the server ended the connection" in out.output
    )
    cpu = float(out.output.split("server CPU time meanwhile (and 1 s after): ")[1].split()[0])
    assert cpu > 0


def test_unread_answers_end_with_the_connection_at_its_max_age_on_either_port() -> None:
    """grpc holds an unread answer until the connection closes: the health port's
    connections age out as the gRPC port's do, else its callers could hold its health
    calls (and fail the probes) for good; the tool reports the close, not a traceback."""
    from tests.service.test_server_reading import _free_port

    server = InProcessServer(
        health_port=_free_port(), max_connection_age_s=1, max_connection_age_grace_s=1
    )
    try:
        for port in (server.server.port, server.server.health_port):
            result = stalled.unread(
                "127.0.0.1", port, 3, rate=100, hold_s=6, method=stalled.HEALTH_CHECK
            )
            assert result.closed, port
            assert result.calls == 3
    finally:
        server.stop()
