"""Exact resume from seeded interruption points of the driver process, in one chain of restarts.

The run is `python -m rayd train CONFIG` in a subprocess, so a SIGKILL of the driver is real:
nothing after the last checkpoint survives (save_every=1). One run takes every interruption in
turn: interrupted, the same command is started again, resumes from its newest checkpoint, is
interrupted again later, ... until it finishes. After each restart the steps it trains must
equal an unbroken run's bit for bit (the keys test_resume.py compares) with the same prompts,
and the whole run must train every prompt exactly once per epoch (`prompt_indices` in
metrics.jsonl).

12 training prompts, 8 per step: step 2's prompts wrap epoch 0 into epoch 1 and step 3's end
exactly at the end of epoch 1. The first two points are forced:
- mid-accumulation: SIGKILL of the driver while the learners hold between the first and the
  second micro-batch of step 2 (grad_accum=2; the learners' test-only hold,
  RAYD_TEST_HOLD_MID_ACCUMULATION in tests/support/sitecustomize.py, says when), so step 2's
  rollouts are lost untrained and must be rolled out again;
- epoch boundary: Ctrl-C (SIGINT to the driver's process group, as a terminal sends it) during
  step 3: it is handled like SIGTERM (the step finishes, is checkpointed, exit code 130), the
  checkpoint's cursor sits exactly at the end of an epoch and the resume must start the next
  one (verl resumed there ran zero steps and exited successfully: verl#7401, #5725).
The others are SIGTERM or SIGKILL at a seeded random moment of a seeded random step.

RAYD_RESUME_POINTS sets the number of points (default 2, for `make test`); the README's figure
comes from `RAYD_RESUME_POINTS=10 .venv/bin/pytest -s -m faults tests/e2e/test_resume_points.py`.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_resume import KEYS, config, step_records  # same folder, rootdir import

from rayd.checkpoint import CheckpointStore
from rayd.config import save_config

# Put first on a driver's PYTHONPATH, its sitecustomize.py holds the learners mid-accumulation
# (Ray's local workers inherit the driver's environment).
SUPPORT = Path(__file__).resolve().parents[1] / "support"
HOLD_MID_ACCUMULATION = "RAYD_TEST_HOLD_MID_ACCUMULATION"

POINTS = int(os.environ.get("RAYD_RESUME_POINTS", "2"))
# Steps take well under a second; starts cost 20-60 s. Random points fall on steps 4 .. STEPS-3:
# a signal that lands a step or two late still stops the run before its end.
STEPS = 5 if POINTS <= 2 else 2 * POINTS + 3
TRAIN_SIZE = 12
SEED = 0
START_TIMEOUT_S = 300  # a driver start (Ray, engines, learners) plus a step, on a loaded box


# The forced points, sent while the learners hold between two micro-batches of their step.
HELD = {"mid-accumulation": signal.SIGKILL, "epoch-boundary": signal.SIGINT}


@dataclass
class Point:
    kind: str  # "mid-accumulation" | "epoch-boundary" | "sigterm" | "sigkill"
    step: int  # the step the signal is meant to land in
    landed_after: int = -1  # the last step logged when the signal was sent
    resumed_from: int = -1  # the checkpoint the next start resumed from
    # Steps trained by the starts that resumed from that checkpoint (a start stopped before
    # its first step leaves the check to the next one), each equal to the unbroken run's?
    compared: int = 0
    identical: bool = True


def plan(points: int, rng: random.Random) -> list[Point]:
    forced = [Point("mid-accumulation", 2), Point("epoch-boundary", 3)]
    randoms = [
        Point(rng.choice(("sigterm", "sigkill")), step)
        for step in sorted(rng.sample(range(4, STEPS - 2), max(0, points - 2)))
    ]
    return sorted((forced + randoms)[:points], key=lambda p: p.step)


class Driver:
    """`python -m rayd train` in a session of its own, so whatever it leaves can be reaped."""

    def __init__(self, cfg_path, log_path, env=None) -> None:
        self.log_path = log_path
        self.started = time.time()
        with open(log_path, "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rayd", "train", str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def session(self) -> list[int]:
        """The processes still in the driver's session (Ray's head and workers, which set
        process groups of their own)."""
        pids = []
        for entry in os.listdir("/proc"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[3]) == self.proc.pid:
                    pids.append(int(entry))
        return pids

    def finish(self, timeout: float) -> int:
        """The driver's exit code, once every process of its session has gone (Ray stops its
        head and workers when the driver dies; stragglers get SIGKILL after 30 s)."""
        rc = self.proc.wait(timeout=timeout)
        deadline = time.time() + 30
        while (left := self.session()) and time.time() < deadline:
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return rc


def wait_for(condition, driver: Driver, what: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert driver.alive(), f"the driver exited before {what}:\n{driver.log()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout} s:\n{driver.log()[-3000:]}"
        time.sleep(0.05)


def logged_steps(run_dir, since: float = 0.0) -> list[int]:
    """Steps with a training record written after `since` (a lost last line is skipped)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if "loss" in record and record["time"] >= since:
                steps.append(record["step"])
    return steps


def newest_checkpoint(run_dir) -> int:
    ckpt, _ = CheckpointStore(run_dir / "checkpoints").latest_valid()
    return ckpt.step if ckpt else 0


def epochs_of(sequence: list[int]) -> list[list[int]]:
    return [sequence[i : i + TRAIN_SIZE] for i in range(0, len(sequence), TRAIN_SIZE)]


def interrupt(point: Point, driver: Driver, run_dir, resumed: int, step_s: float, rng) -> None:
    """Send the point's signal at its moment; record which step it landed after."""
    if point.kind in HELD:
        held = run_dir.parent / "held"
        wait_for(held.exists, driver, f"the learners' hold in step {point.step}")
        if HELD[point.kind] == signal.SIGINT:  # Ctrl-C reaches the terminal's process group
            os.killpg(driver.proc.pid, signal.SIGINT)
        else:
            driver.proc.send_signal(HELD[point.kind])
        point.landed_after = max(logged_steps(run_dir), default=0)
        held.unlink()  # SIGINT: the step goes on, is saved, and the driver stops
        return
    # The point's step has begun: the step before it logged by this start, or resumed from.
    if point.step - 1 == resumed:
        ready = lambda: "rayd: resumed from" in driver.log()  # noqa: E731
    else:
        ready = lambda: point.step - 1 in logged_steps(run_dir, driver.started)  # noqa: E731
    wait_for(ready, driver, f"step {point.step}")
    time.sleep(rng.uniform(0, 0.9 * step_s))
    point.landed_after = max(logged_steps(run_dir), default=0)
    driver.proc.send_signal(signal.SIGKILL if point.kind == "sigkill" else signal.SIGTERM)


@pytest.mark.faults
@pytest.mark.timeout(900 + 240 * POINTS)  # each point costs a driver start (Ray, actors)
def test_interrupted_driver_resumes_bit_identical_at_every_point(tmp_path):
    began = time.time()
    overrides = (
        f"trainer.max_steps={STEPS}",
        "trainer.save_every=1",
        f"trainer.seed={SEED}",
        # Transformers engines start in seconds, vLLM's in 20-40 (each point is a start);
        # test_resume.py resumes the vLLM engines.
        "rollout.backend=hf",
        "teacher.backend=hf",
    )

    def run_dir_and_config(name):
        cfg = config(tmp_path, name, *overrides)
        assert cfg.data.train_size == TRAIN_SIZE and cfg.trainer.prompts_per_step == 8
        path = tmp_path / f"{name}.yaml"
        save_config(cfg, path)
        return cfg.run_dir, path

    # The unbroken run, the same way.
    ref_dir, ref_cfg = run_dir_and_config("unbroken")
    ref = Driver(ref_cfg, tmp_path / "unbroken.log")
    assert ref.finish(timeout=START_TIMEOUT_S + 60 * STEPS) == 0, ref.log()[-3000:]
    expected = step_records(ref_dir)
    assert [r["step"] for r in expected] == list(range(1, STEPS + 1))
    step_s = (expected[-1]["time"] - expected[0]["time"]) / (STEPS - 1)
    trained = [i for r in expected for i in r["prompt_indices"]]
    train_set = set(epochs_of(trained)[0])
    assert len(train_set) == TRAIN_SIZE
    for epoch in epochs_of(trained):
        assert len(set(epoch)) == len(epoch) and set(epoch) <= train_set

    rng = random.Random(SEED)
    points = plan(POINTS, rng)
    run_dir, cfg_path = run_dir_and_config("interrupted")
    pending = list(points)
    starts = 0
    resumed = 0
    stopped: list[Point] = []  # the points that stopped the starts so far
    while True:
        starts += 1
        point = pending.pop(0) if pending else None
        if point is not None and point.step <= resumed:  # an earlier signal landed a step late
            point.step = resumed + 1
            assert point.step < STEPS, "signals landed so late that the run has no step left"
        env = {}
        if point is not None and point.kind in HELD:
            env[HOLD_MID_ACCUMULATION] = f"{point.step}:{tmp_path / 'held'}"
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(SUPPORT), os.environ.get("PYTHONPATH")) if p
            )
        driver = Driver(cfg_path, tmp_path / f"interrupted-{starts}.log", env)
        if point is None:
            assert driver.finish(timeout=START_TIMEOUT_S + 60 * STEPS) == 0, driver.log()[-3000:]
        else:
            interrupt(point, driver, run_dir, resumed, step_s, rng)
            rc = driver.finish(timeout=START_TIMEOUT_S)
            assert rc in (-signal.SIGKILL, 143, 130), f"exit code {rc}:\n{driver.log()[-3000:]}"
            if HELD.get(point.kind) == signal.SIGINT:  # a checkpoint, not a KeyboardInterrupt
                assert rc == 130 and "KeyboardInterrupt" not in driver.log(), driver.log()[-3000:]
        # The steps this start trained: each the unbroken run's, prompts included.
        got = [r for r in step_records(run_dir) if r["step"] > resumed]
        same = all(
            {k: r[k] for k in (*KEYS, "prompt_indices")}
            == {k: expected[r["step"] - 1][k] for k in (*KEYS, "prompt_indices")}
            for r in got
        )
        for p in stopped:
            if p.resumed_from == resumed:
                p.compared += len(got)
                p.identical &= same
        assert same, f"start {starts} (resumed from step {resumed}) diverged from the unbroken run"
        if point is None:
            break
        if point.kind == "mid-accumulation":
            assert point.landed_after == point.step - 1, "the hold is inside the point's step"
            assert newest_checkpoint(run_dir) == point.step - 1, "nothing saved for that step"
        if point.kind == "epoch-boundary":
            assert point.landed_after == point.step - 1, "the hold is inside the point's step"
            assert newest_checkpoint(run_dir) == point.step, "SIGTERM saves the step and stops"
            cursor = CheckpointStore(run_dir / "checkpoints").latest_valid()[0].driver_state()
            assert cursor["sampler"]["offset"] == TRAIN_SIZE, "the cursor is at an epoch's end"
        resumed = point.resumed_from = newest_checkpoint(run_dir)
        stopped.append(point)

    got = step_records(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "each step logged once"
    assert [{k: r[k] for k in KEYS} for r in got] == [{k: r[k] for k in KEYS} for r in expected]
    sequence = [i for r in got for i in r["prompt_indices"]]
    lost = duplicated = 0
    for epoch in epochs_of(sequence):
        duplicated += len(epoch) - len(set(epoch))
        if len(epoch) == TRAIN_SIZE:
            lost += len(train_set - set(epoch))
    wall = time.time() - began

    print(f"\nresume points: {len(points)} tried, seed {SEED}, {STEPS}-step run, {starts} starts")
    for p in points:
        print(
            f"  {p.kind:16s} planned in step {p.step:2d}, signal after step {p.landed_after:2d} "
            f"logged, resumed from step {p.resumed_from:2d}, {p.compared} steps from there: "
            + ("bit-identical" if p.identical and p.compared else "DIVERGED or unchecked")
        )
    print(
        f"  bit-identical: {sum(p.identical and p.compared > 0 for p in points)} of {len(points)}; "
        f"prompts lost "
        f"{lost}, duplicated {duplicated} over {len(epochs_of(sequence))} epochs; "
        f"wall {wall:.0f} s"
    )
    assert all(p.identical and p.compared > 0 for p in points)
    assert lost == 0 and duplicated == 0
