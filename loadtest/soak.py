"""Soak test support: the server's resident memory over time, read from /proc.

A leak shows as RSS that keeps growing at a constant load; the soak report gives the RSS
series, its start/end/peak and the growth over the second half of the run (the first half
includes warm-up: arenas, caches and shape buckets filling). The server is named by
--server-pid or found as the process that listens on the target's TCP port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
TCP_LISTEN = "0A"


def rss_bytes(pid: int, proc: Path = PROC) -> int:
    """Current resident set size of pid (VmRSS), in bytes."""
    return _status_kb(pid, "VmRSS", proc) * 1024


def peak_rss_bytes(pid: int, proc: Path = PROC) -> int:
    """Peak resident set size of pid (VmHWM), in bytes."""
    return _status_kb(pid, "VmHWM", proc) * 1024


def _status_kb(pid: int, key: str, proc: Path) -> int:
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ProcessLookupError(f"no {key} in {proc}/{pid}/status (kernel thread or gone?)")


def listening_inodes(port: int, proc: Path = PROC) -> set[str]:
    """Socket inodes listening on TCP `port` (IPv4 and IPv6)."""
    inodes: set[str] = set()
    for name in ("tcp", "tcp6"):
        table = proc / "net" / name
        if not table.is_file():
            continue
        for line in table.read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) < 10:
                continue
            local, state, inode = cols[1], cols[3], cols[9]
            if state == TCP_LISTEN and int(local.rsplit(":", 1)[1], 16) == port and inode != "0":
                inodes.add(inode)
    return inodes


def _pids(proc: Path) -> Iterable[int]:
    for entry in proc.iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def find_listening_pid(port: int, proc: Path = PROC) -> int | None:
    """The pid owning a socket that listens on `port`, or None (not ours to read, or none)."""
    targets = {f"socket:[{inode}]" for inode in listening_inodes(port, proc)}
    if not targets:
        return None
    for pid in _pids(proc):
        fd_dir = proc / str(pid) / "fd"
        try:
            for fd in fd_dir.iterdir():
                try:
                    if os.readlink(fd) in targets:
                        return pid
                except OSError:
                    continue
        except OSError:  # another user's process, or gone
            continue
    return None


@dataclass
class RssSampler:
    """Samples a pid's RSS every `interval_s` until stopped; survives the process exiting."""

    pid: int
    interval_s: float = 1.0
    times: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    error: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        start = time.perf_counter()
        while not stop.is_set():
            try:
                value = rss_bytes(self.pid)
            except (OSError, ProcessLookupError) as error:
                self.error = f"stopped sampling pid {self.pid}: {error}"
                return
            self.times.append(time.perf_counter() - start)
            self.rss.append(value)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    def summary(self) -> dict[str, Any]:
        if not self.rss:
            return {"pid": self.pid, "samples": 0, "error": self.error}
        half = len(self.rss) // 2
        second = self.rss[half:]
        t_second = self.times[half:]
        span = (t_second[-1] - t_second[0]) if len(t_second) > 1 else 0.0
        growth = second[-1] - second[0]
        return {
            "pid": self.pid,
            "samples": len(self.rss),
            "interval_s": self.interval_s,
            "start_bytes": self.rss[0],
            "end_bytes": self.rss[-1],
            "peak_bytes": max(self.rss),
            "second_half_growth_bytes": growth,
            "second_half_growth_bytes_per_min": growth / span * 60 if span > 0 else 0.0,
            "error": self.error,
            "series": {"t_s": [round(t, 3) for t in self.times], "rss_bytes": self.rss},
        }
