"""Shared test set-up: few threads per process (2-core CI), models cached per test session."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    # Tiny models are built once per session, never read from a developer's ~/.cache.
    os.environ["RAYD_CACHE"] = str(tmp_path_factory.mktemp("rayd-cache"))
