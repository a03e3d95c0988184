"""`python -m loadtest.stalled`: fault tests of calls that never finish (the memory attacks
a gRPC server is open to when it holds what a client sends or is sent without a bound) and
of HTTP/2 floods (a CPU attack).

It opens `--calls` Translate calls on one plaintext HTTP/2 connection to a loopback
server. Each request claims `--claim-bytes` and is sent as far as HTTP/2 flow control lets
it, one byte short of the whole, and never finished. After `--hold-s` seconds it reports
how many bytes the server let in per call (what it holds for them), the statuses it sent,
and with `--pid` the server's resident memory before and after. A hold shorter than the
server's read timeout shows what calls waiting for a read turn hold; past it, refused calls
give their turns to waiting ones.

With `--unread-answers` the calls send whole requests instead (one short verse, at most 8
new tokens, or a health check with `--method health`), `--rate` of them a second, on a
connection whose stream windows are 0: the server cannot send any answer, and holds each
until the caller reads it or the connection closes.

With `--flood ping` or `--flood reset` it sends `--calls` PING frames, or calls reset as
soon as they are opened (HTTP/2 "rapid reset"), as fast as it can on one connection, and
reports whether the server ended the connection and, with `--pid`, the CPU time it spent.

Raw HTTP/2 (the `h2` package) because a gRPC client only sends whole messages, reads every
answer and sends neither floods.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import select
import shlex
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from loadtest.workload import check_target

app = typer.Typer(add_completion=False)


class Method(enum.Enum):
    """What --unread-answers calls."""

    translate = "translate"
    health = "health"


METHOD = "/inference.v1.Translator/Translate"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
VERSE = "In the beginning God created the heaven and the earth."
BURST = 200  # flood frames written between looks at what the server sent
FLOOD_SETTLE_S = 1.0
UNREAD_RATE = 200.0  # --unread-answers calls a second, by default


@dataclass(kw_only=True)
class HeldCalls:
    """What the server answered of the calls, and what that held of its memory."""

    calls: int
    statuses: dict[str, int] = field(default_factory=dict)  # "grpc-status message" → calls
    rss_before_mib: float | None = None
    rss_after_mib: float | None = None

    @property
    def open(self) -> int:
        """Calls the server still held at the end (no status, no reset)."""
        return self.calls - sum(self.statuses.values())


@dataclass(kw_only=True)
class StalledResult(HeldCalls):
    """What the server did with calls it never got a whole request for."""

    stopped_reading: bool  # the server stopped reading the connection before the end
    let_in: list[int]  # bytes the server let each call send (its flow-control windows)


@dataclass(kw_only=True)
class UnreadResult(HeldCalls):
    """What the server did with whole requests whose answers it could not send."""

    closed: bool  # the server closed the connection before the end


def rss_mib(pid: int) -> float:
    """Resident memory of process `pid` (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def _client(stream_window: int | None = None) -> Any:
    """A client HTTP/2 connection, its preface queued; `stream_window`: the stream windows
    it grants the server (0: no answer can be sent to it)."""
    import h2.config
    import h2.connection
    import h2.settings

    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    if stream_window is not None:
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window},
        )
    conn.initiate_connection()
    return conn


def _headers(host: str, port: int, method: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"), (":scheme", "http"), (":path", method),
        (":authority", f"{host}:{port}"), ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]  # fmt: skip


def _goaway(events: list[Any]) -> str | None:
    """The server's GOAWAY among `events`, as "GOAWAY <code> <reason>" (None: none)."""
    import h2.events

    for event in events:
        if isinstance(event, h2.events.ConnectionTerminated):
            why = (event.additional_data or b"").decode(errors="replace")
            code = getattr(event.error_code, "name", event.error_code)
            return f"GOAWAY {code} {why}".strip()
    return None


def _goaway_in(stream: bytes | bytearray, at: int = 0) -> tuple[str | None, int]:
    """The first GOAWAY among the frames of `stream` (the server's bytes from the start of
    the connection) from offset `at` on, as `_goaway` words it (None: none), and the offset
    of the first frame not yet whole. h2 refuses a frame that follows a GOAWAY in the same
    read (a PING's ACK after it: "RECV_PING in state CLOSED") and the GOAWAY's event is
    lost with the exception, so the flood reads the frames itself."""
    import h2.errors

    while at + 9 <= len(stream):  # a frame: length (3 bytes), type, flags, stream id (4)
        length, kind = int.from_bytes(stream[at : at + 3], "big"), stream[at + 3]
        if at + 9 + length > len(stream):
            break
        payload = bytes(stream[at + 9 : at + 9 + length])
        at += 9 + length
        if kind == 0x7 and len(payload) >= 8:  # GOAWAY: last stream id, code, debug data
            number = int.from_bytes(payload[4:8], "big")
            try:
                code: str | int = h2.errors.ErrorCodes(number).name
            except ValueError:
                code = number
            return f"GOAWAY {code} {payload[8:].decode(errors='replace')}".strip(), at
    return None, at


def _read_to_end(sock: socket.socket, conn: Any) -> list[Any]:
    """The events of what the server sent before it closed the connection, read after a
    failed send (it may have sent a GOAWAY first, still unread)."""
    import h2.exceptions

    events: list[Any] = []
    sock.settimeout(1.0)
    try:
        while raw := sock.recv(1 << 16):
            events += conn.receive_data(raw)
    except (OSError, h2.exceptions.ProtocolError):
        pass
    return events


def _note_statuses(events: list[Any], statuses: dict[int, str]) -> bool:
    """Note the grpc status (or the reset) of each stream that ended among `events`; True
    when the server ended the connection (GOAWAY)."""
    import h2.events

    for event in events:
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            headers = {str(k): str(v) for k, v in event.headers or ()}
            if "grpc-status" in headers and event.stream_id is not None:
                statuses[event.stream_id] = (
                    f"{headers['grpc-status']} {headers.get('grpc-message', '')}".strip()
                )
        elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
            statuses.setdefault(event.stream_id, f"reset {event.error_code}")
    return _goaway(events) is not None


def run(
    host: str, port: int, calls: int, claim_bytes: int, hold_s: float, pid: int | None = None
) -> StalledResult:
    """Open the calls, feed them for `hold_s` seconds, report (see the module's doc)."""
    before = rss_mib(pid) if pid is not None else None
    conn = _client()
    # The gRPC frame header claims claim_bytes; the body stops one byte short of it.
    body = struct.pack(">BI", 0, claim_bytes) + b"\n" * (claim_bytes - 1)
    pending: dict[int, memoryview] = {}
    let_in: dict[int, int] = {}
    statuses: dict[int, str] = {}
    with socket.create_connection((host, port), timeout=10) as sock:
        end = time.monotonic() + hold_s

        def send() -> bool:
            """False when the server stopped reading the connection until the hold's end
            (what it took in is then what the flow-control windows let in before)."""
            sock.settimeout(max(0.1, end - time.monotonic()))
            try:
                sock.sendall(conn.data_to_send())
            except TimeoutError:
                return False
            return True

        for _ in range(calls):
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, _headers(host, port, METHOD))
            pending[stream], let_in[stream] = memoryview(body), 0
        sending = send()
        while sending and time.monotonic() < end:
            for stream, data in pending.items():
                if stream in statuses:
                    continue
                room = min(conn.local_flow_control_window(stream), len(data))
                while room > 0:
                    frame = min(room, conn.max_outbound_frame_size)
                    conn.send_data(stream, data[:frame].tobytes())
                    data, room, let_in[stream] = data[frame:], room - frame, let_in[stream] + frame
                pending[stream] = data
            if not (sending := send()):
                break
            if not select.select([sock], [], [], 0.1)[0]:
                continue
            raw = sock.recv(1 << 16)
            if not raw:
                break
            _note_statuses(conn.receive_data(raw), statuses)
            sending = send()
    return StalledResult(
        calls=calls,
        stopped_reading=not sending,
        let_in=sorted(let_in.values()),
        statuses=dict(collections.Counter(statuses.values())),
        rss_before_mib=before,
        rss_after_mib=rss_mib(pid) if pid is not None else None,
    )


def _request(method: str) -> bytes:
    """One whole gRPC message for `method`: a short verse, or a health check of the server."""
    if method == HEALTH_CHECK:
        message = b""  # HealthCheckRequest(service=""), the server's own health
    else:
        from service.gen.inference.v1 import inference_pb2 as pb

        request = pb.TranslateRequest(texts=[VERSE])
        request.options.max_new_tokens = 8
        message = request.SerializeToString()
    return struct.pack(">BI", 0, len(message)) + message


def unread(
    host: str,
    port: int,
    calls: int,
    rate: float,
    hold_s: float,
    pid: int | None = None,
    method: str = METHOD,
) -> UnreadResult:
    """Send `calls` whole requests of `method`, `rate` a second, on a connection whose
    stream windows are 0 (no answer can be sent; statuses can), keep it open `hold_s`
    seconds more, and report what the server answered and held."""
    import h2.exceptions

    before = rss_mib(pid) if pid is not None else None
    conn = _client(stream_window=0)
    body = _request(method)
    statuses: dict[int, str] = {}
    closed = False
    sent = 0
    with socket.create_connection((host, port), timeout=10) as sock:

        def pump(until: float) -> None:
            """Send what is pending and take in statuses until `until` (monotonic), or
            until the server ends the connection (its max age, a drain)."""
            nonlocal closed
            try:
                while not closed:
                    sock.sendall(conn.data_to_send())
                    left = until - time.monotonic()
                    if left <= 0:
                        return
                    if select.select([sock], [], [], min(left, 0.05))[0]:
                        raw = sock.recv(1 << 16)
                        closed = not raw or _note_statuses(conn.receive_data(raw), statuses)
            except (OSError, h2.exceptions.ProtocolError):
                _note_statuses(_read_to_end(sock, conn), statuses)
                closed = True

        started = time.monotonic()
        while sent < calls and not closed:
            stream = conn.get_next_available_stream_id()
            conn.send_headers(stream, _headers(host, port, method))
            conn.send_data(stream, body, end_stream=True)
            sent += 1
            pump(started + sent / rate)
        pump(time.monotonic() + hold_s)
        after = rss_mib(pid) if pid is not None else None  # before the connection closes
    return UnreadResult(
        calls=sent,
        closed=closed,
        statuses=dict(collections.Counter(statuses.values())),
        rss_before_mib=before,
        rss_after_mib=after,
    )


class Flood(enum.Enum):
    """Frames a --flood sends as fast as it can."""

    ping = "ping"  # PING frames
    reset = "reset"  # a call's HEADERS and at once its RST_STREAM: HTTP/2 "rapid reset"


FLOOD_UNITS = {Flood.ping: "PINGs", Flood.reset: "rapid resets"}


@dataclass
class FloodResult:
    """How far a flood got, and what it cost the server."""

    sent: int
    seconds: float
    closed: str | None  # why the server ended the connection (None: it did not)
    cpu_s: float | None = None  # the server's CPU time meanwhile


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood(host: str, port: int, kind: Flood, count: int, pid: int | None = None) -> FloodResult:
    """Send `count` PINGs or rapid resets on one connection, until the server ends it."""
    import h2.exceptions

    conn = _client()
    before = cpu_seconds(pid) if pid is not None else None
    closed: str | None = None
    received = bytearray()  # every byte the server sent (`_goaway_in`)
    parsed = 0  # of which whole frames
    sent = 0
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=10) as sock:
        try:
            while sent < count and closed is None:
                for _ in range(min(BURST, count - sent)):
                    if kind is Flood.ping:
                        conn.ping(sent.to_bytes(8, "big"))
                    else:
                        stream = conn.get_next_available_stream_id()
                        conn.send_headers(stream, _headers(host, port, METHOD))
                        conn.reset_stream(stream)
                    sent += 1
                sock.sendall(conn.data_to_send())
                while closed is None and select.select([sock], [], [], 0)[0]:
                    raw = sock.recv(1 << 16)
                    received += raw
                    conn.receive_data(raw)  # h2 acknowledges the server's settings
                    closed, parsed = _goaway_in(received, parsed)
                    if not raw:
                        closed = closed or "connection closed"
        except (OSError, h2.exceptions.ProtocolError) as error:
            # The server may have sent its GOAWAY just before it closed: it says why.
            sock.settimeout(1.0)
            with contextlib.suppress(OSError):
                while raw := sock.recv(1 << 16):
                    received += raw
            closed = _goaway_in(received, parsed)[0] or f"{type(error).__name__}: {error}"
        seconds = time.monotonic() - started
        time.sleep(FLOOD_SETTLE_S)  # what the server still had to process
        cpu = cpu_seconds(pid) - before if pid is not None and before is not None else None
    return FloodResult(sent=sent, seconds=seconds, closed=closed, cpu_s=cpu)


@app.command()
def main(
    target: Annotated[str, typer.Option(help="The server's host:port (loopback only).")],
    calls: Annotated[int, typer.Option(min=1, max=100_000, help="Calls to open.")] = 200,
    claim_bytes: Annotated[
        int, typer.Option(min=2, max=1 << 30, help="Request size each call claims.")
    ] = 4 << 20,
    hold_s: Annotated[float, typer.Option(min=0.1, max=600, help="Seconds to feed them.")] = 8.0,
    pid: Annotated[int | None, typer.Option(help="Server process, to read its memory.")] = None,
    unread_answers: Annotated[
        bool,
        typer.Option(
            help="Send whole requests, --rate a second, and never read the answers instead."
        ),
    ] = False,
    rate: Annotated[
        float | None,
        typer.Option(
            min=1, max=10_000, help=f"With --unread-answers: calls a second [{UNREAD_RATE:g}]."
        ),
    ] = None,
    method: Annotated[
        Method | None, typer.Option(help="With --unread-answers: the method called [translate].")
    ] = None,
    flood_with: Annotated[
        Flood | None,
        typer.Option(
            "--flood", help="Send --calls PINGs or rapid resets instead, as fast as it can."
        ),
    ] = None,
) -> None:
    """Open calls that never finish their request (or never read their answer, or flood
    the connection); report what the server held, or what the flood cost it."""
    from loadtest.provenance import git_commit, versions

    check_target(target, allow_remote=False)
    if flood_with is not None and unread_answers:
        raise typer.BadParameter("--flood and --unread-answers are two tests: choose one")
    if not unread_answers and (rate is not None or method is not None):
        raise typer.BadParameter("--rate and --method go with --unread-answers")
    host, _, port = target.rpartition(":")
    kept = {k: v for k, v in versions().items() if k in ("grpcio",)}
    typer.echo(f"commit {git_commit()}; " + ", ".join(f"{k} {v}" for k, v in kept.items()))
    typer.echo(f"command: {shlex.join(['python', '-m', 'loadtest.stalled', *sys.argv[1:]])}")
    if flood_with is not None:
        flooded = flood(host.strip("[]"), int(port), flood_with, calls, pid)
        typer.echo(
            f"{flooded.sent:,} of {calls:,} {FLOOD_UNITS[flood_with]} sent in "
            f"{flooded.seconds:.2f} s; the server "
            + (f"ended the connection: {flooded.closed}" if flooded.closed else "kept it open")
        )
        if flooded.cpu_s is not None:
            typer.echo(
                f"server CPU time meanwhile (and {FLOOD_SETTLE_S:g} s after): {flooded.cpu_s:.2f} s"
            )
        return
    if unread_answers:
        path = HEALTH_CHECK if method is Method.health else METHOD
        per_s = UNREAD_RATE if rate is None else rate
        answers = unread(host.strip("[]"), int(port), calls, per_s, hold_s, pid, path)
        typer.echo(f"{answers.calls} whole {path} requests at {per_s:g}/s, answers never read")
        if answers.closed:
            typer.echo("the server closed the connection before the end")
        _report(answers)
        return
    result = run(host.strip("[]"), int(port), calls, claim_bytes, hold_s, pid)
    sent_all = claim_bytes + 4  # the 5-byte frame header and all but the last byte
    partial = [n for n in result.let_in if n < sent_all]
    typer.echo(
        f"{calls} calls, each claiming {claim_bytes:,} bytes: {calls - len(partial)} let in "
        f"all but the last byte (being read), the others at most {max(partial, default=0):,} "
        f"bytes each; {sum(result.let_in) / 2**20:.1f} MiB in all"
    )
    if result.stopped_reading:
        typer.echo("the server stopped reading the connection before the end")
    _report(result)


def _report(held: HeldCalls) -> None:
    before, after = held.rss_before_mib, held.rss_after_mib
    if before is not None and after is not None:
        typer.echo(f"server memory: {before:.0f} MiB before, {after:.0f} MiB at the end")
    for status, count in sorted(held.statuses.items(), key=lambda kv: -kv[1]):
        typer.echo(f"{count} answered: {status}")
    typer.echo(f"{held.open} still open when the connection closed")


if __name__ == "__main__":
    app()
