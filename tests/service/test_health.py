"""service.health: Watch streams see every status, the drain's NOT_SERVING included."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from service.health import NOT_SERVING, SERVING, Health


def test_a_drain_that_begins_while_a_watch_writes_still_sends_not_serving() -> None:
    """The drain can begin while a watch is sending the status before it: the watch then
    sends NOT_SERVING before it ends, not end with the older status as its last."""
    health = Health()
    sent: list[int] = []

    class Context:
        async def write(self, message: health_pb2.HealthCheckResponse) -> None:
            sent.append(message.status)
            if len(sent) == 1:  # the drain begins while the first status is on its way
                await health.enter_graceful_shutdown()

    async def main() -> None:
        request = health_pb2.HealthCheckRequest(service="")
        await asyncio.wait_for(health.Watch(request, Context()), 5)  # type: ignore[arg-type]

    asyncio.run(main())
    assert sent == [SERVING, NOT_SERVING]
