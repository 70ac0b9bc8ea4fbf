"""`ray job submit` against a real Ray head on this machine, through launch/submit.sh.

The head is started with `ray start --head --block` in its own session (its own temp dir, free
ports, dashboard on 127.0.0.1), so it neither joins nor disturbs other local Ray instances, and
killing its process group stops exactly its processes (`ray stop` would stop every Ray on the
machine). Ray 2.60 heads require an auth token: the test makes one and gives it to the head and
the client, as a cluster operator would.

1. a broken config reaches FAILED with the one-line config error in the job's logs;
2. `ray job stop` (SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S from
   launch/runtime_env.yaml) makes the job checkpoint and stop; submitting the same command again
   resumes from that checkpoint and reaches SUCCEEDED: its logs say where the student went, and
   the run folder holds the student and the summary. (One job does both: each job start costs
   a minute on 2 cores.)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Head:
    def __init__(self) -> None:
        # Short: Ray puts Unix sockets under it, and socket paths are limited to ~100 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python`
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            PYTHONPATH="",  # the job imports rayd from its uploaded working dir
        )
        dashboard = free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        self.env["RAY_ADDRESS"] = self.address  # for the client side only (set after start)
        head_env = {k: v for k, v in self.env.items() if k != "RAY_ADDRESS"}
        self.log = open(Path(self.temp_dir) / "head.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={free_port()}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={free_port()}",
                f"--dashboard-agent-listen-port={free_port()}",
                "--num-cpus=8",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
            ],
            env=head_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while self.ray("job", "list").returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the Ray head did not come up; see {self.log.name}")
            time.sleep(1)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, submission_id: str, *args: str) -> subprocess.CompletedProcess:
        env = {**self.env, "RAYD_SUBMISSION_ID": submission_id}
        return subprocess.run(
            [str(REPO / "launch" / "submit.sh"), "--no-wait", *args],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def status(self, submission_id: str) -> str:
        """The job's status name; the CLI only prints it for humans, so ask the SDK."""
        code = (
            "import sys; from ray.job_submission import JobSubmissionClient as C; "
            "print(C(sys.argv[1]).get_job_status(sys.argv[2]).value)"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code, self.address, submission_id],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "UNKNOWN"

    def wait(self, submission_id: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.status(submission_id)) not in TERMINAL:
            if time.monotonic() > deadline:
                self.ray("job", "stop", submission_id)
                pytest.fail(f"job {submission_id} still {state} after {timeout:.0f}s")
            time.sleep(2)
        return state

    def logs(self, submission_id: str) -> str:
        return self.ray("job", "logs", submission_id).stdout

    def stop(self) -> None:
        # A short grace: on SIGTERM a head drains for up to 30 s, which a test head need not.
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):  # anything of this head still alive
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="module")
def head():
    h = Head()
    yield h
    h.stop()


def job_args(out: Path, *extra: str) -> list[str]:
    return [
        "configs/demo/tiny.yaml",
        f"output_dir={out}",
        "rollout.backend=hf",
        "teacher.backend=hf",
        "logging.progress=false",
        *extra,
    ]


def test_broken_config_fails_with_the_clear_error_in_the_logs(head, tmp_path):
    submitted = head.submit("rayd-e2e-bad", *job_args(tmp_path / "bad", "learner.zero_stage=4"))
    assert submitted.returncode == 0, submitted.stderr
    assert head.wait("rayd-e2e-bad", timeout=300) == "FAILED"
    logs = head.logs("rayd-e2e-bad")
    assert "config error: learner.zero_stage: Input should be less than or equal to 3" in logs
    assert "Traceback" not in logs
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_job_stop_checkpoints_and_the_same_command_resumes(head, tmp_path):
    args = job_args(tmp_path / "long", "trainer.max_steps=400", "trainer.eval_every=0")
    submitted = head.submit("rayd-e2e-stop", *args)
    assert submitted.returncode == 0, submitted.stderr
    assert "ray job logs -f rayd-e2e-stop" in submitted.stderr
    metrics = tmp_path / "long" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"loss"' in metrics.read_text()):  # a step has trained
        assert time.monotonic() < deadline, head.logs("rayd-e2e-stop")[-3000:]
        assert head.status("rayd-e2e-stop") not in TERMINAL, head.logs("rayd-e2e-stop")[-3000:]
        time.sleep(1)
    head.ray("job", "stop", "rayd-e2e-stop", timeout=120)
    assert head.wait("rayd-e2e-stop", timeout=180) == "STOPPED"
    logs = head.logs("rayd-e2e-stop")
    assert "rayd: SIGTERM: checkpoint of step" in logs, logs[-3000:]
    saved = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert saved["preempted"] and saved["steps"] < 400
    # The same command again: resumes from the checkpoint, not from scratch, and finishes.
    resume = [*args[:-2], f"trainer.max_steps={saved['steps'] + 2}", "trainer.eval_every=0"]
    assert head.submit("rayd-e2e-resume", *resume).returncode == 0
    assert head.wait("rayd-e2e-resume") == "SUCCEEDED", head.logs("rayd-e2e-resume")[-3000:]
    logs = head.logs("rayd-e2e-resume")
    assert f"(step {saved['steps']})" in logs
    # The finished job's outputs: its logs say where the student went, and it is there.
    assert f"rayd: student saved to {tmp_path / 'long' / 'student'}" in logs
    assert (tmp_path / "long" / "student" / "model.safetensors").is_file()
    done = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert done["steps"] == saved["steps"] + 2 and not done["preempted"]
