"""Soak helpers: RSS from /proc and finding the process that listens on a port."""

from __future__ import annotations

import asyncio
import os
import socket
import sys

import pytest

from loadtest.soak import RssSampler, find_listening_pid, listening_inodes, rss_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")


def test_rss_of_self() -> None:
    assert rss_bytes(os.getpid()) > 1 << 20


def test_find_listening_pid_of_own_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listening_inodes(port)
        assert find_listening_pid(port) == os.getpid()
    assert find_listening_pid(port) is None


def test_sampler_collects_and_summarizes() -> None:
    sampler = RssSampler(os.getpid(), interval_s=0.02)

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sampler.run(stop))
        await asyncio.sleep(0.15)
        stop.set()
        await task

    asyncio.run(go())
    summary = sampler.summary()
    assert summary["samples"] >= 3
    assert summary["peak_bytes"] >= summary["start_bytes"] > 0
    assert len(summary["series"]["rss_bytes"]) == summary["samples"]
