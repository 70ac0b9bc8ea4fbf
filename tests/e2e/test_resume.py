"""Exact resume on a local Ray with vLLM engines and two DeepSpeed learners.

Run A trains 6 steps unbroken. Run B gets SIGTERM (what a scheduler or `ray job stop` sends)
during step 3, checkpoints, stops with `preempted`, and the same call resumes it to the end. Then
B's newest checkpoint is corrupted and the run is started once more: it must fall back to the
previous checkpoint with a warning and redo the steps after it. Every time, the per-step losses
must equal A's bit for bit (CPU, fixed seeds), and metrics.jsonl must hold each step once.

The data set has 12 training prompts and a step takes 8, so the epoch boundary falls inside
step 2; grad_accum=2 makes each step two micro-batches per learner.
"""

import json
import os
import signal
import threading
import time

import pytest
import ray

from rayd.config import load_config
from rayd.train import train

STEPS = 6
KEYS = ("loss", "reverse_kl", "grad_norm", "completion_tokens")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()


def config(tmp_path, name, *extra):
    return load_config(
        None,
        [
            f"name={name}",
            f"output_dir={tmp_path}/{{name}}",
            "models.student.path=tiny:test-student",
            "models.teacher.path=tiny:test-teacher",
            "rollout.max_new_tokens=16",
            "rollout.max_model_len=48",
            "teacher.max_model_len=48",
            "learner.num_learners=2",
            "learner.zero_stage=2",
            "learner.micro_batch_size=2",
            "learner.grad_accum=2",
            "learner.optim.lr=1e-2",
            "trainer.prompts_per_step=8",
            f"trainer.max_steps={STEPS}",
            "trainer.eval_every=0",
            "data.train_size=12",
            "data.eval_size=8",
            "logging.progress=false",
            *extra,
        ],
    )


def step_records(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def send_sigterm_when(path, step):
    """SIGTERM to this process once `path` shows `step` (the driver is mid-run by then)."""

    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            if path.exists() and f'"step": {step},' in path.read_text():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_preempted_and_corrupted_runs_resume_to_the_same_losses(local_ray, tmp_path):
    unbroken = config(tmp_path, "unbroken")
    train(unbroken)
    expected = [{k: r[k] for k in KEYS} for r in step_records(unbroken.run_dir)]
    assert len(expected) == STEPS

    # 1. Preemption: SIGTERM mid-run -> checkpoint, stop; the same call resumes.
    broken = config(tmp_path, "broken", "trainer.save_every=2")
    send_sigterm_when(broken.run_dir / "metrics.jsonl", step=2)
    first = train(broken)
    assert first["preempted"], "SIGTERM should stop the run early"
    stopped_at = first["steps"]
    assert 2 <= stopped_at < STEPS
    assert (broken.run_dir / "checkpoints" / f"step-{stopped_at:06d}" / "MANIFEST.json").is_file()
    assert not (broken.run_dir / "student").exists(), "an unfinished run exports no student"

    second = train(broken)
    assert not second["preempted"] and second["steps"] == STEPS
    got = step_records(broken.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in KEYS} for r in got] == expected

    # 2. Corruption: the newest checkpoint (step 6) loses bytes; the run falls back to step 4,
    #    redoes steps 5-6 from the training cursor, and gets the same losses again.
    newest = broken.run_dir / "checkpoints" / f"step-{STEPS:06d}"
    victim = max((p for p in newest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:-16])
    with pytest.warns(UserWarning, match="checksum|bytes, manifest says"):
        third = train(broken)
    assert third["steps"] == STEPS
    got = step_records(broken.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in KEYS} for r in got] == expected
    assert third["final"] == second["final"]
