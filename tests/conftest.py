"""Shared test set-up: few threads per process (2-core CI), models cached per test session, and
one local Ray for every test that needs one (tests/README.md says which folders do)."""

import os
from pathlib import Path

import pytest
import ray
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    # Tiny models are built once per session, never read from a developer's ~/.cache.
    os.environ["RAYD_CACHE"] = str(tmp_path_factory.mktemp("rayd-cache"))


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with more logical CPUs than cores, so several actors fit on a 2-core machine.

    Started by the first module that asks and kept for the next ones (a start costs seconds);
    a test that shuts Ray down (the bad-input table checks no case starts it) only makes the
    next module start another. Its workers inherit this environment: they import rayd however
    pytest found it (the rootdir, without an install) and use one OpenMP thread each. Each
    run's own actors are gone when its `train` returns, so modules share nothing else."""
    if not ray.is_initialized():
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = pythonpath
        try:
            # "local": never a `ray start` cluster that happens to run on this machine
            ray.init(address="local", num_cpus=8, include_dashboard=False)
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    yield


@pytest.fixture(scope="session", autouse=True)
def _ray_down_at_the_end():
    yield
    if ray.is_initialized():
        ray.shutdown()
