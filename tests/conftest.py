"""Shared fixtures: tiny exported models and a real gRPC server on loopback.

Fixtures (session scope unless noted), for the service, deploy and loadtest tests:

* `model_repository` → Path of a model repository holding `en-es/1` (translator) and
  `en-lm/1` (language model): tiny random Transformers with a SentencePiece model trained
  on tests/fixtures/verses.tsv, exported with `export.onnx_export.export_checkpoint`
  (fp32 + int8). Built once and cached in .pytest_cache (keyed by the source of
  transformer/, export/ and this file), so only the first run pays for training the
  tokenizer and exporting.
* `server` → `ServerHandle` of one shared server subprocess (`python -m service`) on free
  loopback ports, SERVING when yielded: `.address` ("127.0.0.1:PORT"), `.metrics_url`
  ("http://127.0.0.1:PORT/metrics"), `.channel()`, `.log()`. Do not stop it.
* `start_server` → factory `start_server(*flags, env=None, repository=None, wait=True)`
  starting a private server (extra CLI flags such as "--auth-token", "s3cret"); every
  server it started is stopped at the end of the session. Use it for tests that change
  settings or kill the server.
* `channel` (function scope) → a grpc.Channel to `server`.

Outside fixtures (e.g. a load test that wants its own process):
`launch_server(repository, flags, env)` → ServerHandle, and `build_model_repository(dir)`.

The servers run with small limits (see SERVER_FLAGS) so tests stay fast on two cores.
Nothing here imports torch unless `model_repository` is used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.fixtures import VERSES

ROOT = Path(__file__).resolve().parents[1]
TRANSLATOR = "en-es"
LANGUAGE_MODEL = "en-lm"
VERSION = 1
SERVER_START_TIMEOUT_S = 120.0
# Small limits: random tiny models rarely emit EOS, so every call decodes max_new_tokens.
# max_input_tokens is the tiny models' max_positions: every fixture verse fits.
SERVER_FLAGS: tuple[str, ...] = (
    "--provider", "cpu",
    "--intra-op-threads", "1",
    "--max-batch-size", "16",
    "--max-queue", "256",
    "--max-input-tokens", "128",
    "--default-max-new-tokens", "8",
    "--max-new-tokens", "32",
    "--max-texts-per-request", "8",
    "--max-beam-size", "4",
    "--drain-grace-s", "20",
    "--log-level", "INFO",
)  # fmt: skip


# --- tiny models -----------------------------------------------------------------------


def _fixture_texts() -> tuple[list[str], list[str]]:
    """English and Spanish verse texts for the tokenizer (a few lines if the file is absent)."""
    if VERSES.is_file():
        from transformer.data import load_pairs

        pairs = load_pairs(VERSES)
        return [p.en for p in pairs], [p.es for p in pairs]
    en = [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void.",
        "And God said, Let there be light: and there was light.",
    ]
    es = [
        "En el principio crió Dios los cielos y la tierra.",
        "Y la tierra estaba desordenada y vacía.",
        "Y dijo Dios: Sea la luz: y fué la luz.",
    ]
    return en, es


def _source_key() -> str:
    """Hash of what the tiny models depend on, so the cache is rebuilt when it changes."""
    digest = hashlib.sha256()
    files = [Path(__file__), VERSES]
    files += sorted((ROOT / "transformer").glob("*.py"))
    files += sorted((ROOT / "export").glob("*.py"))
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def build_tiny_checkpoints(out: Path) -> dict[str, Path]:
    """Random tiny translator and LM checkpoints (+ tokenizer) under out/<name>/checkpoint."""
    from export.testing import make_tiny_checkpoint

    en, es = _fixture_texts()
    common: dict[str, Any] = dict(
        vocab_size=256 if VERSES.is_file() else 64,
        lines=en + es,
        sharpen=1.0,
        n_heads=2,
        max_positions=128,
    )
    archs: dict[str, tuple[str, dict[str, Any]]] = {
        TRANSLATOR: ("encoder-decoder", {"n_encoder_layers": 1}),
        LANGUAGE_MODEL: ("decoder-only", {"positional": "learned"}),
    }
    checkpoints = {}
    for seed, (name, (arch, over)) in enumerate(archs.items()):
        checkpoints[name] = out / name / "checkpoint"
        make_tiny_checkpoint(checkpoints[name], arch, seed, **common, **over)
    return checkpoints


def build_model_repository(out: Path) -> Path:
    """A model repository with en-es/1 and en-lm/1 (tiny, random, exported fp32 + int8)."""
    from export.onnx_export import export_checkpoint

    checkpoints = build_tiny_checkpoints(out)
    for name, checkpoint in checkpoints.items():
        # torchscript: ~20x faster than dynamo for tiny models (export/onnx_export.py).
        export_checkpoint(
            checkpoint, out / name / str(VERSION), ["fp32", "int8"], exporter="torchscript"
        )
    return out


@pytest.fixture(scope="session")
def model_repository(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Tiny en-es and en-lm models, version 1 (cached across runs in .pytest_cache)."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    if cache is None:
        repository = tmp_path_factory.mktemp("models") / "models"
        repository.mkdir()
        return build_model_repository(repository)
    cache_root = Path(cache.mkdir("tiny-models"))
    cached = cache_root / _source_key()
    if (
        not (cached / TRANSLATOR / str(VERSION) / "manifest.json").is_file()
        or not (cached / LANGUAGE_MODEL / str(VERSION) / "manifest.json").is_file()
    ):
        staging = tmp_path_factory.mktemp("tiny-models-build")
        build_model_repository(staging)
        for old in cache_root.iterdir():  # keep one generation
            shutil.rmtree(old, ignore_errors=True)
        shutil.copytree(staging, cached)
    # Each session works on a copy: tests may add versions (reload) without touching the cache.
    repository = tmp_path_factory.mktemp("models") / "models"
    shutil.copytree(cached, repository)
    return repository


# --- server processes ------------------------------------------------------------------


def free_port() -> int:
    """A loopback port free right now (the server refuses to share it: so_reuseport off)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ipv6_loopback() -> bool:
    """Whether this machine can bind ::1 (CI containers may have no IPv6)."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclass
class ServerHandle:
    """A `python -m service` subprocess on loopback."""

    address: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    flags: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def channel(self, **options: object) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=list(options.items()))

    def log(self) -> str:
        """Everything the server wrote to stderr/stdout so far (JSON lines)."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the server and wait for it; returns the exit code (kills on timeout)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return int(self.process.returncode)


def _serving(address: str, credentials: grpc.ChannelCredentials | None = None) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = (
        grpc.secure_channel(
            address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False
    finally:
        channel.close()


def launch_server(
    repository: Path,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
    wait: bool = True,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerHandle:
    """Start `python -m service` on free loopback ports; wait until health says SERVING."""
    port, metrics_port = free_port(), free_port()
    all_flags = (
        "--host", "127.0.0.1",
        "--port", str(port),
        "--metrics-port", str(metrics_port),
        "--model-repository", str(repository),
        *SERVER_FLAGS,
        *flags,
    )  # fmt: skip
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("SERVE_")}
    child_env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    child_env.update(env or {})
    log_dir = log_dir or repository.parent
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", *all_flags],
            cwd=ROOT,
            env=child_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    handle = ServerHandle(
        address=f"127.0.0.1:{port}",
        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
        process=process,
        log_path=log_path,
        flags=all_flags,
        env=env or {},
    )
    if wait:
        wait_serving(handle, credentials)
    return handle


def wait_serving(
    handle: ServerHandle,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = SERVER_START_TIMEOUT_S,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise RuntimeError(
                f"server exited with {handle.process.returncode} before serving:\n"
                + handle.log()[-4000:]
            )
        if _serving(handle.address, credentials):
            return
        time.sleep(0.2)
    handle.stop(signal.SIGKILL)
    raise RuntimeError(f"server not SERVING after {timeout}s:\n" + handle.log()[-4000:])


@pytest.fixture(scope="session")
def start_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServerHandle]]:
    """Factory for private servers; all are stopped (SIGTERM, then SIGKILL) at session end."""
    started: list[ServerHandle] = []
    log_dir = tmp_path_factory.mktemp("server-logs")

    def start(
        *flags: str,
        env: dict[str, str] | None = None,
        repository: Path | None = None,
        wait: bool = True,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> ServerHandle:
        handle = launch_server(
            repository or model_repository, flags, env, log_dir, wait, credentials
        )
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop(timeout=30)


@pytest.fixture(scope="session")
def server(start_server: Callable[..., ServerHandle]) -> ServerHandle:
    """The shared server (default test settings, no auth, no TLS). Do not stop it."""
    return start_server()


@pytest.fixture
def channel(server: ServerHandle) -> Iterator[grpc.Channel]:
    with server.channel() as ch:
        yield ch
