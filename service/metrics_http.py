"""The /metrics endpoint: prometheus-client's WSGI app on a thread-per-connection server
with bounds, which the library's start_http_server lacks.

Its server holds a thread per connection for as long as the client keeps it: one that
sends nothing, or a byte every few seconds, held a thread for good (200 such
connections: +103 threads). Here a connection is closed when it sends nothing for
`read_timeout_s`, or at the latest `connection_s` after it opened, and at most
`max_connections` are served at once: one more is closed at once, unread. A scrape
(one request, answered in milliseconds) never comes near those limits.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app


class _Handler(WSGIRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        self.request.settimeout(self.server.read_timeout_s)  # per read
        super().setup()
        self._cut = threading.Timer(self.server.connection_s, self._close)
        self._cut.daemon = True
        self._cut.start()

    def _close(self) -> None:
        """A reader blocked on this connection wakes to its end (a client sending a byte
        now and then resets the read timeout, not this)."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._cut.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one line per scrape would drown the service's own."""


class MetricsServer(ThreadingMixIn, WSGIServer):
    """Serves `registry` on (host, port) from a daemon thread until shutdown()."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        max_connections: int,
        read_timeout_s: float,
        connection_s: float,
    ) -> None:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        self.address_family = infos[0][0]  # IPv6 hosts too (TCPServer's default is IPv4)
        self.read_timeout_s = read_timeout_s
        self.connection_s = connection_s
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__((host, port), _Handler)
        self.set_app(make_wsgi_app(registry))
        self._thread = threading.Thread(target=self.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # all slots held: closed, not queued behind them
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
