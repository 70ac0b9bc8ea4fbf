"""Seeded random fault injection: many faults in one run, and the run still equals an unbroken one.

A seed draws N injections at distinct steps, each one of: kill the rollout engine, kill the
teacher, kill a learner rank (SIGKILL), SIGTERM the driver (it checkpoints and stops; the test
starts it again, as a scheduler would), or SIGTERM plus a corrupted newest checkpoint (the resume
must fall back to the one before). The run must end at the planned step count with every step
logged once and per-step losses equal to the unbroken run's, bit for bit.

N is RAYD_FAULTS (default 3, to keep `make test` short); the README's figures come from
`RAYD_FAULTS=20 .venv/bin/pytest -m faults tests/e2e/test_random_faults.py`.
"""

import os
import random
import signal
import threading
import time
import warnings

import pytest
from test_resume import KEYS, actor_pids, config, step_records  # same folder, rootdir import

from rayd.driver import train

N = int(os.environ.get("RAYD_FAULTS", "3"))
STEPS = max(8, 2 * N + 2)
KINDS = ("rollout", "teacher", "learner", "sigterm", "sigterm+corrupt")


def overrides():
    return [
        f"trainer.max_steps={STEPS}",
        "trainer.save_every=2",
        "trainer.learner_restarts=1000",
        "trainer.actor_restarts=1000",
        # Transformers engines restart in seconds, vLLM's in 20-40 (test_resume.py restarts
        # killed vLLM engines).
        "rollout.backend=hf",
        "teacher.backend=hf",
    ]


class Injector:
    """Fires each planned fault once, when its step first shows in metrics.jsonl."""

    def __init__(self, metrics_path, plan):
        self.path, self.plan = metrics_path, dict(plan)
        self.fired: list[tuple[int, str]] = []
        self.corrupt_next_stop = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.is_set():
            text = self.path.read_text() if self.path.exists() else ""
            for step, kind in sorted(self.plan.items()):
                if f'"step": {step},' in text and '"loss"' in text:
                    del self.plan[step]
                    self._fire(kind)
                    self.fired.append((step, kind))
                    break
            time.sleep(0.05)

    def _fire(self, kind):
        if kind in ("rollout", "teacher", "learner"):
            name = {
                "rollout": "RolloutWorker",
                "teacher": "TeacherWorker",
                "learner": "LearnerWorker",
            }
            name = name[kind]
            deadline = time.time() + 120
            while not (pids := actor_pids(name)) and time.time() < deadline:
                time.sleep(0.1)  # a previous fault may still be rebuilding the workers
            os.kill(max(pids), signal.SIGKILL)
        else:
            self.corrupt_next_stop = kind == "sigterm+corrupt"
            os.kill(os.getpid(), signal.SIGTERM)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def corrupt_newest(run_dir):
    newest = max((run_dir / "checkpoints").glob("step-*"), key=lambda p: p.name)
    victim = max(newest.rglob("*.pt"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


@pytest.mark.faults
@pytest.mark.timeout(600 + 90 * N)  # each fault costs an engine or worker restart (20-60 s)
@pytest.mark.parametrize("seed", [0])
def test_seeded_random_faults_leave_the_run_identical(ray_local, tmp_path, seed):
    unbroken = config(tmp_path, "unbroken", *overrides())
    train(unbroken)
    expected = [{k: r[k] for k in KEYS} for r in step_records(unbroken.run_dir)]

    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, STEPS), N))
    # A corrupted checkpoint needs an older one to fall back to: not before step 3.
    plan = {s: rng.choice(KINDS if s >= 3 else KINDS[:4]) for s in steps}
    cfg = config(tmp_path, "faulty", *overrides())
    # A SIGTERM that lands while the driver is between two starts has nothing to stop (Ray's
    # own handler would exit the test); the driver installs its handler over this one.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    injector = Injector(cfg.run_dir / "metrics.jsonl", plan)
    starts = 0
    try:
        while True:
            starts += 1
            assert starts <= N + 1, "more restarts than SIGTERMs"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a skipped corrupt checkpoint warns
                summary = train(cfg)
            if not summary["preempted"]:
                break
            if injector.corrupt_next_stop:
                corrupt_newest(cfg.run_dir)
                injector.corrupt_next_stop = False
    finally:
        injector.close()
        signal.signal(signal.SIGTERM, previous)

    print(f"faults planned {sorted(plan.items())}, fired {injector.fired}, driver starts {starts}")
    assert sorted(injector.fired) == sorted(plan.items()), "every planned fault fired"
    got = step_records(cfg.run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1)), "each step logged once"
    assert [{k: r[k] for k in KEYS} for r in got] == expected
