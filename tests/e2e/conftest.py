"""A local Ray per test module, shared by the end-to-end tests that drive `train()` in-process."""

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    # "local": never a `ray start` cluster that happens to run on this machine
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
