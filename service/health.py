"""grpc.health.v1 (Check and Watch) whose Watch streams end when the server drains.

grpcio-health-checking's servicer never ends a Watch: enter_graceful_shutdown only sends
NOT_SERVING on it, so one open watch (a `grpcurl … Health/Watch`, a monitor) kept the
server's stop waiting for the drain's whole grace after the last call had finished.
Here a watch sends NOT_SERVING and then ends with OK; a client that checks health with
Watch starts a new one after a backoff, which gets NOT_SERVING and ends too (and then the
port closes). Otherwise it behaves as the
library's: Check answers NOT_FOUND for an unknown service, Watch sends SERVICE_UNKNOWN
for one and waits for it to appear.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):
    """Serving status per service ("" = the whole server), set by the server."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {"": SERVING}
        self._changed = asyncio.Condition()
        self._draining = False

    def status(self, service: str) -> int:
        return self._status.get(service, SERVICE_UNKNOWN)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._status:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=self._status[request.service])

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """The status now and at each change; once draining, NOT_SERVING and the end."""
        sent: int | None = None
        while True:
            status = self.status(request.service)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
                continue  # the status may have changed, or the drain begun, while it wrote
            if self._draining:
                return
            async with self._changed:
                while not self._draining and self.status(request.service) == sent:
                    await self._changed.wait()

    async def set(self, service: str, status: int) -> None:
        """Set one service's status (ignored once draining: it stays NOT_SERVING)."""
        if self._draining:
            return
        async with self._changed:
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; open watches send it and end."""
        async with self._changed:
            self._draining = True
            self._status = dict.fromkeys(self._status, NOT_SERVING)
            self._changed.notify_all()


__all__ = ["Health"]
