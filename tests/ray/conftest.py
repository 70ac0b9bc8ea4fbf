"""Fixtures for tests that run real actors on a local Ray: one Ray per session, tiny checkpoints.

The tiny models use 2 attention heads of width 32: vLLM's CPU attention supports head sizes
32, 64, 80, ... only (a 16-wide head fails at the first forward pass, not at engine start).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from rayd.models import build_tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with more logical CPUs than cores, so several actors fit on a 2-core machine."""
    if ray.is_initialized():  # someone else owns it: use it, leave it
        yield
        return
    # Actors and the vLLM processes they spawn must import rayd even when pytest found it only
    # through its rootdir (no PYTHONPATH, no install).
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    ray.init(
        address="local",  # never a `ray start` cluster that happens to run on this machine
        num_cpus=8,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> Path:
    return build_tiny_llama(
        tmp_path_factory.mktemp("student"), layers=2, hidden=64, heads=2, max_positions=512, seed=0
    )


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """Same tokenizer as the student, different (larger) weights."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("teacher"), layers=3, hidden=96, heads=3, max_positions=512, seed=1
    )
