"""Multi-device engines must fit one node of the Ray cluster (`workers.check_engine_room`):
checked on described clusters, since this machine is a single node without a GPU."""

from __future__ import annotations

import pytest

from rayd.config import ConfigError, RunConfig
from rayd.preflight import check_engine_room, check_resources


def config(**teacher: object) -> RunConfig:
    return RunConfig.model_validate(
        {
            "models": {"student": {"path": "/s"}, "teacher": {"path": "/t"}},
            "teacher": {"backend": "vllm", **teacher},
        }
    )


TWO_GPU_NODES = [{"CPU": 32.0, "GPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}]


def test_a_tensor_parallel_group_needs_its_gpus_on_one_node() -> None:
    check_engine_room(config(tensor_parallel_size=4, gpus_per_worker=1), TWO_GPU_NODES)
    # Pipeline stages may span nodes: 4 x 2 = 8 GPUs over two nodes of 4.
    check_engine_room(
        config(tensor_parallel_size=4, pipeline_parallel_size=2, gpus_per_worker=1),
        TWO_GPU_NODES,
    )
    with pytest.raises(
        ConfigError,
        match="tensor_parallel_size=8 needs 8 GPUs on one node; the "
        "largest node of the Ray cluster has 4",
    ):
        check_engine_room(config(tensor_parallel_size=8, gpus_per_worker=1), TWO_GPU_NODES)


def test_a_cpu_engine_keeps_its_ranks_on_one_node() -> None:
    nodes = [{"CPU": 4.0}, {"CPU": 4.0}]
    check_engine_room(config(tensor_parallel_size=2, cpus_per_worker=2), nodes)
    with pytest.raises(ConfigError, match="needs 6 CPUs on one node; the largest node"):
        check_engine_room(config(tensor_parallel_size=2, cpus_per_worker=3), nodes)


def test_no_teacher_engine_no_check() -> None:
    cfg = config(tensor_parallel_size=8, gpus_per_worker=1)
    check_engine_room(cfg, TWO_GPU_NODES, with_teacher=False)


def test_the_cluster_totals_count_every_device_of_an_engine() -> None:
    cfg = config(tensor_parallel_size=2, cpus_per_worker=3)  # 1 + 2 x 3 + 2 x 0.5 CPUs
    check_resources(cfg, {"CPU": 8.0})
    with pytest.raises(ConfigError, match=r"asks for 8 CPUs .* devices per engine.* has 7"):
        check_resources(cfg, {"CPU": 7.0})


def test_learners_that_sample_start_no_rollout_engine_to_find_room_for() -> None:
    cfg = RunConfig.model_validate(
        {
            "models": {"student": {"path": "/s"}, "teacher": {"path": "/t"}},
            "rollout": {"backend": "learner", "cpus_per_worker": 4},
        }
    )
    # 1 teacher CPU + 2 learners x 0.5: the rollout section's 4 CPUs start no actor
    check_resources(cfg, {"CPU": 2.0})
    with pytest.raises(ConfigError, match="asks for 2 CPUs"):
        check_resources(cfg, {"CPU": 1.5})
