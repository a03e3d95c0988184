"""Signals that arrive before the event loop can take them.

`python -m service` spends a few hundred milliseconds importing and loading settings before
its event loop installs the drain handlers; until then SIGTERM would kill it with 143 and
SIGHUP would end it. `hold()` is the first thing the command does: it records those signals,
and the server acts on them once its loop runs (`held()`).
"""

from __future__ import annotations

import signal
from types import FrameType

HELD_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_held: list[int] = []


def _record(signum: int, frame: FrameType | None) -> None:
    _held.append(signum)


def hold() -> None:
    """Record SIGTERM, SIGINT and SIGHUP instead of acting on them (main thread only)."""
    for sig in HELD_SIGNALS:
        signal.signal(sig, _record)


def held() -> list[int]:
    """The signals recorded since `hold()`, oldest first; taking them clears the record."""
    taken = list(_held)
    _held.clear()
    return taken
