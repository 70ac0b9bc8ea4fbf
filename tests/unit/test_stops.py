"""Stopped commands leave nothing half-done (issue 38, "Signals"; "Resume" for generate's shards).

SIGTERM in `rayd generate`, `rayd score` and `rayd export` ends in exit code 143 and one line,
with no staging or temporary folder or file left and the output as it was. Each command runs in
a subprocess (tests/support/stop_child.py) on tiny inputs, with its engine part replaced by a
stand-in (no Ray) and one real write held open, so the signal comes at a known moment: while a
temporary file or folder exists. `rayd ablate` runs cells that stand in for `rayd train`: one
that ignores SIGTERM and has a child of its own, so the sweep must kill the process groups.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from support.stop_child import shard_text

from rayd.config import ConfigError

from helpers import SWEEP_BASE, snapshot, tiny_run_folder

REPO = Path(__file__).resolve().parents[2]
CHILD = REPO / "tests" / "support" / "stop_child.py"


def hidden(folder: Path) -> list[str]:
    """Dot-named entries anywhere under `folder`: staging folders and temporary files."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def stop_when_held(args: list[str], marker: Path, signum: int = signal.SIGTERM):
    """Run the child until it holds a write open (it touches `marker`), signal it, and return
    (exit code, stderr lines)."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), *args],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not marker.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"the child ended before the held write (rc {proc.returncode}):\n{err}")
            time.sleep(0.05)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, [line for line in err.splitlines() if line.strip()]


def assert_one_line(lines: list[str], command: str) -> None:
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    stops = [line for line in lines if "SIGTERM" in line]
    assert stops == [lines[-1]] and lines[-1].startswith(f"rayd {command}: stopped by SIGTERM")


# --- rayd generate ------------------------------------------------------------------------------


def generate_config(tmp: Path, shard_size: int = 2) -> Path:
    path = tmp / "generate.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            teacher: {{path: tiny:test-teacher}}
            output_dir: {tmp}/gen
            prompts: {{count: 4, eval_size: 0}}
            sampling: {{n: 1}}
            shard_size: {shard_size}
            """
        )
    )
    return path


@pytest.mark.parametrize("held", ["shard", "dataset"])
def test_sigterm_in_generate_leaves_no_temporary_file(tmp_path, held) -> None:
    config, marker = generate_config(tmp_path), tmp_path / "held"
    code, lines = stop_when_held(["generate", held, str(marker), str(config)], marker)
    out = tmp_path / "gen"
    assert code == 143
    assert_one_line(lines, "generate")
    assert hidden(out) == []
    assert not (out / "dataset").exists() and not (out / "summary.json").exists()
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert shards == (
        ["shard-00000.jsonl"] if held == "shard" else ["shard-00000.jsonl", "shard-00001.jsonl"]
    )


def fake_shards(calls: list[int], stop_after: int | None = None):
    """A stand-in for the teacher engines: one sample per prompt, written as a shard."""
    from rayd.commands import generate as g

    def write(cfg, teacher_path, questions, shards, todo, shards_dir) -> None:
        for n, i in enumerate(todo):
            if stop_after is not None and n == stop_after:
                raise KeyboardInterrupt  # the job stops part-way
            calls.extend(shards[i])
            g.write_atomic(g._shard_path(shards_dir, i), shard_text(questions, shards[i]))

    return write


def test_generate_refuses_to_resume_with_another_shard_size(tmp_path, monkeypatch, capsys) -> None:
    from rayd.commands import generate as g

    calls: list[int] = []
    monkeypatch.setattr(g, "_write_shards", fake_shards(calls, stop_after=1))
    with pytest.raises(KeyboardInterrupt):  # shard 0 (prompts 0, 1) written, then stopped
        g.generate(g.load_generate_config(str(generate_config(tmp_path, 2))))
    before = snapshot(tmp_path / "gen")
    monkeypatch.setattr(g, "_write_shards", fake_shards(calls))
    with pytest.raises(
        ConfigError, match=r"holds shards of 2 prompts and this run asks for shard_size=3"
    ):
        g.generate(g.load_generate_config(str(generate_config(tmp_path, 3))))
    assert snapshot(tmp_path / "gen") == before  # nothing written
    capsys.readouterr()
    assert g.main([str(generate_config(tmp_path, 3))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set shard_size=2 to finish it" in err[0]
    # The same size finishes the job: every prompt once.
    calls.clear()
    summary = g.generate(g.load_generate_config(str(generate_config(tmp_path, 2))))
    assert calls == [2, 3] and summary["samples"] == 4


def test_generate_checks_the_shard_size_of_a_job_recorded_before_it_was_kept(
    tmp_path, monkeypatch
) -> None:
    from rayd.commands import generate as g

    monkeypatch.setattr(g, "_write_shards", fake_shards([], stop_after=1))
    with pytest.raises(KeyboardInterrupt):
        g.generate(g.load_generate_config(str(generate_config(tmp_path, 2))))
    job = tmp_path / "gen" / "job.json"
    recorded = json.loads(job.read_text())
    del recorded["shard_size"]  # as an older rayd wrote it
    job.write_text(json.dumps(recorded))
    monkeypatch.setattr(g, "_write_shards", fake_shards([]))
    with pytest.raises(ConfigError, match="holds shards of 2 prompts"):
        g.generate(g.load_generate_config(str(generate_config(tmp_path, 4))))


# --- rayd score ---------------------------------------------------------------------------------


def test_sigterm_in_score_keeps_the_earlier_scored_dataset(tmp_path) -> None:
    from datasets import Dataset, disable_progress_bars

    from rayd.teacher.stored import SIGNAL_FILE

    disable_progress_bars()
    data = tmp_path / "ds"
    Dataset.from_dict({"prompt": ["1+1=", "2+2="], "completion": ["A=2", "A=4"]}).save_to_disk(
        str(data)
    )
    out = tmp_path / "scored"  # an earlier scored dataset: the rerun replaces it, or nothing
    out.mkdir()
    (out / SIGNAL_FILE).write_text("{}")
    (out / "data-00000-of-00001.arrow").write_bytes(b"earlier\x00")
    before = snapshot(out)
    (tmp_path / "base.yaml").write_text("{}\n")
    marker = tmp_path / "held"
    args = ["score", "dataset", str(marker), str(tmp_path / "base.yaml"), "algorithm.name=logit_kd"]
    args += ["models.student.path=tiny:test-student", "models.teacher.path=tiny:test-teacher"]
    args += ["rollout.max_new_tokens=16", "rollout.max_model_len=48"]
    args += [f"data.train_dataset={data}", "--out", str(out)]
    code, lines = stop_when_held(args, marker)
    assert code == 143
    assert_one_line(lines, "score")
    assert snapshot(out) == before
    # The scored blocks stay for the rerun; no half-written copy (no staging or .scored.old).
    assert [p for p in hidden(tmp_path) if not p.startswith(".scored.parts")] == []


# --- rayd export --------------------------------------------------------------------------------


def test_sigterm_in_export_removes_its_staging_folder(tmp_path) -> None:
    from rayd.commands.eval import EXPORT_RECORD

    run = tiny_run_folder(tmp_path)
    (run / "summary.json").write_text(json.dumps({"steps": 1, "final": {}}))
    out = tmp_path / "export"  # an earlier export: --force replaces it, or nothing
    out.mkdir()
    (out / EXPORT_RECORD).write_text("{}")
    (out / "model.safetensors").write_bytes(b"earlier weights")
    before = snapshot(out)
    marker = tmp_path / "held"
    args = ["export", "card", str(marker), str(run), "--out", str(out), "--force"]
    code, lines = stop_when_held(args, marker)
    assert code == 143
    assert_one_line(lines, "export")
    assert snapshot(out) == before
    assert hidden(tmp_path) == []  # no .export-xxxx staging folder


# --- rayd ablate --------------------------------------------------------------------------------


def sweep_file(tmp: Path, stop_timeout: str = "stop_timeout_s: 2\n") -> Path:
    (tmp / "base.yaml").write_text(SWEEP_BASE)
    path = tmp / "sweep.yaml"
    path.write_text(
        f"name: sw\nbase: base.yaml\noutput_dir: {tmp}/out\nconcurrency: 2\n"
        f"{stop_timeout}axes: {{trainer.seed: [0, 1]}}\n"
    )
    return path


def start_ablate(sweep: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(CHILD), "ablate", "-", "-", str(sweep)],
        cwd=REPO,
        env=child_env(RAY_ADDRESS="127.0.0.1:9"),  # "joined": the stand-in cells need no Ray
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has ended; only its parent has not looked yet


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_ablate_ends_its_cells_and_does_not_take_them_as_finished(
    tmp_path, signum
) -> None:
    from rayd.commands.ablate.run import plan_cell
    from rayd.commands.ablate.sweep import cell_dir, expand, load_sweep

    path = sweep_file(tmp_path)
    sweep = load_sweep(path)
    cells = expand(sweep)
    pid_files = [cell_dir(sweep, c) / "pids.json" for c in cells]
    first = start_ablate(path)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not all(p.is_file() and p.read_text() for p in pid_files):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        pids = [pid for p in pid_files for pid in json.loads(p.read_text())]

        # A second sweep on the same folder while the first runs: refused in one line.
        second = start_ablate(path)
        _, err = second.communicate(timeout=60)
        lines = [line for line in err.splitlines() if line.strip()]
        assert second.returncode == 2, err
        assert len(lines) == 1 and "is in use by another rayd ablate" in lines[0], err

        started = time.monotonic()
        first.send_signal(signum)
        _, err = first.communicate(timeout=60)
        assert time.monotonic() - started < 30
        assert first.returncode == 128 + signum, err
        assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err
        assert not [pid for pid in pids if alive(pid)]  # cells and their children: all gone
    finally:
        for proc in (first,):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    # Each cell wrote a summary.json that says "finished" when asked to stop, then hung: the
    # sweep killed it, and the next one runs it again rather than skip it.
    for cell in cells:
        assert (
            json.loads((cell_dir(sweep, cell) / "summary.json").read_text())["preempted"] is False
        )
        status = json.loads((cell_dir(sweep, cell) / "status.json").read_text())
        assert status["status"] == "failed" and status["error"].startswith("killed")
        assert plan_cell(sweep, cell).action == "run"
    from rayd.commands.ablate.run import lock_sweep

    with lock_sweep(sweep.out):  # the lock went with the sweep and its cells
        pass


def test_a_cell_whose_sweep_died_is_not_taken_as_finished(tmp_path) -> None:
    from rayd.commands.ablate.run import plan_cell
    from rayd.commands.ablate.sweep import cell_config, cell_dir, expand, load_sweep
    from rayd.config import save_config

    sweep = load_sweep(sweep_file(tmp_path, stop_timeout=""))
    cell = expand(sweep)[0]
    folder = cell_dir(sweep, cell)
    save_config(cell_config(sweep, cell), folder / "cell.yaml")
    # The sweep was SIGKILLed while the cell ran; the cell went on and wrote its summary.
    (folder / "status.json").write_text(json.dumps({"status": "running", "pid": 1}))
    (folder / "summary.json").write_text(json.dumps({"preempted": False, "final": {}}))
    plan = plan_cell(sweep, cell)
    assert (plan.action, plan.reason) == (
        "run",
        "its last attempt was interrupted (status.json: running)",
    )


def test_a_sigterm_during_a_folder_swap_is_raised_when_the_swap_is_done(tmp_path) -> None:
    from rayd.staging import Terminated, sigterm_held, staged_folder, terminate_as_exception

    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    done = []
    with terminate_as_exception(), pytest.raises(Terminated) as stop, sigterm_held():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler has run by now: the signal waits for the block's end
        done.append("swapped")
    assert done == ["swapped"] and stop.value.code == 143
    with terminate_as_exception(), pytest.raises(Terminated), staged_folder(out) as staging:
        (staging / "new").write_text("new")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out-xxxx left
    assert [p.name for p in out.iterdir()] == ["old"]
