"""The checked-in generated code (service/gen/) matches proto/: regenerate and compare."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools", reason="grpcio-tools (dev extra) regenerates the code")

from service.gen.__main__ import DEFAULT_OUT, generate


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert written, "protoc wrote nothing"
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.py*")}
    checked_in = {
        p.relative_to(DEFAULT_OUT): p.read_bytes()
        for p in DEFAULT_OUT.rglob("*.py*")
        if p.name != "__main__.py" and "__pycache__" not in p.parts and p.parent != DEFAULT_OUT
    }
    stale = sorted(str(k) for k in fresh if checked_in.get(k) != fresh[k])
    extra = sorted(str(k) for k in checked_in if k not in fresh)
    assert not stale and not extra, (
        f"service/gen is out of date with proto/ (stale {stale}, extra {extra}): run `make proto`"
    )


def test_generated_imports_resolve_from_the_package() -> None:
    from service.gen.inference.v1 import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.name == "inference/v1/inference.proto"
    assert "service.gen.inference.v1" in inference_pb2_grpc.__name__
    source = Path(inference_pb2_grpc.__file__).read_text()
    assert "from service.gen.inference.v1 import inference_pb2" in source


def test_the_generator_refuses_a_flag_instead_of_writing_into_a_folder_named_after_it(
    tmp_path: Path,
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "service.gen", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(DEFAULT_OUT.parents[1])},
    )
    assert run.returncode == 1 and "usage: python -m service.gen [OUT_DIR]" in run.stderr
    assert not (tmp_path / "--help").exists()
