"""What the device path shares across threads and keeps per batch for CUDA graphs.

onnxruntime's CUDA graphs (`enable_cuda_graph`, one graph per `gpu_graph_id`) replay the
kernels a decoder run launched, on the buffers it was bound to at capture. So a batch
that replays one must keep, per shape bucket, its inputs and outputs at fixed device
addresses (`StepBuffers`), and copy new values into them rather than bind new ones.

A capture also puts the CUDA runtime in a global capture mode: a synchronizing call from
any other thread meanwhile (an allocation, a blocking copy) makes the capture fail. Two
models, or a version warming up beside a serving one, run on separate threads; every
device call of the engine therefore holds `DEVICE_LOCK` shared, and a capturing run holds
it alone.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class DeviceLock:
    """A readers-writer lock: device calls share it, a CUDA graph capture takes it alone.

    Shared holds nest on one thread (a helper run inside a step). A waiting capture stops
    new shared holders from other threads, so it is not starved by back-to-back steps.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders: dict[int, int] = {}  # thread id -> shared depth
        self._writer: int | None = None
        self._waiting_writers = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if me not in self._holders and self._writer != me:
                while self._writer is not None or self._waiting_writers:
                    self._cond.wait()
            self._holders[me] = self._holders.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._holders[me] -= 1
                if not self._holders[me]:
                    del self._holders[me]
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if me in self._holders:
                raise RuntimeError("a device capture cannot start while this thread holds a step")
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._holders:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._cond:
                self._writer = None
                self._cond.notify_all()


DEVICE_LOCK = DeviceLock()

_buffer_ids = itertools.count(1)


class StepBuffers:
    """One batch's fixed device buffers, by (role, shape): the caches it steps on, the
    small per-step inputs and the decoder outputs; and the IOBindings bound to them once:
    the decoder's per step shape (rows, cache length, source length), the cache write's
    and the greedy reduction's per cache or logits shape.

    Caches are keyed by their own shape, not the whole step's, so a batch holds one cache
    per (rows, length) it has used, whatever the other lengths were.
    """

    def __init__(self) -> None:
        self.id = next(_buffer_ids)
        self.values: dict[tuple[str, tuple[int, ...]], Any] = {}
        # step shape -> (decoder session, its IOBinding, the outputs bound to it)
        self.bindings: dict[tuple[int, int, int], tuple[Any, Any, dict[str, Any]]] = {}
        self.helper_bindings: dict[tuple[str, tuple[int, ...]], Any] = {}
        self.uploaded: dict[tuple[str, tuple[int, ...]], Any] = {}  # host inputs' values
        self.greedy: tuple[Any, Any, Any] | None = None  # (logits, ids, picked) of the last step

    def clear(self) -> None:
        """Drop every buffer and binding (the backend closing)."""
        self.values.clear()
        self.bindings.clear()
        self.helper_bindings.clear()
        self.uploaded.clear()
        self.greedy = None

    def get(self, role: str, shape: tuple[int, ...]) -> Any | None:
        return self.values.get((role, tuple(shape)))

    def put(self, role: str, value: Any) -> Any:
        self.values[(role, tuple(value.shape()))] = value
        return value
