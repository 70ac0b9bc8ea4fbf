"""`rayd ablate SWEEP.yaml`: a grid of training runs around one base config, and its report.

A sweep is a base run config, overrides shared by every cell, and ordered axes; the cartesian
product of the axes makes the cells. An axis is either a dotted config key with a list of values
(`trainer.seed: [0, 1]`) or a name with named bundles of overrides, for settings that move
together (`method: {answers: {data.rationales: false}, rationales: {}}`).

Each cell is `python -m rayd train <cell>/cell.yaml` in its own process, so a cell that crashes
or leaves Ray in a bad state cannot take the sweep down. A cell is finished when its
summary.json says so and the config it ran with is the one the sweep asks for now; finished cells
are skipped on the next run, a changed one is moved aside and run again. The results of all
cells go to results.csv, a results.md table (mean ± std over seeds) and plots/.

Layout under the sweep folder (`output_dir`, default runs/sweeps/<name>):
    sweep.yaml                 the sweep as read (for the record)
    cells/<cell id>/           a run folder (config.yaml, metrics.jsonl, summary.json, student/)
                               plus cell.yaml (what the sweep asked for), status.json, log.txt
    stale/<cell id>-<time>/    results of a cell whose config changed since they were made
    results.csv, results.md, plots/*.png
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
import types
import typing
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayd.config import (
    ConfigError,
    RunConfig,
    format_validation_error,
    load_config,
    save_config,
)

SEED_AXES = ("trainer.seed", "seed")
# Set by the sweep for every cell; an axis or override may not change them.
RESERVED_KEYS = ("name", "output_dir")
EXIT_PREEMPTED = 143
LOG_TAIL_LINES = 8


class SweepError(ConfigError):
    """A bad sweep file; the message is one line per problem, naming the key."""


# --------------------------------------------------------------------------------------------
# The sweep file
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReportSpec(_Strict):
    metric: str | None = Field(
        None, description="final metric of the main plot; default eval/accuracy, else reverse KL"
    )
    x_axis: str | None = Field(
        None, description="axis on the main plot's x; default the first numeric non-seed axis"
    )


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    base: str = Field(description="base run config, relative to the sweep file")
    output_dir: str = Field(
        "runs/sweeps/{name}", description="relative to the working directory, like a run's"
    )
    overrides: dict[str, Any] = Field(default_factory=dict)
    # Checked by hand below: pydantic's errors for a list-or-mapping union are two lines of noise.
    axes: dict[str, Any]
    labels: dict[str, str] = Field(
        default_factory=dict, description="display names of axes and values (tables, plots)"
    )
    concurrency: int = Field(1, ge=1)
    report: ReportSpec = Field(default_factory=ReportSpec)

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if not self.axes:
            raise ValueError("axes: at least one axis is needed")
        for key in self.overrides:
            _check_config_key(f"overrides.{key}", key, self.overrides[key])
        owner: dict[str, str] = {}
        for axis, node in self.axes.items():
            if isinstance(node, list):
                if not node:
                    raise ValueError(f"axes.{axis}: the list of values is empty")
                for value in node:
                    _check_config_key(f"axes.{axis}", axis, value)
                keys = [axis]
            elif isinstance(node, dict):
                if not node:
                    raise ValueError(f"axes.{axis}: the mapping of bundles is empty")
                keys = []
                for bundle, overrides in node.items():
                    if overrides is not None and not isinstance(overrides, dict):
                        raise ValueError(
                            f"axes.{axis}.{bundle}: a bundle is a mapping of dotted overrides "
                            f"(got {overrides!r})"
                        )
                    for key, value in (overrides or {}).items():
                        _check_config_key(f"axes.{axis}.{bundle}.{key}", key, value)
                        keys.append(key)
            else:
                raise ValueError(
                    f"axes.{axis}: a list of values or a mapping of named bundles of overrides "
                    f"(got {node!r})"
                )
            for key in dict.fromkeys(keys):
                if key in owner:
                    raise ValueError(
                        f"axes.{axis}: sets {key}, which axis {owner[key]} sets too; "
                        "an axis would silently override the other"
                    )
                owner[key] = axis
        known = set(self.axes) | {_value_text(value) for _, value, _ in _axis_points(self.axes)}
        for key in self.labels:
            # Metric names ("eval/accuracy") can be labelled too; they are known only later.
            if key not in known and "/" not in key:
                raise ValueError(f"labels.{key}: not an axis, a value, a bundle or a metric")
        x_axis = self.report.x_axis
        if x_axis is not None and (x_axis not in self.axes or x_axis == self.seed_axis):
            raise ValueError(f"report.x_axis: {x_axis!r} is not an axis other than the seed")
        return self

    @property
    def seed_axis(self) -> str | None:
        return next((axis for axis in self.axes if axis in SEED_AXES), None)

    def is_bundle_axis(self, axis: str) -> bool:
        return isinstance(self.axes[axis], dict)

    def label(self, key: Any) -> str:
        return self.labels.get(str(key), str(key))


def _axis_points(axes: dict[str, Any]) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    """(axis, value or bundle name, the overrides it makes) for every point of every axis."""
    for axis, node in axes.items():
        if isinstance(node, dict):
            for bundle, overrides in node.items():
                yield axis, bundle, dict(overrides or {})
        else:
            for value in node:
                yield axis, value, {axis: value}


def _section_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
    return None


def _check_config_key(where: str, dotted: str, value: Any) -> None:
    """Typos in a sweep's keys fail when the sweep is read, not as N identical cell errors."""
    if dotted in RESERVED_KEYS:
        raise ValueError(f"{where}: {dotted} is set by the sweep for each cell")
    model: type[BaseModel] = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None or not part:
            raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} is not a config key")
        section = _section_model(info.annotation)
        if section is None:
            if i < len(parts) - 1 and typing.get_origin(info.annotation) is not dict:
                raise ValueError(f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section")
            return
        if i == len(parts) - 1 and value is not None:
            # As with `key=value` on the command line, a mapping would replace the whole
            # section and drop what the base config set in it.
            raise ValueError(
                f"{where}: {dotted} is a section; set its keys one by one ({dotted}.<key>: value)"
            )
        model = section


def _format_sweep_error(path: Path, err: ValidationError) -> str:
    return format_validation_error(err, prefix=f"sweep error: {path}: ")


@dataclass(frozen=True)
class Sweep:
    spec: SweepSpec
    path: Path  # the sweep file
    base: Path
    out: Path

    @property
    def cells_dir(self) -> Path:
        return self.out / "cells"


def load_sweep(path: str | Path, concurrency: int | None = None) -> Sweep:
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"sweep error: sweep file {str(p)!r} does not exist")
    try:
        tree = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise SweepError(f"sweep error: {p}{line}: not valid YAML") from exc
    if not isinstance(tree, dict):
        raise SweepError(f"sweep error: {p}: expected a mapping (name, base, axes, ...)")
    if concurrency is not None:
        tree["concurrency"] = concurrency
    try:
        spec = SweepSpec.model_validate(tree)
    except ValidationError as exc:
        raise SweepError(_format_sweep_error(p, exc)) from None
    base = (p.parent / spec.base) if not Path(spec.base).is_absolute() else Path(spec.base)
    if not base.is_file():
        raise SweepError(f"sweep error: {p}: base: config file {str(base)!r} does not exist")
    out = Path(spec.output_dir.format(name=spec.name))
    sweep = Sweep(spec=spec, path=p, base=base, out=out)
    expand(sweep)  # cell ids that collide are a sweep error, found now
    return sweep


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    id: str
    index: int
    values: dict[str, Any]  # axis -> its value (a bundle axis: the bundle's name)
    overrides: dict[str, Any]  # dotted key -> value: the sweep's overrides, then the axes'
    axis_overrides: dict[str, Any]  # the part of `overrides` that the axes set


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int | float | str):
        return str(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _slug(text: str) -> str:
    # "-" separates axes in a cell id, so it never appears inside one axis's part.
    slug = re.sub(r"[^A-Za-z0-9._=+]+", "_", text).strip("_")
    if slug.startswith("."):
        slug = "_" + slug[1:]
    return slug or "_"


def cell_token(axis: str, value: Any, bundle: bool) -> str:
    """One axis's part of a cell id: a name as it is (`sft`, `rationales`), a number or flag
    with its key's last part (`seed=0`, `train_fraction=0.25`, `rationales=false`)."""
    if bundle or isinstance(value, str):
        return _slug(str(value))
    return _slug(f"{axis.rsplit('.', 1)[-1]}={_value_text(value)}")


def cell_id(tokens: Sequence[str]) -> str:
    ident = "-".join(tokens)
    if len(ident) > 120:  # file-name limits; the hash keeps long ids distinct and stable
        digest = hashlib.sha1(ident.encode()).hexdigest()[:10]
        ident = f"{ident[:100]}-{digest}"
    return ident


def expand(sweep: Sweep) -> list[Cell]:
    """The cells in product order (the first axis varies slowest). A cell's id depends only on
    its own axis values, so adding a value to an axis keeps the ids (and results) of the rest."""
    spec = sweep.spec
    per_axis: list[list[tuple[Any, str, dict[str, Any]]]] = []
    for axis in spec.axes:
        points = [(v, o) for a, v, o in _axis_points({axis: spec.axes[axis]})]
        tokens = [cell_token(axis, v, spec.is_bundle_axis(axis)) for v, _ in points]
        seen: dict[str, Any] = {}
        for (value, _), token in zip(points, tokens, strict=True):
            if token in seen:
                raise SweepError(
                    f"sweep error: {sweep.path}: axes.{axis}: values {seen[token]!r} and "
                    f"{value!r} give the same cell id part {token!r}"
                )
            seen[token] = value
        per_axis.append(
            [(value, token, o) for (value, o), token in zip(points, tokens, strict=True)]
        )
    cells = []
    for index, combo in enumerate(itertools.product(*per_axis)):
        axis_overrides: dict[str, Any] = {}
        for _, _, point_overrides in combo:
            axis_overrides.update(point_overrides)
        cells.append(
            Cell(
                id=cell_id([token for _, token, _ in combo]),
                index=index,
                values={axis: value for axis, (value, _, _) in zip(spec.axes, combo, strict=True)},
                overrides={**spec.overrides, **axis_overrides},
                axis_overrides=axis_overrides,
            )
        )
    return cells


def _yaml_value(value: Any) -> str:
    """A value as `key=value` text that load_config's YAML parsing turns back into `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    return text.removesuffix("\n...\n").removesuffix("\n")


def cell_dir(sweep: Sweep, cell: Cell) -> Path:
    return sweep.cells_dir / cell.id


def cell_config(sweep: Sweep, cell: Cell) -> RunConfig:
    """Base config + the cell's overrides, named and placed in the sweep; ConfigError if bad."""
    out = str(cell_dir(sweep, cell)).replace("{", "{{").replace("}", "}}")
    items = [f"{key}={_yaml_value(value)}" for key, value in cell.overrides.items()]
    items += [
        f"name={_yaml_value(f'{sweep.spec.name}-{cell.id}')}",
        f"output_dir={_yaml_value(out)}",
    ]
    return load_config(sweep.base, items)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.removesuffix("."): tree}


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    a, b = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return [
        f"{key}: {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key, object()) != b.get(key, object())
    ]


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
    if summary is None:
        # Runs again in place: `trainer.resume=auto` picks up its last checkpoint, if any.
        last = _read_json(folder / "status.json") or {}
        if last.get("status") in ("failed", "preempted"):
            why = f"its last attempt {last['status']} (exit code {last.get('exit_code')})"
        else:
            why = "it did not finish"
        return Plan(cell, "run", why, cfg)
    if summary.get("preempted"):
        return Plan(cell, "run", "preempted: resuming", cfg)
    return Plan(cell, "skip", "finished", cfg)


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
    """Runs cell subprocesses, at most `concurrency` at once; SIGTERM to the sweep is passed on
    to the running cells (each checkpoints and stops, like a lone run) and starts no more."""

    def __init__(self, sweep: Sweep, env: dict[str, str]) -> None:
        self.sweep, self.env = sweep, env
        self.stop = threading.Event()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def terminate(self) -> None:
        self.stop.set()
        with self._lock:
            for proc in self._procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)

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
            cmd = [sys.executable, "-m", "rayd", "train", str(folder / "cell.yaml")]
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
                )
                self._procs[cell.id] = proc
            try:
                code = proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(cell.id, None)
        wall = time.time() - started
        summary = _read_json(folder / "summary.json")
        if code == 0 and summary is not None and not summary.get("preempted"):
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


def run_sweep(sweep: Sweep, plans: list[Plan]) -> tuple[list[Outcome], bool]:
    """Run what the plans say; returns every cell's outcome and whether SIGTERM stopped us."""
    outcomes: dict[str, Outcome] = {}
    todo: list[Plan] = []
    for plan in plans:
        if plan.action == "invalid":
            outcomes[plan.cell.id] = Outcome(plan.cell, "invalid", error=plan.reason)
            print(f"rayd ablate: cell {plan.cell.id}: invalid config: {plan.reason}", flush=True)
        elif plan.action == "skip":
            outcomes[plan.cell.id] = _outcome_from_files(sweep, plan.cell, "skipped")
            print(f"rayd ablate: cell {plan.cell.id}: skipped (finished before)", flush=True)
        else:
            if plan.reason:
                verb = "running again" if plan.action == "rerun" else "running"
                print(f"rayd ablate: cell {plan.cell.id}: {plan.reason}; {verb}", flush=True)
            todo.append(plan)

    concurrency = min(sweep.spec.concurrency, len(todo))
    stopped = False
    if todo:
        with _cluster_for_cells(concurrency) as env:
            runner = _Runner(sweep, env)
            previous = None
            if threading.current_thread() is threading.main_thread():
                previous = signal.signal(signal.SIGTERM, lambda *_: runner.terminate())
            try:
                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    futures = {pool.submit(runner.run, plan): plan for plan in todo}
                    for i, future in enumerate(as_completed(futures), 1):
                        outcome = future.result()
                        outcomes[outcome.cell.id] = outcome
                        _print_progress(i, len(todo), outcome)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            stopped = runner.stop.is_set()
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


def _outcome_from_files(sweep: Sweep, cell: Cell, finished: str = "done") -> Outcome:
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


# --------------------------------------------------------------------------------------------
# Results: CSV, Markdown table, plots
# --------------------------------------------------------------------------------------------


def _metric_keys(outcomes: list[Outcome]) -> list[str]:
    keys: dict[str, None] = {}
    for o in outcomes:
        if o.ok and o.summary:
            keys.update(
                dict.fromkeys(
                    k
                    for k, v in (o.summary.get("final") or {}).items()
                    if isinstance(v, int | float)
                )
            )
    # Accuracy first: it is the number a reader looks for.
    return sorted(keys, key=lambda k: (k != "eval/accuracy", k))


def write_csv(sweep: Sweep, outcomes: list[Outcome], path: Path) -> None:
    axes = list(sweep.spec.axes)
    metrics = _metric_keys(outcomes)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["cell", *axes, "status", "exit_code", "steps", *metrics, "wall_s", "error"]
        )
        for o in outcomes:
            final = (o.summary or {}).get("final") or {}
            writer.writerow(
                [
                    o.cell.id,
                    *[_value_text(o.cell.values[a]) for a in axes],
                    "done" if o.status == "skipped" else o.status,
                    "" if o.exit_code is None else o.exit_code,
                    (o.summary or {}).get("steps", ""),
                    *[final.get(m, "") for m in metrics],
                    "" if o.wall_s is None else f"{o.wall_s:.1f}",
                    o.error.splitlines()[-1] if o.error else "",
                ]
            )


@dataclass
class Group:
    """Cells that differ only in their seed."""

    values: dict[str, Any]  # non-seed axis -> value
    cells: list[Outcome] = field(default_factory=list)
    stats: dict[str, tuple[float, float | None, int]] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return sum(o.ok for o in self.cells)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no spread from a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(sweep: Sweep, outcomes: list[Outcome]) -> list[Group]:
    """Groups in product order; per final metric: (mean, std, n) over the group's seeds."""
    seed = sweep.spec.seed_axis
    kept = [a for a in sweep.spec.axes if a != seed]
    groups: dict[tuple[str, ...], Group] = {}
    for o in outcomes:
        values = {a: o.cell.values[a] for a in kept}
        key = tuple(_value_text(v) for v in values.values())
        groups.setdefault(key, Group(values)).cells.append(o)
    metrics = _metric_keys(outcomes)
    for group in groups.values():
        for metric in metrics:
            xs = [
                float(o.summary["final"][metric])
                for o in group.cells
                if o.ok
                and o.summary
                and isinstance(o.summary.get("final", {}).get(metric), int | float)
            ]
            xs = [x for x in xs if math.isfinite(x)]
            if xs:
                mean, std = mean_std(xs)
                group.stats[metric] = (mean, std, len(xs))
    return list(groups.values())


def format_stat(metric: str, mean: float, std: float | None) -> str:
    if metric.endswith("accuracy"):
        text = f"{100 * mean:.1f}"
        return f"{text} ± {100 * std:.1f} %" if std is not None else f"{text} %"
    return f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}"


def write_markdown(sweep: Sweep, outcomes: list[Outcome], path: Path, plots: list[Path]) -> None:
    spec = sweep.spec
    seed = spec.seed_axis
    groups = aggregate(sweep, outcomes)
    metrics = _metric_keys(outcomes)
    kept = [a for a in spec.axes if a != seed]
    seeds_per_group = len(spec.axes[seed]) if seed else 1
    lines = [f"# Sweep `{spec.name}`", ""]
    lines.append(f"Base config `{sweep.base}`; {len(outcomes)} cells.")
    if spec.overrides:
        shared = ", ".join(f"`{k}={_value_text(v)}`" for k, v in spec.overrides.items())
        lines.append(f"Every cell: {shared}.")
    for axis in spec.axes:
        if spec.is_bundle_axis(axis):
            for bundle, overrides in spec.axes[axis].items():
                sets = ", ".join(f"`{k}={_value_text(v)}`" for k, v in (overrides or {}).items())
                lines.append(f"- {spec.label(axis)} = {spec.label(bundle)}: {sets or 'the base'}")
    spread = (
        f"mean ± sample standard deviation over the seeds ({spec.label(seed)})"
        if seed
        else "one run per row (no seed axis)"
    )
    lines += [
        "",
        f"Final held-out metrics, {spread}; n = finished runs; wall s = a run's mean wall time, "
        "start-up included.",
        "",
    ]
    header = [spec.label(a) for a in kept] + ["n", *[spec.label(m) for m in metrics], "wall s"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for group in groups:
        row = [spec.label(_value_text(group.values[a])) for a in kept]
        row.append(f"{group.done}/{seeds_per_group}")
        for metric in metrics:
            if metric in group.stats:
                mean, std, _ = group.stats[metric]
                row.append(format_stat(metric, mean, std))
            else:
                row.append("–")
        walls = [o.wall_s for o in group.cells if o.ok and o.wall_s is not None]
        row.append(f"{statistics.fmean(walls):.0f}" if walls else "–")
        lines.append("| " + " | ".join(row) + " |")
    main_metric = choose_metric(sweep, outcomes)
    if main_metric is not None:
        lines += curve_table(sweep, groups, main_metric)
    bad = [o for o in outcomes if not o.ok]
    if bad:
        lines += ["", "Cells without results:", ""]
        for o in bad:
            last = o.error.splitlines()[-1] if o.error else ""
            code = f" (exit code {o.exit_code})" if o.exit_code is not None else ""
            lines.append(f"- `{o.cell.id}`: {o.status}{code}{': ' + last if last else ''}")
    if plots:
        lines += [""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path.write_text("\n".join(lines) + "\n")


def curve_table(sweep: Sweep, groups: list[Group], metric: str) -> list[str]:
    """`metric` at every evaluation step, mean ± std over each setting's finished seeds: a
    comparison at equal steps, where settings ran for different numbers of steps."""
    spec = sweep.spec
    kept = [a for a in spec.axes if a != spec.seed_axis]
    curves: list[dict[int, list[float]]] = []
    for group in groups:
        by_step: dict[int, list[float]] = {}
        for o in group.cells:
            if o.ok:
                for r in _read_metrics(cell_dir(sweep, o.cell) / "metrics.jsonl"):
                    if _is_number(r.get(metric)) and math.isfinite(r[metric]):
                        by_step.setdefault(r["step"], []).append(float(r[metric]))
        curves.append(by_step)
    steps = sorted({s for by_step in curves for s in by_step})
    if not steps:
        return []
    header = [spec.label(a) for a in kept] + [f"step {s}" for s in steps]
    lines = ["", f"{spec.label(metric)} at each evaluation step, mean ± std over seeds:", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, by_step in zip(groups, curves, strict=True):
        row = [spec.label(_value_text(group.values[a])) for a in kept]
        row += [format_stat(metric, *mean_std(by_step[s])) if s in by_step else "–" for s in steps]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def choose_metric(sweep: Sweep, outcomes: list[Outcome]) -> str | None:
    if sweep.spec.report.metric:
        return sweep.spec.report.metric
    keys = _metric_keys(outcomes)
    for metric in ("eval/accuracy", "eval/reverse_kl"):
        if metric in keys:
            return metric
    return keys[0] if keys else None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def choose_x_axis(sweep: Sweep) -> str | None:
    spec = sweep.spec
    if spec.report.x_axis:
        return spec.report.x_axis
    kept = [a for a in spec.axes if a != spec.seed_axis]
    numeric = [
        a
        for a in kept
        if not spec.is_bundle_axis(a)
        and len(spec.axes[a]) > 1
        and all(_is_number(v) for v in spec.axes[a])
    ]
    return (numeric or kept or [None])[0]


def write_plots(sweep: Sweep, outcomes: list[Outcome], plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    metric = choose_metric(sweep, outcomes)
    written = []
    if metric is not None and any(o.ok for o in outcomes):
        written.append(_plot_final(sweep, outcomes, metric, plot_dir, plt))
    written.append(_plot_curves(sweep, outcomes, metric, plot_dir, plt))
    return written


def setting_name(spec: SweepSpec, values: dict[str, Any]) -> str:
    """Legend text: names as they are (`sft`), numbers and flags with their axis
    (`train_fraction=0.25`), the same in every plot."""
    parts = [
        spec.label(_value_text(v))
        if spec.is_bundle_axis(a) or isinstance(v, str)
        else f"{spec.label(a)}={spec.label(_value_text(v))}"
        for a, v in values.items()
    ]
    return ", ".join(parts) or spec.name


def _scale(metric: str) -> float:
    return 100.0 if metric.endswith("accuracy") else 1.0


def _plot_final(
    sweep: Sweep, outcomes: list[Outcome], metric: str, plot_dir: Path, plt: Any
) -> Path:
    """The final metric against one axis, a line per setting of the others, std over seeds."""
    spec = sweep.spec
    x_axis = choose_x_axis(sweep)
    groups = aggregate(sweep, outcomes)
    others = [a for a in spec.axes if a not in (spec.seed_axis, x_axis)]
    x_values = list(dict.fromkeys(_value_text(v) for v in spec.axes[x_axis])) if x_axis else [""]
    if x_axis and spec.is_bundle_axis(x_axis):
        x_values = list(spec.axes[x_axis])
    numeric = (
        x_axis is not None
        and not spec.is_bundle_axis(x_axis)
        and all(_is_number(v) for v in spec.axes[x_axis])
    )
    position = {text: (float(text) if numeric else i) for i, text in enumerate(x_values)}
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for group in groups:
        if metric not in group.stats:
            continue
        name = setting_name(spec, {a: group.values[a] for a in others})
        x = position[_value_text(group.values[x_axis])] if x_axis else 0
        mean, std, _ = group.stats[metric]
        lines.setdefault(name, []).append((x, mean * _scale(metric), (std or 0.0) * _scale(metric)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, points in lines.items():
        points.sort()
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            # Settings of a named axis (methods) are categories: a line between them means nothing.
            linestyle="-" if numeric else "none",
            label=name,
        )
    if numeric:
        xs = [position[t] for t in x_values]
        if min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
    else:
        # Long method names side by side overlap: wrapped onto lines of their own.
        names = [textwrap.fill(spec.label(t), 16) for t in x_values]
        ax.set_xticks(range(len(x_values)), names, fontsize=8)
        ax.set_xlim(-0.5, len(x_values) - 0.5)
    ax.set_xlabel(spec.label(x_axis) if x_axis else "")
    unit = " (%)" if _scale(metric) == 100 else ""
    ax.set_ylabel(f"final {spec.label(metric)}{unit}")
    seeds = f"; mean ± std over {spec.label(spec.seed_axis)}" if spec.seed_axis else ""
    ax.set_title(f"{spec.name}{seeds}", fontsize=10)
    ax.grid(alpha=0.3)
    if len(lines) > 1 or others:
        ax.legend(fontsize=8)
    fig.tight_layout()
    x_name = x_axis.rsplit(".", 1)[-1] if x_axis else "cells"
    path = plot_dir / f"final_{_slug(metric.rsplit('/', 1)[-1])}_vs_{_slug(x_name)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        text = path.read_text()
    except OSError:
        return records
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _plot_curves(
    sweep: Sweep, outcomes: list[Outcome], metric: str | None, plot_dir: Path, plt: Any
) -> Path:
    """Training loss and the eval metric against step, a line per finished cell; the seeds of
    one setting share a colour."""
    spec = sweep.spec
    seed = spec.seed_axis
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    group_color: dict[str, str] = {}
    for o in outcomes:
        if not o.ok:
            continue
        records = _read_metrics(cell_dir(sweep, o.cell) / "metrics.jsonl")
        name = setting_name(spec, {a: v for a, v in o.cell.values.items() if a != seed})
        first = name not in group_color
        color = group_color.setdefault(name, colors[len(group_color) % len(colors)])
        label = name if first else None
        train = [(r["step"], r["loss"]) for r in records if _is_number(r.get("loss"))]
        if train:
            ax_loss.plot(*zip(*train, strict=True), color=color, alpha=0.8, lw=1, label=label)
        if metric is not None:
            evals = [
                (r["step"], r[metric] * _scale(metric))
                for r in records
                if _is_number(r.get(metric))
            ]
            if evals:
                ax_eval.plot(
                    *zip(*evals, strict=True), color=color, alpha=0.8, marker=".", label=label
                )
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_eval):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_eval.set_xlabel("step")
    unit = " (%)" if metric and _scale(metric) == 100 else ""
    ax_eval.set_ylabel(f"{spec.label(metric)}{unit}" if metric else "eval")
    for ax in (ax_loss, ax_eval):
        ax.grid(alpha=0.3)
    if 0 < len(group_color) <= 12:
        ax_loss.legend(fontsize=7)
    fig.suptitle(
        f"{spec.name}: learning curves, a line per cell"
        + (f", one colour per setting of all but {spec.label(seed)}" if seed else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path = plot_dir / "learning_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(sweep: Sweep, outcomes: list[Outcome]) -> list[Path]:
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_csv(sweep, outcomes, sweep.out / "results.csv")
    plots = write_plots(sweep, outcomes, sweep.out / "plots")
    write_markdown(sweep, outcomes, sweep.out / "results.md", plots)
    return [sweep.out / "results.csv", sweep.out / "results.md", *plots]


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in out)


def _plan_table(plans: list[Plan]) -> str:
    rows = []
    for p in plans:
        why = "invalid config (below)" if p.action == "invalid" else p.reason
        sets = ", ".join(f"{k}={_value_text(v)}" for k, v in p.cell.axis_overrides.items())
        rows.append([p.cell.id, p.action, sets, why])
    return format_table(rows, ["cell", "action", "axis overrides", "why"])


def _outcome_table(sweep: Sweep, outcomes: list[Outcome]) -> str:
    metric = choose_metric(sweep, outcomes)
    rows = []
    for o in outcomes:
        final = (o.summary or {}).get("final") or {}
        value = final.get(metric) if metric else None
        rows.append(
            [
                o.cell.id,
                o.status,
                "" if o.exit_code is None else str(o.exit_code),
                "" if o.wall_s is None else f"{o.wall_s:.0f}",
                "" if not _is_number(value) else format_stat(metric or "", value, None),
            ]
        )
    return format_table(rows, ["cell", "status", "exit", "wall s", metric or "metric"])


def main(argv: list[str] | None = None) -> int:
    from rayd.cli import ArgumentParser, positive_int

    parser = ArgumentParser(prog="rayd ablate", description=__doc__.split("\n")[0].replace("`", ""))
    parser.add_argument("sweep", metavar="SWEEP", help="sweep YAML file")
    parser.add_argument("--dry-run", action="store_true", help="list the cells; run nothing")
    parser.add_argument(
        "--concurrency", type=positive_int, metavar="N", help="cells at once (overrides the file)"
    )
    parser.add_argument(
        "--only-report", action="store_true", help="rebuild results and plots from the cells"
    )
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, args.concurrency)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    cells = expand(sweep)

    if args.dry_run:
        plans = [plan_cell(sweep, cell) for cell in cells]
        print(f"sweep {sweep.spec.name}: {len(cells)} cells in {sweep.out}")
        shared = sweep.spec.overrides
        if shared:
            print("every cell: " + ", ".join(f"{k}={_value_text(v)}" for k, v in shared.items()))
        print(_plan_table(plans))
        for p in plans:
            if p.action == "invalid":
                print(f"cell {p.cell.id}: {p.reason}")
        return 1 if any(p.action == "invalid" for p in plans) else 0

    if args.only_report:
        outcomes = [_outcome_from_files(sweep, cell) for cell in cells]
        stopped = False
    else:
        sweep.out.mkdir(parents=True, exist_ok=True)
        snapshot = sweep.spec.model_dump(mode="json")
        (sweep.out / "sweep.yaml").write_text(yaml.safe_dump(snapshot, sort_keys=False))
        plans = [plan_cell(sweep, cell) for cell in cells]
        print(
            f"rayd ablate: sweep {sweep.spec.name}: {len(cells)} cells, "
            f"{sum(p.action in ('run', 'rerun') for p in plans)} to run, "
            f"concurrency {sweep.spec.concurrency}; results in {sweep.out}",
            flush=True,
        )
        outcomes, stopped = run_sweep(sweep, plans)

    written = write_report(sweep, outcomes)
    print(_outcome_table(sweep, outcomes))
    print("rayd ablate: wrote " + ", ".join(str(p) for p in written))
    if stopped:
        print(
            "rayd ablate: stopped by SIGTERM; run the same command again to finish", file=sys.stderr
        )
        return EXIT_PREEMPTED
    failed = [o for o in outcomes if o.status in ("failed", "invalid", "preempted")]
    if failed:
        print(
            f"rayd ablate: {len(failed)} of {len(outcomes)} cells failed: "
            + ", ".join(o.cell.id for o in failed),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
