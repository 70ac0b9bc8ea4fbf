"""Fixtures for the distributed tests: a local Ray and tiny checkpoints built on the spot."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from rayd.models import build_tiny_llama

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for this module; logical CPUs so 0.5-CPU learner actors fit on 2 cores."""
    if ray.is_initialized():  # another module's fixture owns it
        yield
        return
    # Actors must import rayd however pytest found it (rootdir, not PYTHONPATH).
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",  # never a `ray start` cluster that happens to run on this machine
        num_cpus=8,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def student_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("student"), layers=2, hidden=64, seed=0)


@pytest.fixture(scope="session")
def teacher_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("teacher"), layers=2, hidden=64, seed=1)
