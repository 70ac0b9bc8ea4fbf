"""Running a sweep's cells: what each needs (`plan_cell`: run, rerun, skip), one `python -m
rayd train` process per cell, at most `concurrency` at once on one shared Ray, and the
`Outcome` of each.

One sweep at a time per folder: `lock_sweep` holds an flock on the sweep folder, and every cell
process inherits the locked descriptor, so the folder stays locked while any cell of a sweep
runs, even one whose `rayd ablate` was SIGKILLed. Each cell runs in its own process group; SIGTERM
or SIGINT to the sweep sends SIGTERM to every running cell's group (a cell checkpoints and stops,
like a lone run), starts no more, and kills a group that has not ended `stop_timeout_s` later
(at once on a second signal). A cell's status.json says "running" while it runs: a cell whose
sweep died before recording its end is never taken as finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayd.commands.ablate.sweep import (
    EXIT_PREEMPTED,
    LOG_TAIL_LINES,
    Cell,
    Sweep,
    cell_config,
    cell_dir,
    config_changes,
)
from rayd.config import (
    ConfigError,
    RunConfig,
    load_config,
    save_config,
)
from rayd.run_folder import locked_folder


@dataclass
class Plan:
    """What the sweep will do with a cell: run, skip (finished), rerun (config changed),
    or nothing (invalid config)."""

    cell: Cell
    action: str  # "run" | "skip" | "rerun" | "invalid"
    reason: str = ""
    cfg: RunConfig | None = None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def plan_cell(sweep: Sweep, cell: Cell) -> Plan:
    try:
        cfg = cell_config(sweep, cell)
    except ConfigError as exc:
        return Plan(cell, "invalid", str(exc))
    folder = cell_dir(sweep, cell)
    saved_path = folder / "cell.yaml"
    if not saved_path.is_file():
        if folder.exists() and any(folder.iterdir()):
            return Plan(cell, "rerun", "its folder holds files but no cell.yaml", cfg)
        return Plan(cell, "run", "", cfg)
    try:
        saved = load_config(saved_path)
    except ConfigError as exc:
        return Plan(cell, "rerun", f"its saved cell.yaml no longer loads ({exc})", cfg)
    changes = config_changes(saved, cfg)
    if changes:
        return Plan(cell, "rerun", "config changed: " + "; ".join(changes), cfg)
    summary = _read_json(folder / "summary.json")
    last = _read_json(folder / "status.json") or {}
    if last.get("status") == "running":
        # The sweep that started it ended (was killed) before the cell's end was recorded: a
        # summary.json written since does not say the run the sweep asked for finished.
        return Plan(cell, "run", "its last attempt was interrupted (status.json: running)", cfg)
    if summary is None or last.get("status") == "failed":  # failed: even with a summary
        # Runs again in place: `trainer.resume=auto` picks up its last checkpoint, if any.
        if last.get("status") in ("failed", "preempted"):
            why = f"its last attempt {last['status']} (exit code {last.get('exit_code')})"
        else:
            why = "it did not finish"
        return Plan(cell, "run", why, cfg)
    if summary.get("preempted"):
        return Plan(cell, "run", "preempted: resuming", cfg)
    return Plan(cell, "skip", "finished", cfg)


# --------------------------------------------------------------------------------------------
# One sweep per folder
# --------------------------------------------------------------------------------------------


def lock_sweep(out: Path) -> contextlib.AbstractContextManager[int]:
    """Hold the sweep folder `out` (created if missing) for the block; yields the locked
    descriptor, which the cells inherit. One ConfigError line when another sweep, or a cell of
    one, holds it."""
    return locked_folder(
        out, error="sweep error", holder="rayd ablate, or by cells it started that still run"
    )


def cell_command(folder: Path) -> list[str]:
    """The process a cell runs (tests put a cheap stand-in here)."""
    return [sys.executable, "-m", "rayd", "train", str(folder / "cell.yaml")]


# --------------------------------------------------------------------------------------------
# Running cells
# --------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    cell: Cell
    status: str  # done | skipped | failed | preempted | invalid | pending | stale
    exit_code: int | None = None
    wall_s: float | None = None
    error: str = ""
    summary: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped")


class _Runner:
    """Runs cell subprocesses, at most `concurrency` at once, each in its own process group;
    SIGTERM or SIGINT to the sweep is passed on to the running cells' groups as SIGTERM (each
    checkpoints and stops, like a lone run) and starts no more; a group still there
    `stop_timeout_s` later, or at a second signal, is killed."""

    def __init__(self, sweep: Sweep, env: dict[str, str], keep_fds: tuple[int, ...] = ()) -> None:
        self.sweep, self.env, self.keep_fds = sweep, env, keep_fds
        self.stop = threading.Event()
        self.signum: int | None = None  # the signal that stopped the sweep
        self.kill_at: float | None = None  # monotonic time to SIGKILL the groups left
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def terminate(self, signum: int = signal.SIGTERM) -> None:
        now = time.monotonic()
        if self.stop.is_set():  # a second signal: no more waiting
            self.kill_at = now
        else:
            self.signum = signum
            self.kill_at = now + self.sweep.spec.stop_timeout_s
        self.stop.set()
        with self._lock:
            for proc in self._procs.values():
                _signal_group(proc, signal.SIGTERM)

    def _wait(self, proc: subprocess.Popen[bytes]) -> tuple[int, bool]:
        """(exit code, whether the group was killed for outliving the stop)."""
        killed = False
        while True:
            try:
                code = proc.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if self.kill_at is not None and time.monotonic() >= self.kill_at and not killed:
                    _signal_group(proc, signal.SIGKILL)
                    killed = True
        if self.stop.is_set():  # what the cell started must not outlive the stopped sweep
            _signal_group(proc, signal.SIGKILL)
        return code, killed

    def run(self, plan: Plan) -> Outcome:
        cell, cfg = plan.cell, plan.cfg
        assert cfg is not None
        if self.stop.is_set():
            return Outcome(cell, "pending", error="not started: the sweep was stopped")
        folder = prepare_cell_folder(self.sweep, plan)
        log_path = folder / "log.txt"
        started = time.time()
        with log_path.open("ab") as log:
            offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== rayd ablate: cell {cell.id}, started {stamp} ====\n".encode())
            log.flush()
            cmd = cell_command(folder)
            print(f"rayd ablate: cell {cell.id}: started (log: {log_path})", flush=True)
            with self._lock:
                if self.stop.is_set():
                    return Outcome(cell, "pending", error="not started: the sweep was stopped")
                proc = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=self.env,
                    start_new_session=True,  # its own process group, ended with it
                    pass_fds=self.keep_fds,  # the sweep's lock: held while the cell runs
                )
                self._procs[cell.id] = proc
                running = {"status": "running", "pid": proc.pid, "started": started}
                (folder / "status.json").write_text(json.dumps(running, indent=2))
            try:
                code, killed = self._wait(proc)
            finally:
                with self._lock:
                    self._procs.pop(cell.id, None)
        wall = time.time() - started
        summary = _read_json(folder / "summary.json")
        if killed:
            status = "failed"
            error = (
                f"killed: it had not stopped {self.sweep.spec.stop_timeout_s:g} s after the "
                "sweep's stop (stop_timeout_s) or a second signal; run again to resume"
            )
        elif code == 0 and summary is not None and not summary.get("preempted"):
            status, error = "done", ""
        elif code == EXIT_PREEMPTED or (self.stop.is_set() and code == -signal.SIGTERM):
            # -SIGTERM: the sweep's SIGTERM came before the run had set up its handler.
            status, error = (
                "preempted",
                "stopped by SIGTERM after a checkpoint; run again to resume",
            )
        else:
            status = "failed"
            error = _log_tail(log_path, offset) or f"exit code {code}"
            if code == 0:
                error = "exited 0 without a finished summary.json\n" + error
        status_record = {
            "status": status,
            "exit_code": code,
            "wall_s": round(wall, 3),
            "started": started,
            "error": error,
        }
        (folder / "status.json").write_text(json.dumps(status_record, indent=2))
        return Outcome(cell, status, code, wall, error, summary)


def _signal_group(proc: subprocess.Popen[bytes], signum: int) -> None:
    """`signum` to the cell's process group (its pid: it leads the session it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)


def prepare_cell_folder(sweep: Sweep, plan: Plan) -> Path:
    """The cell's folder, ready for a run: results made with another config are moved aside
    (a resumed run would mix them with the new config's), cell.yaml records what will run."""
    assert plan.cfg is not None
    folder = cell_dir(sweep, plan.cell)
    if plan.action == "rerun" and folder.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S")
        stale = sweep.out / "stale" / f"{plan.cell.id}-{stamp}"
        n = 1
        while stale.exists():
            stale, n = sweep.out / "stale" / f"{plan.cell.id}-{stamp}.{n}", n + 1
        stale.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(folder), str(stale))
        print(f"rayd ablate: cell {plan.cell.id}: old results moved to {stale}", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(plan.cfg, folder / "cell.yaml")
    # A summary left by an earlier (preempted) attempt must not speak for this one.
    (folder / "summary.json").unlink(missing_ok=True)
    return folder


def _log_tail(path: Path, offset: int, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    # tqdm redraws with carriage returns; only the last state of a line is worth showing.
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    kept = [line for line in kept if line and not line.startswith("==== rayd ablate")]
    return "\n".join(kept[-lines:])


@contextlib.contextmanager
def _cluster_for_cells(concurrency: int) -> Iterator[dict[str, str]]:
    """Environment for the cells' processes.

    Every cell is its own Ray job on one cluster: an existing one (RAY_ADDRESS, `ray job
    submit`), or a local one this process starts once and stops at the end, sized for
    `concurrency` cells. Sequential cells so skip a Ray start each (measured in
    docs/experiments/performance.md), and concurrent ones share one scheduler: two local Ray
    instances on one machine would each count the same cores as theirs. A cell's actors die
    with its driver, so a failed cell leaves nothing to the next.
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")  # a crashed cell's log ends where it crashed
    joined = any(env.get(k) for k in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_JOB_SUBMISSION_ID"))
    if joined:
        yield env
        return
    import ray

    before = dict(os.environ)
    started = not ray.is_initialized()
    if started:
        from rayd.cluster import connect

        # The cluster this runs in, or a local Ray with connect's logical CPUs per cell.
        connect(num_cpus=concurrency * max(8, os.cpu_count() or 1), log_to_driver=False)
    try:
        # ray.init switches this process to token auth (RAY_AUTH_MODE=token): without the same
        # setting the cells are refused by the cluster.
        env.update(
            {k: v for k, v in os.environ.items() if k.startswith("RAY_") and before.get(k) != v}
        )
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        print(f"rayd ablate: cells join a local Ray at {env['RAY_ADDRESS']}", flush=True)
        yield env
    finally:
        if started:
            ray.shutdown()


def run_sweep(
    sweep: Sweep, plans: list[Plan], keep_fds: tuple[int, ...] = ()
) -> tuple[list[Outcome], int | None]:
    """Run what the plans say; returns every cell's outcome and the signal (SIGTERM, SIGINT)
    that stopped the sweep, or None. `keep_fds`: descriptors every cell inherits (the lock)."""
    outcomes: dict[str, Outcome] = {}
    todo: list[Plan] = []
    for plan in plans:
        if plan.action == "invalid":
            outcomes[plan.cell.id] = Outcome(plan.cell, "invalid", error=plan.reason)
            print(f"rayd ablate: cell {plan.cell.id}: invalid config: {plan.reason}", flush=True)
        elif plan.action == "skip":
            outcomes[plan.cell.id] = outcome_from_files(sweep, plan.cell, "skipped")
            print(f"rayd ablate: cell {plan.cell.id}: skipped (finished before)", flush=True)
        else:
            if plan.reason:
                verb = "running again" if plan.action == "rerun" else "running"
                print(f"rayd ablate: cell {plan.cell.id}: {plan.reason}; {verb}", flush=True)
            todo.append(plan)

    concurrency = min(sweep.spec.concurrency, len(todo))
    stopped: int | None = None
    if todo:
        with _cluster_for_cells(concurrency) as env:
            runner = _Runner(sweep, env, keep_fds)
            previous: dict[int, Any] = {}
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGTERM, signal.SIGINT):
                    previous[signum] = signal.signal(signum, lambda n, _: runner.terminate(n))
            try:
                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    futures = {pool.submit(runner.run, plan): plan for plan in todo}
                    for i, future in enumerate(as_completed(futures), 1):
                        outcome = future.result()
                        outcomes[outcome.cell.id] = outcome
                        _print_progress(i, len(todo), outcome)
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            stopped = runner.signum if runner.stop.is_set() else None
    return [outcomes[plan.cell.id] for plan in plans], stopped


def _print_progress(i: int, total: int, outcome: Outcome) -> None:
    wall = f" in {outcome.wall_s:.0f} s" if outcome.wall_s is not None else ""
    line = f"rayd ablate: [{i}/{total}] cell {outcome.cell.id}: {outcome.status}{wall}"
    if outcome.status == "failed":
        line += f" (exit code {outcome.exit_code}); last lines of its log.txt:\n"
        line += "\n".join(f"    {x}" for x in outcome.error.splitlines())
    elif outcome.summary:
        line += " " + _format_metrics(outcome.summary.get("final") or {})
    print(line, flush=True)


def _format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))


def outcome_from_files(sweep: Sweep, cell: Cell, finished: str = "done") -> Outcome:
    """A cell's state as its folder tells it (a skipped cell, or `--only-report`)."""
    plan = plan_cell(sweep, cell)
    folder = cell_dir(sweep, cell)
    record = _read_json(folder / "status.json") or {}
    wall = record.get("wall_s")
    if plan.action == "invalid":
        return Outcome(cell, "invalid", error=plan.reason)
    if plan.action == "skip":
        summary = _read_json(folder / "summary.json")
        return Outcome(cell, finished, record.get("exit_code", 0), wall, "", summary)
    if plan.action == "rerun" and (folder / "cell.yaml").is_file():
        return Outcome(cell, "stale", error=plan.reason)
    status = record.get("status")
    if status in ("failed", "preempted"):
        return Outcome(cell, status, record.get("exit_code"), wall, record.get("error", ""))
    return Outcome(cell, "pending", error="not run yet")
