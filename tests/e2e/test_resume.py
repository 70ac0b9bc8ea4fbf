"""Exact resume and actor faults on a local Ray with vLLM engines and two DeepSpeed learners.

Run A trains 6 steps unbroken. Run B gets SIGTERM (what a scheduler or `ray job stop` sends)
during step 3, checkpoints, stops with `preempted`, and the same call resumes it to the end. Then
B's newest checkpoint is corrupted and the run is started once more: it must fall back to the
previous checkpoint with a warning and redo the steps after it. Every time, the per-step losses
must equal A's bit for bit (CPU, fixed seeds), and metrics.jsonl must hold each step once.
A and B are pipelined (trainer.max_staleness=1): B's checkpoints hold the rollouts prefetched
from older weights, which a resume cannot redo. (The synchronous loop's preemption and
corruption are in test_random_faults.py, against its own unbroken run.)

Run A streams its weights to the engine (sync.method=auto). A pipelined run of two engines,
weights streamed, loses one: its calls go to the other until the next sync, and the losses are
those of the pipelined runs of one engine, which get their weights as object-store blobs.
A third run has its rollout engine killed (SIGKILL) and later its teacher: Ray restarts each,
the pool re-sends the current weights and re-issues the call, and the losses are A's again. A
fourth loses a learner rank: the whole group is rebuilt from the last checkpoint, and the losses
are A's again. With the learners sampling and scoring themselves (rollout.backend=learner,
teacher.support=full: no engine actor) a run is preempted and resumed, and another loses a
rank, each against its own unbroken run.

The data set has 12 training prompts and a step takes 8, so the epoch boundary falls inside
step 2; grad_accum=2 makes each step two micro-batches per learner.
"""

import json
import os
import signal
import threading
import time

import pytest

from rayd.config import load_config
from rayd.data.prompts import PromptSampler
from rayd.driver import train

STEPS = 6
KEYS = ("loss", "reverse_kl", "grad_norm", "completion_tokens")


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


def when_step_logged(path, step, action):
    """Run `action()` in a thread once `path` shows `step` (the driver is mid-run by then)."""

    def watch():
        deadline = time.time() + 600
        while time.time() < deadline:
            if path.exists() and f'"step": {step},' in path.read_text():
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def actor_pids(class_name):
    """Processes of live Ray actors of a class, found by the title Ray gives them."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith(f"ray::{class_name}"):
                pids.append(int(entry))
    return pids


def kill_actor(class_name, count=1):
    def action():
        pids = actor_pids(class_name)
        assert len(pids) == count, f"expected {count} {class_name} processes, found {pids}"
        os.kill(max(pids), signal.SIGKILL)

    return action


@pytest.fixture(scope="module")
def expected(ray_local, tmp_path_factory):
    unbroken = config(tmp_path_factory.mktemp("unbroken"), "unbroken")
    train(unbroken)
    losses = [{k: r[k] for k in KEYS} for r in step_records(unbroken.run_dir)]
    assert len(losses) == STEPS
    return losses


@pytest.fixture(scope="module")
def expected_pipelined(ray_local, tmp_path_factory):
    unbroken = config(tmp_path_factory.mktemp("pipelined"), "pipelined", PIPELINED)
    train(unbroken)
    records = step_records(unbroken.run_dir)
    # Step 1 is rolled out from the weights it trains; every later step one version behind.
    assert [r["staleness/max"] for r in records] == [0.0] + [1.0] * (STEPS - 1)
    return [{k: r[k] for k in KEYS} for r in records]


PIPELINED = "trainer.max_staleness=1"
# No engine actor at all: the learners sample with their own weights and hold the teacher.
COLOCATED = ("rollout.backend=learner", "teacher.support=full", "algorithm.loss=reverse_kl")


@pytest.fixture(scope="module")
def expected_colocated(ray_local, tmp_path_factory):
    unbroken = config(tmp_path_factory.mktemp("colocated"), "colocated", *COLOCATED)
    train(unbroken)
    records = step_records(unbroken.run_dir)
    # Each step is sampled by the weights it trains, and the samples say so.
    assert [r["weight_version"] for r in records] == list(range(1, STEPS + 1))
    assert [r["staleness/max"] for r in records] == [0.0] * STEPS
    return [{k: r[k] for k in KEYS} for r in records]


@pytest.mark.faults
def test_a_pipelined_streamed_run_hands_a_lost_engines_rollouts_to_another(
    expected_pipelined, tmp_path
):
    """Two engines, rollouts made ahead, weights streamed (auto), one engine killed mid-run (in
    practice during the sync that follows a logged step; tests/ray/test_weight_stream.py loses
    one mid-rollout). The losses are those of the pipelined run, whose one engine gets its
    weights as object-store blobs (auto, below two engines), bit for bit: either method puts
    the same weights in the engines."""
    cfg = config(tmp_path, "pipelined-stream", PIPELINED, "rollout.num_workers=2")
    killer = when_step_logged(cfg.run_dir / "metrics.jsonl", 2, kill_actor("RolloutWorker", 2))
    train(cfg)
    killer.join(timeout=1)
    assert not killer.is_alive()
    records = step_records(cfg.run_dir)
    assert [{k: r[k] for k in KEYS} for r in records] == expected_pipelined
    assert records[-1]["faults/rollout"] >= 1
    # Steps 2-5 sync (the last step makes nothing ahead); a broken sync logs no figures.
    assert sum("sync/bytes" in r for r in records) >= STEPS - 3


@pytest.mark.faults
def test_preempted_and_corrupted_pipelined_runs_resume_to_the_same_losses(
    expected_pipelined, tmp_path
):
    expected = expected_pipelined

    # 1. Preemption: SIGTERM mid-run -> checkpoint, stop; the same call resumes.
    broken = config(tmp_path, "broken", "trainer.save_every=2", PIPELINED)
    when_step_logged(
        broken.run_dir / "metrics.jsonl", 2, lambda: os.kill(os.getpid(), signal.SIGTERM)
    )
    first = train(broken)
    assert first["preempted"], "SIGTERM should stop the run early"
    stopped_at = first["steps"]
    assert 2 <= stopped_at < STEPS
    assert (broken.run_dir / "checkpoints" / f"step-{stopped_at:06d}" / "MANIFEST.json").is_file()
    assert not (broken.run_dir / "student").exists(), "an unfinished run exports no student"
    # The checkpoint holds the next step, rolled out before the stop, and the prompt cursor
    # after it: every prompt once per epoch, none lost or repeated across the stop.
    checkpoint = broken.run_dir / "checkpoints" / f"step-{stopped_at:06d}"
    state = json.loads((checkpoint / "driver.json").read_text())
    sampler = PromptSampler(12, broken.trainer.seed)
    drawn = sampler.next(8 * (stopped_at + 1))
    saved = [s["prompt_index"] for chunk in state["prefetched"]["chunks"] for s in chunk]
    assert state["prefetched"]["step"] == stopped_at + 1
    assert saved == drawn[8 * stopped_at :]
    assert state["sampler"] == sampler.state()

    # A SIGTERM once the last step has begun finishes the run (checkpoint, eval, student)
    # instead of reporting it preempted. Sent when the student export starts: a signal sent
    # after step 5 is logged may still land before step 5's own stop check.
    student_config = broken.run_dir / "student" / "config.json"

    def when_exporting():
        deadline = time.time() + 600
        while time.time() < deadline and not student_config.exists():
            time.sleep(0.01)
        if student_config.exists():
            os.kill(os.getpid(), signal.SIGTERM)

    # The driver installs its handler over this one; a signal that came after it returned
    # must not end pytest.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        sender = threading.Thread(target=when_exporting, daemon=True)
        sender.start()
        second = train(broken)
        sender.join(timeout=30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not second["preempted"] and second["steps"] == STEPS
    assert student_config.is_file()
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


@pytest.mark.faults
def test_killed_rollout_and_teacher_actors_are_restarted_and_the_step_completes(expected, tmp_path):
    cfg = config(tmp_path, "faults")
    metrics = cfg.run_dir / "metrics.jsonl"
    killers = [
        when_step_logged(metrics, 2, kill_actor("RolloutWorker")),
        when_step_logged(metrics, 4, kill_actor("TeacherWorker")),
    ]
    summary = train(cfg)
    for thread in killers:
        thread.join(timeout=1)
        assert not thread.is_alive()
    assert summary["steps"] == STEPS and not summary["preempted"]
    got = step_records(cfg.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in KEYS} for r in got] == expected
    assert got[-1]["faults/rollout"] == 1
    assert got[-1]["faults/teacher"] == 1


@pytest.mark.faults
def test_a_killed_learner_rebuilds_the_run_from_the_last_checkpoint(expected, tmp_path):
    cfg = config(tmp_path, "learner-fault", "trainer.save_every=2")
    killer = when_step_logged(
        cfg.run_dir / "metrics.jsonl", 3, kill_actor("LearnerWorker", count=2)
    )
    summary = train(cfg)
    killer.join(timeout=1)
    assert not killer.is_alive()
    assert summary["steps"] == STEPS and not summary["preempted"]
    got = step_records(cfg.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in KEYS} for r in got] == expected
    assert got[-1]["faults/learner_restarts"] == 1


@pytest.mark.faults
def test_learners_that_sample_resume_exactly_and_are_rebuilt_after_a_lost_rank(
    expected_colocated, tmp_path
):
    # Preempted mid-run, resumed by the same call: the learners' sampler restarts at the
    # checkpoint's weight version and draws what the unbroken run drew.
    broken = config(tmp_path, "colocated-broken", "trainer.save_every=2", *COLOCATED)
    when_step_logged(
        broken.run_dir / "metrics.jsonl", 2, lambda: os.kill(os.getpid(), signal.SIGTERM)
    )
    first = train(broken)
    assert first["preempted"] and 2 <= first["steps"] < STEPS
    second = train(broken)
    assert not second["preempted"] and second["steps"] == STEPS
    got = step_records(broken.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in KEYS} for r in got] == expected_colocated

    # A rank killed (while sampling or training): the group is rebuilt from the last checkpoint.
    lost = config(tmp_path, "colocated-lost", "trainer.save_every=2", *COLOCATED)
    killer = when_step_logged(
        lost.run_dir / "metrics.jsonl", 3, kill_actor("LearnerWorker", count=2)
    )
    summary = train(lost)
    killer.join(timeout=1)
    assert not killer.is_alive()
    assert summary["steps"] == STEPS and not summary["preempted"]
    got = step_records(lost.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [{k: r[k] for k in KEYS} for r in got] == expected_colocated
    assert got[-1]["faults/learner_restarts"] == 1
