"""Fixtures shared by the in-process service tests (engine, backends, scheduler, repository)."""

from __future__ import annotations

import pytest

from tests.service._engine_models import model_repository


@pytest.fixture(scope="session")
def exported_models() -> None:
    """Export the tiny models (once per process) before timing any test that uses them."""
    model_repository()
