"""The driver's handle on the rollout actors: a `cluster.WorkerPool` of `RolloutWorker`s.

`start_rollout` builds it from the student's `EngineSpec` (worker i seeded seed + i) and the
`rollout:` section's pool settings; the pool does the rest (deadlines, restarts, re-issues).
Also the Ray options every engine actor (rollout or teacher) starts with.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from rayd.cluster import WorkerPool
from rayd.config import RunConfig
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


def engine_options(cfg: RunConfig, cpus: float, gpus: float) -> dict[str, Any]:
    """Ray options of a rollout or teacher engine actor."""
    return {
        "num_cpus": cpus,
        "num_gpus": gpus,
        "runtime_env": engine_runtime_env(),
        # Ray restarts a dead engine; the pool restores its state and re-issues the call
        # (max_task_retries=0: Ray must not replay a call on an engine without weights).
        "max_restarts": cfg.trainer.actor_restarts,
        "max_task_retries": 0,
    }


def start_rollout(cfg: RunConfig, spec: EngineSpec) -> WorkerPool:
    """`rollout.num_workers` actors of `spec` (`EngineSpec.rollout`), not yet waited for
    (`call_all("ready")`)."""
    r = cfg.rollout
    remote = ray.remote(RolloutWorker).options(
        **engine_options(cfg, r.cpus_per_worker, r.gpus_per_worker)
    )
    return WorkerPool(
        [remote.remote(spec.for_worker(i)) for i in range(r.num_workers)],
        "rollout",
        cfg.trainer.call_timeout_s,
        max_reissues=cfg.trainer.actor_restarts,
    )
