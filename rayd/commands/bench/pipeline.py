"""The pipelined loop (trainer.max_staleness=1) against the synchronous one (=0).

Both train the same tiny on-policy config (configs/demo/tiny.yaml's: tiny:test-student and
tiny:test-teacher, vLLM rollouts and teacher, two DeepSpeed learners, dense top-k reverse KL) for
the same steps, one after the other in this process and on the same local Ray. tokens/s =
completion tokens trained / wall time of the training steps, read from each run's metrics.jsonl
(tokens / tokens_per_s per step), so start-up and the held-out evals before and after are left
out. Step 1 is left out of both: its actors are cold (first vLLM batch, first DeepSpeed step),
and the pipelined loop has nothing prefetched yet. Per-stage figures are seconds per step: with
the pipeline, "rollout" runs beside the previous step's teacher scoring and learner step, and
"teacher" and "learner" are what the driver still waited for.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayd.commands.bench import TINY_CONFIG, step_records, step_seconds

STAGES = ("rollout", "teacher", "learner", "sync")


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        # A Ray of this machine's own (not one another process started), with the logical
        # CPUs a local run gets (rayd.cluster.connect): both loops share it.
        ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)
    steps = 6 if quick else 20
    sync = _train(workdir, "sync", 0, steps)
    pipelined = _train(workdir, "async", 1, steps)
    return {
        "async_over_sync": pipelined["tokens_per_s"] / sync["tokens_per_s"],
        "sync_tokens_per_s": sync["tokens_per_s"],
        "async_tokens_per_s": pipelined["tokens_per_s"],
        "steps": steps,
        "timed_steps": steps - 1,
        "sync_seconds_per_step": sync["seconds_per_step"],
        "async_seconds_per_step": pipelined["seconds_per_step"],
        "async_staleness_mean": pipelined["staleness_mean"],
        "notes": f"{TINY_CONFIG.name}, {steps} steps each, step 1 left out (cold actors); "
        "max_staleness=0 then 1 in one process",
    }


def _train(
    workdir: Path, name: str, max_staleness: int, steps: int, extra: Sequence[str] = ()
) -> dict[str, Any]:
    from rayd.config import load_config
    from rayd.driver import train

    cfg = load_config(
        str(TINY_CONFIG),
        [
            f"name={name}",
            f"output_dir={workdir}/{{name}}",
            f"trainer.max_steps={steps}",
            f"trainer.max_staleness={max_staleness}",
            "trainer.eval_every=0",
            "data.eval_size=8",
            "logging.progress=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )
    train(cfg)
    records = step_records(cfg.run_dir)[1:]
    tokens = sum(r["completion_tokens"] for r in records)
    wall = sum(step_seconds(r) for r in records)
    return {
        "tokens_per_s": tokens / wall,
        "seconds_per_step": {
            "total": wall / len(records),
            **{s: statistics.fmean(r.get(f"time/{s}", 0.0) for r in records) for s in STAGES},
        },
        "staleness_mean": statistics.fmean(r["staleness/mean"] for r in records),
    }
