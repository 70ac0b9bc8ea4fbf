"""Where a tiny on-policy run's time goes: its start-up and its steps, read from Ray's timeline.

The run is the `trl` section's tiny pair (`trl.FULL`'s settings: tiny:test-student taught by
tiny:test-teacher, two DeepSpeed learners, 32 prompts x 24 new tokens a step, synchronous loop),
trained three times in this process, each on a local Ray of its own started with
RAY_PROFILING=1, so that `ray.timeline()` holds every actor call's execution interval: with a
vLLM rollout engine and a vLLM teacher (top-k signal), with transformers ones (`backend: hf`),
since at this size an engine's per-call cost, not its compute, may set the pace, and with no
engine actor at all (`learner`: rollout.backend=learner and teacher.support=full, the learners
sample with their own weights and hold the teacher; what the trl section runs for this pair).

Per step (step 1 left out: cold actors), each a median over the timed steps, in seconds:
- `step`: the driver's wall time of the step (metrics.jsonl);
- `stage.*`: the driver's own stage timers (rollout, teacher, learner, sync);
- `busy.<role>`: how long at least one actor of that role was executing a call in the step's
  window (the union of their intervals: two learners working at once count once);
- `busy.any`: how long any actor at all was executing;
- `idle`: `step - busy.any`, the time no actor computed anything: Ray round trips, argument
  and result (de)serialisation, the object store, the driver's own Python between calls;
- `calls.<Class.method>`: calls per step, and `exec.<Class.method>`: their execution seconds
  per step summed over actors.
Start-up, in seconds from the moment `train()` is called (Ray is already up; each run's
`ray_init` is its own figure): when each role's first actor began its `__init__` (process
start, imports and the driver's checks before it), how long the slowest `__init__` of the role
took, when its last `ready` call returned, and when step 1 began (after the held-out eval of
step 0).

    rayd bench --only overhead
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rayd.commands.bench import step_records, step_seconds

ROLES = {"RolloutWorker": "rollout", "TeacherWorker": "teacher", "LearnerWorker": "learner"}
STAGES = ("rollout", "teacher", "learner", "sync")
# One run each: vLLM rollout and teacher engines, then transformers ones, then everything
# inside the learners (rollout.backend=learner, teacher.support=full: no engine actor at all).
BACKENDS = ("vllm", "hf", "learner")


@dataclasses.dataclass(frozen=True)
class Call:
    """One actor call as the timeline saw it: which actor class and method, and when its body
    ran (seconds since the epoch)."""

    cls: str
    method: str
    start: float
    end: float

    @property
    def role(self) -> str | None:
        return ROLES.get(self.cls)


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    import ray

    from rayd import cluster

    if ray.is_initialized():  # profiling is read by Ray's processes when they start
        ray.shutdown()
    os.environ["RAY_PROFILING"] = "1"
    steps = 6 if quick else 20
    runs: dict[str, dict[str, Any]] = {}
    try:
        # A Ray of its own per backend: one cluster's timeline stopped recording the third run's
        # calls (the engines' runs fill Ray's task-event store).
        for backend in BACKENDS:
            started = time.time()
            cluster.connect()
            ray_init = time.time() - started
            runs[backend] = {
                **_measure(Path(workdir) / backend, backend, steps),
                "ray_init": ray_init,
            }
            ray.shutdown()
    finally:
        ray.shutdown()
        os.environ.pop("RAY_PROFILING", None)
    vllm = runs["vllm"]
    return {
        **{
            f"{backend}_over_vllm_step": runs[backend]["per_step"]["step"]
            / vllm["per_step"]["step"]
            for backend in BACKENDS[1:]
        },
        **{
            f"{backend}_over_vllm_startup": runs[backend]["startup"]["first_step_begins"]
            / vllm["startup"]["first_step_begins"]
            for backend in BACKENDS[1:]
        },
        **runs,
        "notes": f"the trl section's tiny pair, {steps} steps per backend, max_staleness=0, in "
        "one process, each backend on a local Ray of its own started with RAY_PROFILING=1 "
        "(its ray_init); step 1 left out of per_step",
    }


def _measure(workdir: Path, backend: str, steps: int) -> dict[str, Any]:
    """One training run of the tiny pair with rollout and teacher on `backend` (learner: both
    inside the learners)."""
    import ray

    from rayd.commands.bench.trl import FULL, rayd_config
    from rayd.driver import train

    settings = dataclasses.replace(FULL, steps=steps, eval_every=steps)
    if backend == "learner":
        settings = dataclasses.replace(settings, rollout_backend="learner", support="full")
    else:
        settings = dataclasses.replace(
            settings, rollout_backend=backend, teacher_backend=backend, support="teacher_topk"
        )
    cfg = rayd_config(settings, workdir / "run")
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"save_every": 0})})
    train_called = time.time()
    train(cfg)
    time.sleep(3)  # workers report their profile events about once a second
    calls = [c for c in timeline_calls(ray.timeline()) if c.start >= train_called]
    records = step_records(cfg.run_dir)
    return {
        "per_step": step_breakdown(calls, records[1:]),
        "startup": startup_breakdown(calls, records[0], train_called),
    }


def timeline_calls(events: Iterable[dict[str, Any]]) -> list[Call]:
    """The actor calls in `ray.timeline()`'s events: each `task::Class.method` event carries
    the call's name and, nested in it on the same worker, a `task:execute` event with the
    interval its body ran (the outer one also holds argument fetching and result storing)."""
    outer: list[dict[str, Any]] = []
    executes: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        cat = str(e.get("cat", ""))
        if e.get("ph") != "X" or "dur" not in e:
            continue
        if cat.startswith("task::"):
            outer.append(e)
        elif cat == "task:execute":
            executes[str(e["tid"])].append((e["ts"], e["ts"] + e["dur"]))
    calls = []
    for e in outer:
        cls, _, method = str(e["cat"]).removeprefix("task::").rpartition(".")
        lo, hi = e["ts"], e["ts"] + e["dur"]
        inner = [(s, t) for s, t in executes.get(str(e["tid"]), ()) if s >= lo and t <= hi]
        s, t = max(inner, key=lambda st: st[1] - st[0]) if inner else (lo, hi)
        calls.append(Call(cls, method, s / 1e6, t / 1e6))
    return sorted(calls, key=lambda c: c.start)


def union_seconds(intervals: Iterable[tuple[float, float]], lo: float, hi: float) -> float:
    """The length of the union of `intervals` clipped to [lo, hi]."""
    clipped = sorted((max(s, lo), min(t, hi)) for s, t in intervals if t > lo and s < hi)
    total, cur_s, cur_t = 0.0, None, None
    for s, t in clipped:
        if cur_t is None or s > cur_t:
            if cur_t is not None:
                total += cur_t - cur_s
            cur_s, cur_t = s, t
        else:
            cur_t = max(cur_t, t)
    if cur_t is not None:
        total += cur_t - cur_s
    return total


def step_breakdown(calls: list[Call], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-step medians (see the module docstring); `records` are metrics.jsonl's step lines."""
    rows: list[dict[str, float]] = []
    for r in records:
        wall = step_seconds(r)
        hi = r["time"]  # logged right after the step's clock stops
        lo = hi - wall
        inside = [c for c in calls if c.end > lo and c.start < hi]
        row = {"step": wall}
        row.update({f"stage.{s}": r.get(f"time/{s}", 0.0) for s in STAGES})
        for role in ROLES.values():
            row[f"busy.{role}"] = union_seconds(
                ((c.start, c.end) for c in inside if c.role == role), lo, hi
            )
        row["busy.any"] = union_seconds(((c.start, c.end) for c in inside), lo, hi)
        row["idle"] = wall - row["busy.any"]
        for c in inside:
            key = f"{c.cls}.{c.method}"
            row[f"calls.{key}"] = row.get(f"calls.{key}", 0) + 1
            row[f"exec.{key}"] = row.get(f"exec.{key}", 0.0) + min(c.end, hi) - max(c.start, lo)
        rows.append(row)
    keys = sorted({k for row in rows for k in row})
    medians = {k: statistics.median(row.get(k, 0.0) for row in rows) for k in keys}
    medians["idle_share"] = medians["idle"] / medians["step"] if medians["step"] else 0.0
    medians["steps"] = len(rows)
    return medians


def startup_breakdown(
    calls: list[Call], first_step: dict[str, Any], train_called: float
) -> dict[str, Any]:
    """Seconds from `train()` to each role's first `__init__`, its slowest `__init__`, its
    last `ready`, and to step 1 (see the module docstring)."""
    out: dict[str, Any] = {}
    for cls, role in ROLES.items():
        inits = [c for c in calls if c.cls == cls and c.method == "__init__"]
        readies = [c for c in calls if c.cls == cls and c.method == "ready"]
        if not inits:
            continue
        out[f"{role}.actors"] = len(inits)
        out[f"{role}.first_init_begins"] = min(c.start for c in inits) - train_called
        out[f"{role}.init_seconds"] = max(c.end - c.start for c in inits)
        if readies:
            out[f"{role}.ready"] = max(c.end for c in readies) - train_called
    out["first_step_begins"] = first_step["time"] - step_seconds(first_step) - train_called
    return out
