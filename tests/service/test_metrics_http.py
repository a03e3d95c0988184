"""The /metrics endpoint's bounds: connections served at once, and how long one is kept."""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.metrics_http import MetricsServer
from tests.conftest import free_port, ipv6_loopback


@pytest.fixture
def registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("scrapes_seen", "A sample to find in the page.", registry=registry).inc()
    return registry


def serve(registry: CollectorRegistry, host: str = "127.0.0.1", **bounds: float) -> MetricsServer:
    limits = {"max_connections": 2, "read_timeout_s": 30.0, "connection_s": 30.0, **bounds}
    return MetricsServer(
        host,
        free_port(),
        registry,
        max_connections=int(limits["max_connections"]),
        read_timeout_s=limits["read_timeout_s"],
        connection_s=limits["connection_s"],
    )


@pytest.fixture
def stopped() -> Iterator[list[MetricsServer]]:
    servers: list[MetricsServer] = []
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def scrape(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        body: bytes = page.read()
        return body


def closed_by_server(conn: socket.socket, within: float) -> bool:
    """Whether the server closes `conn` within `within` seconds (its end reads as EOF)."""
    ready, _, _ = select.select([conn], [], [], within)
    return bool(ready) and conn.recv(1) == b""


def test_connections_past_the_cap_are_closed_at_once_and_hold_no_thread(
    registry: CollectorRegistry, stopped: list[MetricsServer]
) -> None:
    """Two idle connections hold both slots: eight more are closed at once, unread, and
    add no thread; once the two go, a scrape is served."""
    server = serve(registry)
    stopped.append(server)
    port = server.server_port
    before = threading.active_count()
    holders = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    time.sleep(0.3)  # both accepted: a handler thread and its timer each
    extra = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    assert all(closed_by_server(conn, within=5) for conn in extra)
    assert threading.active_count() - before <= 4
    assert not closed_by_server(holders[0], within=0.2)  # still served
    for conn in [*holders, *extra]:
        conn.close()
    deadline = time.monotonic() + 10
    while True:  # the slots free as the handlers see their clients' ends
        try:
            assert b"scrapes_seen_total 1.0" in scrape(port)
            break
        except (ConnectionError, urllib.error.URLError):
            assert time.monotonic() < deadline, "the slots were never released"
            time.sleep(0.1)


def test_a_client_sending_a_byte_now_and_then_is_cut_at_the_connection_limit(
    registry: CollectorRegistry, stopped: list[MetricsServer]
) -> None:
    """A byte every 0.2 s resets a 0.5 s read timeout, so only the connection limit (1 s)
    ends it; a scrape meanwhile is served."""
    server = serve(registry, read_timeout_s=0.5, connection_s=1.0)
    stopped.append(server)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as drip:
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
            try:
                drip.send(bytes([byte]))
            except OSError:  # reset: closed by the server
                break
            if closed_by_server(drip, within=0.2):
                break
        else:
            pytest.fail("the dripping connection was kept past its limit")
    assert 0.8 < time.monotonic() - started < 5
    assert b"scrapes_seen_total" in scrape(server.server_port)


def scrape_when_free(port: int) -> bytes:
    """A scrape, tried until a slot is free: the handlers before it have all ended."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return scrape(port)
        except (ConnectionError, urllib.error.URLError):
            assert time.monotonic() < deadline, "the slots were never released"
            time.sleep(0.1)


def test_clients_that_go_quiet_or_reset_write_nothing_on_stderr(
    registry: CollectorRegistry, stopped: list[MetricsServer], capfd: pytest.CaptureFixture[str]
) -> None:
    """stderr carries the service's JSON log lines: socketserver printed a traceback there
    for each connection closed at the read timeout or reset by its client."""
    server = serve(registry, max_connections=1, read_timeout_s=0.3)
    stopped.append(server)
    port = server.server_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as quiet:
        assert closed_by_server(quiet, within=5)
    scrape_when_free(port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as reset:
        reset.sendall(b"GET /met")
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert b"scrapes_seen_total" in scrape_when_free(port)
    assert capfd.readouterr().err == ""


class _LargePage(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("large_page", "x" * (16 << 20), value=1.0)


def test_a_reader_stalled_mid_page_is_one_log_record_not_a_traceback_on_stderr(
    stopped: list[MetricsServer],
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A page larger than the sockets' buffers, to a client that reads none of it: the
    write times out and wsgiref wrote its traceback to stderr."""
    caplog.set_level(logging.WARNING, logger="service.metrics_http")  # whatever the root's
    registry = CollectorRegistry()
    registry.register(_LargePage())
    server = serve(registry, max_connections=1, read_timeout_s=0.5)
    stopped.append(server)

    def failed() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.message.startswith("metrics response failed")]

    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as stalled:
        stalled.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        deadline = time.monotonic() + 10
        while not failed():  # the write's timeout, while the client holds the page unread
            assert time.monotonic() < deadline, capfd.readouterr().err
            time.sleep(0.1)
    scrape_when_free(server.server_port)
    assert capfd.readouterr().err == ""
    assert len(failed()) == 1 and failed()[0].levelno == logging.WARNING
    assert failed()[0].message.endswith("TimeoutError: timed out")


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_the_ipv6_wildcard_serves_ipv4_too_where_sockets_default_to_ipv6_only(
    registry: CollectorRegistry, stopped: list[MetricsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--host ::` means every IPv6 and IPv4 address, as gRPC's port serves it; a host with
    net.ipv6.bindv6only = 1 (here: its socket option, set before the bind) served IPv6 only."""
    bind = MetricsServer.server_bind

    def bind_v6only(server: MetricsServer) -> None:
        server.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        bind(server)

    monkeypatch.setattr(MetricsServer, "server_bind", bind_v6only)
    server = serve(registry, host="::")
    stopped.append(server)
    assert b"scrapes_seen_total" in scrape(server.server_port)  # 127.0.0.1
