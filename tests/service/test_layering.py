"""The layering rules of the service, checked on the source: they keep the serving image
free of torch and keep each layer replaceable."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parents[2] / "service"
MODULES = sorted(p for p in SERVICE.rglob("*.py") if "gen" not in p.relative_to(SERVICE).parts)


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a module imports (absolute imports only)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_there_are_modules_to_check() -> None:
    names = {p.name for p in MODULES}
    assert {"engine.py", "scheduler.py", "server.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SERVICE)))
def test_nothing_in_service_imports_torch_or_transformer(path: Path) -> None:
    forbidden = imported_roots(path) & {"torch", "transformer"}
    assert not forbidden, f"{path} imports {forbidden}: the serving image has no torch"


def test_scheduler_never_imports_grpc() -> None:
    assert "grpc" not in imported_roots(SERVICE / "scheduler.py")


def test_engine_never_imports_asyncio() -> None:
    assert "asyncio" not in imported_roots(SERVICE / "engine.py")


def test_domain_knows_no_transport() -> None:
    assert not imported_roots(SERVICE / "domain.py") & {"grpc", "asyncio", "onnxruntime"}
