"""The caller's half of the decoder contract: writing new keys and values into the cache."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.runtime import cache_write_graph, cache_write_indices, write_cache


@pytest.mark.parametrize("steps", [1, 3])
def test_numpy_and_device_writes_agree_and_touch_only_their_slots(steps: int) -> None:
    rng = np.random.default_rng(0)
    layers, rows, heads, capacity, dim = 2, 3, 2, 8, 4
    cache = rng.normal(size=(layers, rows, heads, capacity, dim)).astype(np.float32)
    new = rng.normal(size=(layers, rows, heads, steps, dim)).astype(np.float32)
    positions = np.array([0, 5 - steps + 1, 2], dtype=np.int64)
    before = cache.copy()

    session = ort.InferenceSession(
        cache_write_graph(onnx.TensorProto.FLOAT), providers=["CPUExecutionProvider"]
    )
    idx = cache_write_indices(cache.shape, positions, steps)
    (device,) = session.run(None, {"cache": cache, "idx": idx, "new": new})
    written = write_cache(cache, new, positions)

    assert written is cache  # in place
    np.testing.assert_array_equal(device, written)
    touched = np.zeros(cache.shape, dtype=bool)
    for b, p in enumerate(positions):
        for t in range(steps):
            np.testing.assert_array_equal(written[:, b, :, p + t], new[:, b, :, t])
            touched[:, b, :, p + t] = True
    np.testing.assert_array_equal(written[~touched], before[~touched])


def test_a_write_past_the_capacity_fails_instead_of_wrapping() -> None:
    cache = np.zeros((1, 1, 1, 4, 2), dtype=np.float32)
    with pytest.raises(IndexError):
        write_cache(cache, np.ones((1, 1, 1, 2, 2), dtype=np.float32), np.array([3]))
