"""Fixtures for tests that run real actors on a local Ray (tests/conftest.py's): tiny checkpoints.

The tiny models use 2 attention heads of width 32: vLLM's CPU attention supports head sizes
32, 64, 80, ... only (a 16-wide head fails at the first forward pass, not at engine start).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rayd.models import build_tiny_llama


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
