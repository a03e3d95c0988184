"""GPU memory in use, read from NVML (nvidia-ml-py), for `inference_gpu_memory_used_bytes`.

onnxruntime reports no memory figure of its own, and its CUDA arena keeps what it has
grown to, so the device-wide figure NVML gives (what `nvidia-smi` shows) is the one that
tells an operator how close a replica is to running out. Read at scrape time, never on
the decode path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

CUDA_PROVIDER = "CUDAExecutionProvider"
MemoryReader = Callable[[], dict[str, int]]


def align_device_order() -> None:
    """Number CUDA devices as NVML and nvidia-smi do (by PCI bus), unless the operator chose:
    CUDA's default puts the fastest first, so on a host of mixed GPUs device 0 (or an index
    in CUDA_VISIBLE_DEVICES) named another card than the NVML handle read for its memory.
    Before CUDA starts (the first CUDA session), which reads it once."""
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def _nvml() -> ModuleType | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _visible(device_id: int) -> str | int:
    """The NVML handle key of CUDA device `device_id`: CUDA numbers the devices that
    CUDA_VISIBLE_DEVICES lists (by index or UUID), NVML numbers all of them."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    listed = [d for d in listed if d]
    if not listed:
        return device_id
    if device_id >= len(listed):
        raise ValueError(
            f"CUDA device {device_id} is not among CUDA_VISIBLE_DEVICES={','.join(listed)}"
        )
    entry = listed[device_id]
    return int(entry) if entry.isdigit() else entry


class GpuMemoryUnavailable(RuntimeError):
    """NVML cannot report the memory of the devices asked for (the message says why)."""


def memory_reader(device_ids: Sequence[int]) -> MemoryReader:
    """A function returning {CUDA device id: bytes in use} for these devices; raises
    GpuMemoryUnavailable when NVML is not installed or cannot see them."""
    nvml = _nvml()
    if nvml is None:
        raise GpuMemoryUnavailable("nvidia-ml-py is not installed")
    try:
        nvml.nvmlInit()
        handles: dict[str, Any] = {}
        for device_id in device_ids:
            key = _visible(device_id)
            handles[str(device_id)] = (
                nvml.nvmlDeviceGetHandleByIndex(key)
                if isinstance(key, int)
                else nvml.nvmlDeviceGetHandleByUUID(key)
            )
    except (nvml.NVMLError, ValueError) as error:
        raise GpuMemoryUnavailable(f"NVML cannot read the device: {error}") from error

    def read() -> dict[str, int]:
        return {
            device: int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
            for device, handle in handles.items()
        }

    return read


__all__ = [
    "CUDA_PROVIDER",
    "GpuMemoryUnavailable",
    "MemoryReader",
    "align_device_order",
    "memory_reader",
]
