"""Lifecycle of a real server subprocess: SIGTERM drains under load, SIGHUP and Reload load
new versions beside the running ones without failing a request."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.client import Client
from service.gen.inference.v1 import inference_pb2 as pb
from service.metrics import Metrics
from tests.conftest import ServerHandle, ipv6_loopback, wait_serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VERSE = "In the beginning God created the heaven and the earth."


def _private_repository(model_repository: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    shutil.copytree(model_repository, repository)
    return repository


def test_sigterm_under_load_loses_no_accepted_request(
    start_server: Callable[..., ServerHandle],
) -> None:
    server = start_server("--drain-grace-s", "30")
    outcomes: Counter[str] = Counter()
    finished_after_signal = Counter[str]()
    signalled = threading.Event()
    lock = threading.Lock()

    def worker(i: int) -> None:
        with Client(server.address, timeout=60) as client:
            while True:
                started_before = not signalled.is_set()
                try:
                    if i % 2:
                        client.generate("The Lord said", max_new_tokens=32)
                    else:
                        chunks = list(client.translate_stream(VERSE, max_new_tokens=32))
                        assert chunks[-1].finished
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name  # type: ignore[attr-defined]
                with lock:
                    outcomes[code] += 1
                    if code == "OK" and started_before and signalled.is_set():
                        finished_after_signal["OK"] += 1
                if code != "OK":
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while outcomes["OK"] < 16:  # the load is up (a fixed sleep is short on a loaded machine)
        assert time.monotonic() < deadline and server.alive(), server.log()[-3000:]
        time.sleep(0.1)
    signalled.set()
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(90)
    assert server.process.wait(60) == 0, server.log()[-3000:]
    # Every call either completed or was refused before it was accepted (UNAVAILABLE).
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert outcomes["OK"] > 0 and outcomes["UNAVAILABLE"] > 0
    assert finished_after_signal["OK"] > 0, "no call was in flight at SIGTERM"
    log = server.log()
    assert '"message": "draining"' in log and '"message": "stopped"' in log
    assert "drain grace over" not in log


def _copy_version(repository: Path, name: str, source: int, target: int) -> None:
    """A new version folder: the same files, its manifest renumbered."""
    destination = repository / name / str(target)
    shutil.copytree(repository / name / str(source), destination)
    manifest = json.loads((destination / "manifest.json").read_text())
    manifest["version"] = target
    (destination / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _wait_versions(client: Client, name: str, wanted: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.describe_model(name)  # the newest version taking calls
        if list(info.versions) == wanted and info.ready and info.version == max(wanted):
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} versions never became {wanted}")


class _Load:
    """Translations sent back to back by 3 threads while a test reloads the server."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.errors: list[str] = []
        self.versions: set[int] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run) for _ in range(3)]

    def _run(self) -> None:
        with Client(self.address, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    reply = client.translate(["Amen.", VERSE], max_new_tokens=8)
                    self.versions.add(reply.version)
                except grpc.RpcError as error:
                    self.errors.append(f"{error.code()}: {error.details()}")  # type: ignore[attr-defined]

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def test_sighup_and_reload_load_new_versions_without_failures(
    start_server: Callable[..., ServerHandle], model_repository: Path, tmp_path: Path
) -> None:
    """Every version on disk served (--keep-versions 0): requests may name each one."""
    repository = _private_repository(model_repository, tmp_path)
    server = start_server("--keep-versions", "0", repository=repository)
    with _Load(server.address) as load, Client(server.address, timeout=30) as client:
        _copy_version(repository, "en-es", 1, 2)
        server.process.send_signal(signal.SIGHUP)
        _wait_versions(client, "en-es", [1, 2])
        assert client.translate("Amen.").version == 2  # the newest is the default
        assert client.translate("Amen.", version=1).version == 1
        # Reload RPC: version 3 appears, version 1 is retired (gone from disk).
        _copy_version(repository, "en-es", 1, 3)
        shutil.rmtree(repository / "en-es" / "1")
        response = client.reload()
        assert list(response.loaded) == ["en-es:3"]
        assert list(response.retired) == ["en-es:1"]
        assert dict(response.failed) == {}
        _wait_versions(client, "en-es", [2, 3])
        with pytest.raises(grpc.RpcError) as info:
            client.translate("Amen.", version=1)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        # A folder copied without its manifest's version rewritten: the caller is told
        # why it did not load, and the serving versions go on.
        shutil.copytree(repository / "en-es" / "3", repository / "en-es" / "4")
        response = client.reload()
        assert (list(response.loaded), list(response.retired)) == ([], [])
        assert list(response.failed) == ["en-es/4"]
        assert "version 3 but the folder is 4" in response.failed["en-es/4"]
        assert client.translate("Amen.").version == 3
        cli = subprocess.run(
            [sys.executable, "-m", "service.client", "reload", "--target", server.address],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert cli.returncode == 1 and "failed: en-es/4: " in cli.stderr
    assert load.errors == []
    assert server.stop() == 0


def test_a_new_version_replaces_the_running_one_without_failures(
    start_server: Callable[..., ServerHandle], model_repository: Path, tmp_path: Path
) -> None:
    """The default (--keep-versions 1): SIGHUP serves a new version beside the running one,
    which then retires once its in-flight requests finish; no request fails meanwhile."""
    repository = _private_repository(model_repository, tmp_path)
    server = start_server(repository=repository)
    with _Load(server.address) as load, Client(server.address, timeout=30) as client:
        _wait_versions(client, "en-es", [1])
        _copy_version(repository, "en-es", 1, 2)
        server.process.send_signal(signal.SIGHUP)
        _wait_versions(client, "en-es", [2])
        assert client.translate("Amen.").version == 2
        with pytest.raises(grpc.RpcError) as info:
            client.translate("Amen.", version=1)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while 2 not in load.versions and time.monotonic() < deadline:
            time.sleep(0.05)  # the load's own calls reach version 2 too
    assert load.errors == [] and load.versions == {1, 2}
    assert '"retired": ["en-es:1"]' in server.log()
    assert server.stop() == 0


def test_starts_not_serving_without_models(
    start_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """An empty repository: the server runs (so probes answer) but is NOT_SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(repository=empty, wait=False)
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline and status is None:
        with grpc.insecure_channel(server.address) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=2
                )
                if '"message": "serving"' in server.log():
                    status = reply.status
            except grpc.RpcError:
                time.sleep(0.2)
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    with Client(server.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.translate("Amen.")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
        assert client.list_models() == []
        request = pb.TranslateRequest(texts=["x"])
        with pytest.raises(grpc.RpcError):
            client.translator.Translate(request, timeout=5)
    assert server.stop() == 0


def test_a_model_that_fails_at_start_keeps_readiness_off_but_serves_the_other(
    start_server: Callable[..., ServerHandle], model_repository: Path, tmp_path: Path
) -> None:
    """The readiness probe reads "": a rollout whose generator does not load never takes
    traffic, while the translator's own health and calls work (and say why in the log)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    repository = _private_repository(model_repository, tmp_path)
    for version in (repository / "en-lm").iterdir():
        (version / "tokenizer.model").unlink()
    server = start_server(repository=repository, wait=False)

    def health(service: str) -> int | None:
        with grpc.insecure_channel(server.address) as channel:
            try:
                request = health_pb2.HealthCheckRequest(service=service)
                return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status)
            except grpc.RpcError:
                return None

    deadline = time.monotonic() + 60
    while health("inference.v1.Translator") != health_pb2.HealthCheckResponse.SERVING:
        assert server.alive() and time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    assert health("") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert health("inference.v1.Generator") == health_pb2.HealthCheckResponse.NOT_SERVING
    with Client(server.address) as client:
        assert client.translate(VERSE).translations[0].hypotheses[0].text
    assert "not ready: no version of en-lm serves" in server.log()
    assert server.stop() == 0


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--port", "cannot listen for gRPC on"), ("--metrics-port", "cannot serve metrics on")],
)
def test_a_busy_port_exits_1_saying_which_setting_to_change(
    start_server: Callable[..., ServerHandle], tmp_path: Path, flag: str, message: str
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = start_server(flag, str(port), repository=empty, wait=False)
        assert server.process.wait(timeout=60) == 1
    log = server.log()
    assert f"{message} 127.0.0.1:{port}" in log and flag in log, log
    assert "Traceback" not in log, log


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_host_serves_grpc_and_metrics(
    start_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """`--host ::1` (as `SERVE_HOST=::` on an IPv6 cluster): gRPC needs the address in
    brackets before its port, which the setting may be given with or without."""
    import urllib.request

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server("--host", "[::1]", repository=empty, wait=False)
    flags = list(server.flags)
    port, metrics_port = (flags[flags.index(f) + 1] for f in ("--port", "--metrics-port"))
    deadline = time.monotonic() + 60
    while '"message": "serving"' not in server.log():
        assert server.alive() and time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    with grpc.insecure_channel(f"[::1]:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING  # no models
    with urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=5) as page:
        assert b"inference_model_ready" in page.read()
    assert f'"address": "[::1]:{port}"' in server.log()
    assert server.stop() == 0


def test_a_missing_model_repository_exits_1_naming_the_setting(
    start_server: Callable[..., ServerHandle], tmp_path: Path
) -> None:
    """A typo in the repository path is not an empty repository: the server says so."""
    server = start_server(repository=tmp_path / "no-such-folder", wait=False)
    assert server.process.wait(timeout=60) == 1
    log = server.log()
    assert "no-such-folder is not a folder" in log and "--model-repository" in log, log
    assert "Traceback" not in log, log


def test_a_model_repository_the_server_may_not_list_exits_1_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A repository folder the server's user cannot list (a volume mounted 0700 for
    another user; root reads anything, hence the patched iterdir) failed the start with a
    PermissionError traceback once the ports were open."""
    import asyncio
    import logging

    from service.server import serve
    from service.settings import load_settings

    locked = tmp_path / "models"
    locked.mkdir()
    real = Path.iterdir

    def iterdir(self: Path) -> Any:
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    caplog.set_level(logging.INFO)
    settings = load_settings(port=0, metrics_port=0, model_repository=str(locked))
    assert asyncio.run(asyncio.wait_for(serve(settings), 60)) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.exc_info for r in errors] == [None], caplog.text
    assert "cannot list the model repository" in errors[0].getMessage()
    assert "Permission denied" in errors[0].getMessage()
    assert "--model-repository" in errors[0].getMessage()
    assert "listening" not in caplog.messages  # refused before a port opened


def test_provider_cuda_without_cuda_exits_1_naming_the_setting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """--provider cuda where onnxruntime has no CUDA provider: every model's load failed
    with a traceback, and the server listened, never ready, instead of exiting."""
    import asyncio
    import logging

    from service.engine import cuda_available
    from service.server import serve
    from service.settings import load_settings

    if cuda_available():
        pytest.skip("onnxruntime here has the CUDA provider")
    caplog.set_level(logging.INFO)
    settings = load_settings(port=0, metrics_port=0, provider="cuda")
    assert asyncio.run(asyncio.wait_for(serve(settings), 60)) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.exc_info for r in errors] == [None], caplog.text
    message = errors[0].getMessage()
    assert "--provider cuda (SERVE_PROVIDER)" in message and "onnxruntime-gpu" in message
    assert "listening" not in caplog.messages  # refused before a port opened


def _catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("sig", "held"),
    [
        (signal.SIGTERM, "a stop signal came while starting"),
        (signal.SIGHUP, "a reload signal came while starting"),
    ],
)
def test_a_signal_while_python_still_imports_is_held_not_fatal(
    start_server: Callable[..., ServerHandle], model_repository: Path, sig: int, held: str
) -> None:
    """SIGTERM before the event loop runs stops the server cleanly (exit 0, never bound);
    SIGHUP then is not fatal either: the server starts and serves the newest versions.
    The signal is sent as soon as the process catches it; on a busy machine the event loop
    may be up by then (the ordinary path), so a few tries must see the early one."""
    early = False
    for _ in range(5):
        server = start_server(repository=model_repository, wait=False)
        deadline = time.monotonic() + 30
        while not _catches(server.process.pid, sig):
            assert server.alive() and time.monotonic() < deadline, server.log()
            time.sleep(0.002)
        server.process.send_signal(sig)
        if sig == signal.SIGTERM:
            assert server.process.wait(timeout=60) == 0, server.log()
        else:
            wait_serving(server)
            with Client(server.address) as client:
                assert client.translate(VERSE).translations[0].hypotheses[0].text
            assert server.stop() == 0
        log = server.log()
        if held in log:
            early = True
            if sig == signal.SIGTERM:
                assert "listening" not in log, log  # stopped before it bound
            break
    assert early, "the signal never came before the event loop took over"


def test_sigterm_while_the_models_warm_up_exits_0_within_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Kubernetes stops pods that are still starting (an aborted rollout, a scale-down): a
    SIGTERM while a model warms up ends its warm-up at the next shape, so serve() returns
    0 after the drain's linger, not after the shapes left (about 20 here, half a second
    each); nothing ever served."""
    import asyncio
    import logging
    import os

    from service.engine import EngineOptions
    from service.repository import ModelRepository
    from service.scheduler import DEFAULT_MODELS, Scheduler, SchedulerConfig
    from service.server import DRAIN_LINGER_S, serve
    from service.settings import load_settings
    from tests.service._engine_models import model_repository as tiny_models
    from tests.service._engine_models import slow_decoder

    shape_s = 0.5
    runs = slow_decoder(monkeypatch, shape_s)
    caplog.set_level(logging.INFO)

    async def main() -> tuple[int, float]:
        metrics = Metrics()
        scheduler = Scheduler(
            ModelRepository(tiny_models(), DEFAULT_MODELS),
            SchedulerConfig(max_batch_size=8, max_batch_tokens=4096, max_queue=16),
            EngineOptions(cpu_variant="fp32", intra_op_threads=1),  # warm-up on
            metrics,
        )
        settings = load_settings(port=0, metrics_port=0, drain_grace_s=5)
        serving = asyncio.create_task(serve(settings, scheduler))
        deadline = time.monotonic() + 60
        while len(runs) < 2:  # serve() has its SIGTERM handler; a model warms up
            assert not serving.done() and time.monotonic() < deadline
            await asyncio.sleep(0.01)
        signalled, shapes = time.monotonic(), len(runs)
        os.kill(os.getpid(), signal.SIGTERM)
        code = await asyncio.wait_for(serving, 60)
        assert len(runs) <= shapes + 1, (shapes, len(runs))  # the one running, at most
        return code, time.monotonic() - signalled

    code, took = asyncio.run(main())
    assert code == 0
    assert took < DRAIN_LINGER_S + 3 * shape_s, took
    messages = caplog.messages
    assert "stopped before serving: a stop signal came while the models loaded" in messages
    assert "stopped" in messages and "serving" not in messages, messages
    assert any("warm-up stopped after" in m for m in messages), messages


def test_sigterm_during_a_reload_call_ends_its_warm_up_not_the_grace(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Reload call is in flight when SIGTERM comes: the drain stops the new version's
    warm-up at its next shape (it is closed unserved, the one serving is not retired), the
    call answers with nothing loaded and the new version under `failed` (it answered as if
    there had been nothing new: a deploy script took that for success), and serve() returns
    0 after the drain's linger. The drain used to wait for the call, so for the whole
    warm-up or the grace (10 s here)."""
    import asyncio
    import logging
    import os

    from service.engine import EngineOptions
    from service.gen.inference.v1 import inference_pb2_grpc as pb_grpc
    from service.repository import ModelRepository
    from service.scheduler import (
        DEFAULT_MODELS,
        STOPPED_BEFORE_SERVING,
        Scheduler,
        SchedulerConfig,
    )
    from service.server import DRAIN_LINGER_S, serve
    from service.settings import load_settings
    from tests.service._engine_models import copy_version, slow_decoder
    from tests.service._engine_models import model_repository as tiny_models

    root = tmp_path / "models"
    shutil.copytree(tiny_models(), root)
    caplog.set_level(logging.INFO)
    shape_s = 0.5

    async def main() -> tuple[int, float, pb.ReloadResponse]:
        scheduler = Scheduler(
            ModelRepository(root, DEFAULT_MODELS),
            SchedulerConfig(max_batch_size=8, max_batch_tokens=4096, max_queue=16),
            EngineOptions(cpu_variant="fp32", intra_op_threads=1),  # warm-up on
            Metrics(),
        )
        settings = load_settings(port=0, metrics_port=0, drain_grace_s=10)
        serving = asyncio.create_task(serve(settings, scheduler))
        deadline = time.monotonic() + 60
        while "serving" not in caplog.messages:
            assert not serving.done() and time.monotonic() < deadline
            await asyncio.sleep(0.01)
        copy_version(root, "en-es", 1, 2)
        runs = slow_decoder(monkeypatch, shape_s)  # the new version's warm-up: ~20 s
        address: str = next(
            r.__dict__["address"] for r in caplog.records if r.getMessage() == "listening"
        )
        async with grpc.aio.insecure_channel(address) as channel:
            reload = asyncio.ensure_future(pb_grpc.ModelsStub(channel).Reload(pb.ReloadRequest()))
            while len(runs) < 2:
                assert not reload.done() and time.monotonic() < deadline
                await asyncio.sleep(0.01)
            signalled = time.monotonic()
            os.kill(os.getpid(), signal.SIGTERM)
            code = await asyncio.wait_for(serving, 60)
            took = time.monotonic() - signalled
            return code, took, await asyncio.wait_for(reload, 5)

    code, took, answer = asyncio.run(main())
    assert code == 0
    assert took < DRAIN_LINGER_S + 3 * shape_s, took
    assert list(answer.loaded) == [] and list(answer.retired) == []
    assert dict(answer.failed) == {"en-es/2": STOPPED_BEFORE_SERVING}
    assert any("warm-up stopped after" in m for m in caplog.messages), caplog.messages


def test_calls_left_at_the_end_of_the_grace_end_through_the_scheduler() -> None:
    """When the drain grace runs out, a stream still decoding gets its answer so far
    (finish reason CANCELLED) and a unary call UNAVAILABLE, each counted as it was sent:
    not grpc's blanket UNAVAILABLE counted as CANCELLED. A beam stream's last chunk
    carries the ids its events had not sent, with their text: the stream's ids add up to
    its answer."""
    from service.engine import EngineOptions
    from service.repository import ModelRepository
    from service.scheduler import DEFAULT_MODELS, Scheduler, SchedulerConfig
    from tests.service._engine_models import LM, LONG_PROMPT, slow_engine_factory
    from tests.service._engine_models import model_repository as tiny_models
    from tests.service.test_server_transport import InProcessServer

    def scheduler(metrics: Metrics) -> Scheduler:
        return Scheduler(
            ModelRepository(tiny_models(), DEFAULT_MODELS),
            SchedulerConfig(max_batch_size=8, max_batch_tokens=4096, max_queue=16),
            EngineOptions(cpu_variant="fp32", intra_op_threads=1, warmup=False),
            metrics,
            slow_engine_factory(0.05),  # 100 tokens: 5 s, well past the grace
        )

    server = InProcessServer(scheduler, drain_grace_s=0.5, max_new_tokens=100)
    try:
        with Client(server.address, timeout=30) as c:
            stream = c.generate(LONG_PROMPT, stream=True, max_new_tokens=100)
            first = next(iter(stream))  # type: ignore[arg-type]
            beams = c.generate(LONG_PROMPT, stream=True, max_new_tokens=100, beam_size=3)
            unary = c.generator.GenerateUnary.future(
                pb.GenerateRequest(
                    prompt=LONG_PROMPT, options=pb.DecodingOptions(max_new_tokens=100)
                )
            )
            deadline = time.monotonic() + 10
            while server.server.transport.in_flight < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # a few steps: each stream has tokens, settled or not
            drained = server.submit(server.server.drain())
            chunks = [first, *stream]  # type: ignore[misc]
            assert chunks[-1].finished
            assert chunks[-1].finish_reason == pb.FINISH_REASON_CANCELLED
            assert 0 < chunks[-1].usage.output_tokens < 100
            beam_chunks = list(beams)  # type: ignore[call-overload]
            assert beam_chunks[-1].finish_reason == pb.FINISH_REASON_CANCELLED
            ids = [t for chunk in beam_chunks for t in chunk.token_ids]
            assert 0 < len(ids) == beam_chunks[-1].usage.output_tokens < 100
            with pytest.raises(grpc.RpcError) as info:
                unary.result(30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
            drained.result(30)
        assert server.counter("Generate", LM, "OK") == 2
        assert server.counter("GenerateUnary", LM, "UNAVAILABLE") == 1
        assert server.counter("Generate", LM, "CANCELLED") == 0
    finally:
        server.stop()
