"""The device lock: steps share it, a CUDA graph capture runs alone."""

from __future__ import annotations

import threading
import time

import pytest

from service.device import DeviceLock, StepBuffers

WAIT_S = 5.0


def _in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_shared_holders_overlap_and_nest() -> None:
    lock = DeviceLock()
    inside = threading.Barrier(2, timeout=WAIT_S)

    def step() -> None:
        with lock.shared(), lock.shared():  # a helper run inside a step
            inside.wait()  # both threads hold it at once

    threads = [_in_thread(step) for _ in range(2)]
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()


def test_a_capture_waits_for_running_steps_and_holds_off_new_ones() -> None:
    lock = DeviceLock()
    order: list[str] = []
    step_running, release_step = threading.Event(), threading.Event()

    def long_step() -> None:
        with lock.shared():
            step_running.set()
            release_step.wait(WAIT_S)
            order.append("step 1 ends")

    def capture() -> None:
        with lock.exclusive():
            order.append("capture")

    def late_step() -> None:
        with lock.shared():
            order.append("step 2")

    first = _in_thread(long_step)
    assert step_running.wait(WAIT_S)
    capturing = _in_thread(capture)
    deadline = time.monotonic() + WAIT_S
    while not lock._waiting_writers and time.monotonic() < deadline:
        time.sleep(0.001)
    later = _in_thread(late_step)
    time.sleep(0.05)
    assert order == []  # the capture waits for step 1; step 2 waits behind the capture
    release_step.set()
    for thread in (first, capturing, later):
        thread.join(WAIT_S)
        assert not thread.is_alive()
    assert order == ["step 1 ends", "capture", "step 2"]


def test_the_capturing_thread_may_make_device_calls_but_not_capture_inside_a_step() -> None:
    lock = DeviceLock()
    with lock.exclusive(), lock.shared():
        pass  # a helper called while capturing
    refused = pytest.raises(RuntimeError, match="cannot start while this thread")
    with lock.shared(), refused, lock.exclusive():
        pass
    with lock.exclusive():  # nothing was left held
        pass


def test_step_buffers_are_keyed_by_role_and_shape() -> None:
    class Value:
        def __init__(self, *shape: int) -> None:
            self._shape = list(shape)

        def shape(self) -> list[int]:
            return self._shape

    buffers, other = StepBuffers(), StepBuffers()
    assert buffers.id != other.id  # graph ids are per batch
    small, large = Value(2, 1, 4, 16, 8), Value(2, 1, 4, 32, 8)
    assert buffers.put("past_k", small) is small and buffers.put("past_k", large) is large
    assert buffers.get("past_k", (2, 1, 4, 16, 8)) is small
    assert buffers.get("past_k", (2, 1, 4, 32, 8)) is large
    assert buffers.get("past_v", (2, 1, 4, 16, 8)) is None
