"""Fixtures for the distributed tests: tiny checkpoints built on the spot (the local Ray is
tests/conftest.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rayd.models import build_tiny_llama

@pytest.fixture(scope="session")
def student_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("student"), layers=2, hidden=64, seed=0)


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("teacher"), layers=2, hidden=64, seed=1)
