"""The /metrics endpoint: prometheus-client's WSGI app on a thread-per-connection server
with bounds, which the library's start_http_server lacks.

The library's server holds a thread per connection for as long as the client keeps it:
one that sends nothing, or a byte every few seconds, held a thread for good (200 such
connections: +103 threads). Here a connection is closed when it sends nothing for
`read_timeout_s`, or at the latest `connection_s` after it opened, and at most
`max_connections` are served at once: one more is closed at once, unread. A scrape
(one request, answered in milliseconds) never comes near those limits.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)


class _ErrorLog(io.StringIO):
    """wsgi.errors of one request: the traceback wsgiref writes there when a response
    fails (a reader stalled past the timeout, a collector that raised) becomes one record
    of the service's JSON log, not raw lines on stderr."""

    def flush(self) -> None:
        text = self.getvalue().rstrip()
        if text:
            log.warning("metrics response failed: %s", text.splitlines()[-1], extra={"trace": text})
        self.seek(0)
        self.truncate()


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

    def get_stderr(self) -> _ErrorLog:
        return _ErrorLog()


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

    def server_bind(self) -> None:
        """`::` takes IPv4 too, as gRPC's port does, even where the system's default is
        IPv6 only (net.ipv6.bindv6only = 1)."""
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went quiet past the timeouts, reset or left ends its connection;
        socketserver would print a traceback on stderr, between the JSON log lines, for
        each. Anything else is the server's fault: logged, as JSON."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("metrics connection from %s ended: %s", client_address[0], sys.exc_info()[1])
        else:
            log.exception("metrics endpoint failed serving %s", client_address[0])

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
