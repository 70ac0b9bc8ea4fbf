"""The tiny-model cache under concurrent use (rayd/zoo.py cached_build): two processes that need
the same model build it once (the other says it waits, then reuses it), and a lock left by a
killed process blocks nothing."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from rayd.zoo import cache_target, cached_build, lock_path

# Small and quick, with a few pre-training steps (so the build also shows its progress lines).
PRESET = {
    "arch": {"layers": 1, "hidden": 32, "heads": 1},
    "pretrain": {"task": "addition", "digits": 1, "steps": 5, "batch_size": 4, "lr": 1e-3},
}
CHILD = (
    "import json, sys\n"
    "from rayd.zoo import cached_build\n"
    "print(cached_build('lock-test', json.loads(sys.argv[1])))\n"
)


def _first_line(proc: subprocess.Popen, limit_s: float = 300) -> str:
    """The child's first stderr line (a guard against a hang, not a timing check)."""
    deadline = time.monotonic() + limit_s
    line = b""
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if select.select([proc.stderr], [], [], 1.0)[0]:
            byte = os.read(proc.stderr.fileno(), 1)
            if not byte:
                break
            line += byte
    return line.decode()


def test_two_processes_build_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYD_CACHE", str(tmp_path))
    target = cache_target("lock-test", PRESET)
    target.parent.mkdir(parents=True)
    env = {**os.environ, "RAYD_CACHE": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    # The test holds the lock first, so both children surely find a build under way.
    with lock_path(target).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        children = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, json.dumps(PRESET)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            )
            for _ in range(2)
        ]
        first = [_first_line(p) for p in children]
        fcntl.flock(held, fcntl.LOCK_UN)
    for line in first:
        assert line.startswith("rayd: tiny:lock-test is being built by another process; waiting")
    results = [p.communicate(timeout=600) for p in children]
    assert [p.returncode for p in children] == [0, 0], results
    paths = {out.decode().splitlines()[-1] for out, _ in results}
    assert paths == {str(target)}
    logs = "".join(err.decode() for _, err in results)
    assert logs.count("rayd: building tiny:lock-test (once;") == 1, logs
    assert logs.count("rayd: tiny:lock-test: built by another process; reusing it") == 1, logs
    # the build's pre-training progress: a plain line (stderr is a pipe), percentage and time
    assert "rayd: building tiny:lock-test: step 5/5 (100%), done in " in logs, logs
    assert (target / "config.json").is_file()
    assert [
        p.name for p in tmp_path.joinpath("models").iterdir() if not p.name.endswith(".lock")
    ] == [target.name]  # no leftover work folders


def test_lock_of_a_killed_process_blocks_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAYD_CACHE", str(tmp_path))
    preset = {"arch": {"layers": 1, "hidden": 32, "heads": 1}, "pretrain": None}
    target = cache_target("lock-test", preset)
    target.parent.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n",
            str(lock_path(target)),
        ],
        stdout=subprocess.PIPE,
    )
    assert holder.stdout.readline() == b"locked\n"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert cached_build("lock-test", preset) == str(target)
    assert "waiting" not in capsys.readouterr().err
    assert Path(target, "config.json").is_file()
