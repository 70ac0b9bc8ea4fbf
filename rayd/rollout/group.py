"""The driver's handle on the rollout actors: a `cluster.WorkerPool` of `RolloutWorker`s.

`start_rollout` builds it from the student's `EngineSpec` (worker i seeded seed + i) and the
`rollout:` section's pool settings; the pool does the rest (deadlines, restarts, re-issues).
Also what every pool of engine actors (rollout or teacher) starts with: `start_pool`, the Ray
options, placement groups for multi-device engines.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rayd.cluster import WorkerPool
from rayd.config import EngineSection, TrainerConfig
from rayd.rollout.spec import EngineSpec
from rayd.rollout.worker import RolloutWorker


def engine_runtime_env() -> dict[str, Any]:
    """vLLM logs every weight reload and prefix-cache reset at INFO: once per step per engine,
    which buries the progress bar. WARNING unless the user asked for more. torch's C++ warnings
    in an engine (vLLM-CPU's NUMA memory binding notice, once per engine) only at ERROR, unless
    the user set TORCH_CPP_LOG_LEVEL. The job-wide part is `rayd.noise.worker_runtime_env`."""
    return {
        "env_vars": {
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
            "TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"),
        }
    }


def engine_options(cpus: float, gpus: float, restarts: int) -> dict[str, Any]:
    """Ray options of a rollout or teacher engine actor (`restarts`: trainer.actor_restarts)."""
    return {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "runtime_env": engine_runtime_env(),
        # Ray restarts a dead engine; the pool restores its state and re-issues the call
        # (max_task_retries=0: Ray must not replay a call on an engine without weights).
        "max_restarts": restarts,
        "max_task_retries": 0,
    }


# A multi-device engine's actor on a GPU cluster: this share of bundle 0's GPU (so the actor
# sees the device, as rayd.device and vLLM's platform detection expect), vLLM's Ray worker of
# rank 0 the rest (VLLM_RAY_PER_WORKER_GPUS; each other rank the same share of its own GPU).
ENGINE_ACTOR_GPU_SHARE = 0.1


def spawn_engines(
    cls: type, specs: Sequence[EngineSpec], options: dict[str, Any], timeout_s: float
) -> tuple[list[Any], list[PlacementGroup]]:
    """One engine actor per spec, with `options` (`engine_options`); a multi-device engine
    (`spec.devices > 1`) in a placement group of its own, one bundle per device, which vLLM
    finds from inside the actor and puts its ranks on. Returns the actors and the groups (the
    pool removes them on shutdown)."""
    actors: list[Any] = []
    groups: list[PlacementGroup] = []
    try:
        for spec in specs:
            opts = dict(options)
            if spec.devices > 1:
                group = engine_placement_group(
                    spec.devices, options["num_cpus"], options["num_gpus"], timeout_s
                )
                groups.append(group)
                opts.update(placed_in(group, options))
            actors.append(ray.remote(cls).options(**opts).remote(spec))
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        for group in groups:
            remove_placement_group(group)
        raise
    return actors, groups


def engine_placement_group(
    devices: int, cpus: float, gpus: float, timeout_s: float
) -> PlacementGroup:
    """A bundle per device of one engine, reserved before its actor starts.

    GPU: one GPU (and the section's CPUs) per bundle, PACK: on one node where one has room, else
    across nodes, as vLLM's pipeline stages may be. CPU: the section's CPUs per rank, all on
    the actor's node (STRICT_PACK: the ranks are the actor's child processes)."""
    bundle = {"CPU": cpus, "GPU": 1.0} if gpus else {"CPU": cpus}
    group = placement_group(
        [dict(bundle) for _ in range(devices)], strategy="PACK" if gpus else "STRICT_PACK"
    )
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"a {devices}-device engine ({devices} x {bundle}) found no room in the Ray "
            f"cluster within {timeout_s:.0f}s (other actors hold the resources?)"
        ) from None
    return group


def placed_in(group: PlacementGroup, options: dict[str, Any]) -> dict[str, Any]:
    """The actor's options inside its engine's placement group (bundle 0)."""
    strategy = PlacementGroupSchedulingStrategy(
        placement_group=group,
        placement_group_bundle_index=0,
        # vLLM's Ray workers, started from inside the actor, land in this group's bundles.
        placement_group_capture_child_tasks=True,
    )
    if not options["num_gpus"]:
        return {"scheduling_strategy": strategy}
    env = dict(options["runtime_env"])
    env["env_vars"] = {
        **env.get("env_vars", {}),
        "VLLM_RAY_PER_WORKER_GPUS": str(1 - ENGINE_ACTOR_GPU_SHARE),
    }
    return {
        "scheduling_strategy": strategy,
        "num_gpus": ENGINE_ACTOR_GPU_SHARE,
        "runtime_env": env,
    }


def start_pool(
    cls: type,
    specs: Sequence[EngineSpec],
    section: EngineSection,
    trainer: TrainerConfig,
    name: str,
) -> WorkerPool:
    """A pool of engine actors of `cls`, one per spec, with the Ray resources of `section` (a
    rollout: or teacher: config section) and the deadlines and restarts of `trainer`; not yet
    waited for (`call_all("ready")`)."""
    actors, groups = spawn_engines(
        cls,
        specs,
        engine_options(section.cpus_per_worker, section.gpus_per_worker, trainer.actor_restarts),
        trainer.call_timeout_s,
    )
    return WorkerPool(
        actors,
        name,
        trainer.call_timeout_s,
        max_reissues=trainer.actor_restarts,
        placement_groups=groups,
    )


def start_rollout(section: EngineSection, trainer: TrainerConfig, spec: EngineSpec) -> WorkerPool:
    """`rollout.num_workers` actors of `spec` (`EngineSpec.rollout`), worker i seeded seed + i;
    not yet waited for (`call_all("ready")`)."""
    specs = [spec.for_worker(i) for i in range(section.num_workers)]
    return start_pool(RolloutWorker, specs, section, trainer, "rollout")
