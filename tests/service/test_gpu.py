"""The GPU memory metric: NVML device lookup, scrape-time reading, scheduler wiring."""

from __future__ import annotations

import asyncio
import logging
import sys
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import typer
from prometheus_client import generate_latest

from service.engine import Engine, EngineOptions
from service.gpu import CUDA_PROVIDER, GpuMemoryUnavailable, align_device_order, memory_reader
from service.metrics import Metrics
from service.repository import ModelRepository, ModelVersion
from service.scheduler import DEFAULT_MODELS, Scheduler, SchedulerConfig
from tests.service._engine_models import TRANSLATOR, model_repository

GIB = 2**30


class FakeNvml(ModuleType):
    """The part of pynvml the service uses, over a table of devices."""

    class NVMLError(Exception):
        pass

    def __init__(self, used: dict[Any, int], init_error: bool = False) -> None:
        super().__init__("pynvml")
        self.used = used  # NVML index or UUID -> bytes in use
        self.init_error = init_error
        self.initialised = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.NVMLError("Driver Not Loaded")
        self.initialised = True

    def _handle(self, key: Any) -> Any:
        if not self.initialised or key not in self.used:
            raise self.NVMLError(f"Invalid Argument: {key!r}")
        return key

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return self._handle(index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> Any:
        return self._handle(uuid)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        return SimpleNamespace(used=self.used[handle], total=80 * GIB)


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml({0: 1 * GIB, 1: 2 * GIB, 3: 3 * GIB, "GPU-5a1e": 5 * GIB})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_reads_the_devices_by_cuda_id(nvml: FakeNvml) -> None:
    read = memory_reader([0, 1])
    assert read() == {"0": 1 * GIB, "1": 2 * GIB}
    nvml.used[1] = 7 * GIB  # read again at every scrape
    assert read()["1"] == 7 * GIB


def test_cuda_visible_devices_maps_cuda_ids_to_nvml_devices(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert memory_reader([0])() == {"0": 3 * GIB}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5a1e")
    assert memory_reader([0])() == {"0": 5 * GIB}


def test_unreadable_devices_are_refused_saying_why(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with pytest.raises(GpuMemoryUnavailable, match="CUDA device 1 is not among CUDA_VISIBLE_"):
        memory_reader([1])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(GpuMemoryUnavailable, match="Invalid Argument: 2"):
        memory_reader([2])
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml({}, init_error=True))
    with pytest.raises(GpuMemoryUnavailable, match="Driver Not Loaded"):
        memory_reader([0])
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed: import fails
    with pytest.raises(GpuMemoryUnavailable, match="nvidia-ml-py is not installed"):
        memory_reader([0])


def test_collector_reads_at_scrape_time_and_survives_a_failing_driver() -> None:
    metrics = Metrics()
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE inference_gpu_memory_used_bytes gauge" in text
    assert "inference_gpu_memory_used_bytes{" not in text  # CPU: declared, no samples
    used = {"0": 3 * GIB}
    metrics.gpu_memory_used.read = lambda: dict(used)
    assert metrics.registry.get_sample_value(
        "inference_gpu_memory_used_bytes", {"device": "0"}
    ) == float(3 * GIB)
    used["0"] = 4 * GIB
    assert metrics.registry.get_sample_value(
        "inference_gpu_memory_used_bytes", {"device": "0"}
    ) == float(4 * GIB)

    def broken() -> dict[str, int]:
        raise RuntimeError("GPU is lost")

    metrics.gpu_memory_used.read = broken
    text = generate_latest(metrics.registry).decode()
    assert "inference_requests_total" in text and "inference_gpu_memory_used_bytes{" not in text


def test_scheduler_watches_the_device_of_a_cuda_engine(nvml: FakeNvml) -> None:
    """An engine on CUDA makes the scheduler read its device's memory; CPU engines don't."""
    cuda_models: set[str] = {TRANSLATOR}

    def factory(entry: ModelVersion, options: EngineOptions) -> Engine:
        engine = Engine(entry.path, entry.manifest, options)
        if entry.name in cuda_models:
            engine.provider = CUDA_PROVIDER  # what choose_runtime gives on a GPU host
        return engine

    async def start(metrics: Metrics) -> None:
        repository = ModelRepository(model_repository(), DEFAULT_MODELS)
        options = EngineOptions(cpu_variant="fp32", intra_op_threads=1, warmup=False)
        scheduler = Scheduler(repository, SchedulerConfig(), options, metrics, factory)
        await scheduler.start()
        await scheduler.stop(0.0)

    on_gpu = Metrics()
    asyncio.run(start(on_gpu))
    value = on_gpu.registry.get_sample_value("inference_gpu_memory_used_bytes", {"device": "0"})
    assert value == float(1 * GIB)
    cuda_models.clear()
    on_cpu = Metrics()
    asyncio.run(start(on_cpu))
    assert on_cpu.gpu_memory_used.read is None


@pytest.mark.gpu
def test_nvml_reads_a_real_device() -> None:
    pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
        pynvml.nvmlDeviceGetHandleByIndex(0)
    except pynvml.NVMLError as error:
        pytest.skip(f"no NVIDIA GPU visible to NVML: {error}")
    read = memory_reader([0])
    assert (
        0
        < read()["0"]
        <= pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
    )


def test_the_server_numbers_cuda_devices_as_nvml_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA's default order (fastest first) and NVML's (PCI bus) differ on a host of mixed
    GPUs: the memory read for device 0 was another card's. `python -m service` aligns them
    before CUDA starts, unless the operator chose an order."""
    import service.server
    from service.command import run

    seen: list[str | None] = []

    async def serve(settings: Any) -> int:
        import os

        seen.append(os.environ.get("CUDA_DEVICE_ORDER"))
        return 0

    monkeypatch.setattr(service.server, "serve", serve)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # run() sets up the JSON logs
    try:
        with pytest.raises(typer.Exit):
            run()
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
        align_device_order()
        with pytest.raises(typer.Exit):
            run()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert seen == ["PCI_BUS_ID", "FASTEST_FIRST"]
