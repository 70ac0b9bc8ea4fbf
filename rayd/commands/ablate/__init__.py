"""`rayd ablate SWEEP.yaml`: a grid of training runs around one base config, and its report.

A sweep is a base run config, overrides shared by every cell, and ordered axes; the cartesian
product of the axes makes the cells. An axis is either a dotted config key with a list of values
(`trainer.seed: [0, 1]`) or a name with named bundles of overrides, for settings that move
together (`method: {answers: {data.rationales: false}, rationales: {}}`).

Each cell is `python -m rayd train <cell>/cell.yaml` in its own process, so a cell that crashes
or leaves Ray in a bad state cannot take the sweep down. A cell is finished when its
summary.json says so and the config it ran with is the one the sweep asks for now; finished cells
are skipped on the next run, a changed one is moved aside and run again. The results of all
cells go to results.csv, a results.md table (mean ± std over seeds; with `baseline`, paired
differences against the control with 95% t-intervals) and plots/.

The package: sweep.py (the sweep file and its cells), run.py (running the cells), report.py
(results.csv and results.md), plots.py; this module is the command.

Layout under the sweep folder (`output_dir`, default runs/sweeps/<name>):
    sweep.yaml                 the sweep as read (for the record)
    cells/<cell id>/           a run folder (config.yaml, metrics.jsonl, summary.json, student/)
                               plus cell.yaml (what the sweep asked for), status.json, log.txt
    stale/<cell id>-<time>/    results of a cell whose config changed since they were made
    results.csv, results.md, plots/*.png
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import yaml

from rayd.commands.ablate.plots import write_plots
from rayd.commands.ablate.report import (
    choose_metric,
    format_stat,
    is_number,
    write_csv,
    write_markdown,
)
from rayd.commands.ablate.run import (
    Outcome,
    Plan,
    lock_sweep,
    outcome_from_files,
    plan_cell,
    run_sweep,
)
from rayd.commands.ablate.sweep import (
    EXIT_PREEMPTED,
    Cell,
    Sweep,
    expand,
    load_sweep,
    value_text,
)
from rayd.config import ConfigError


def write_report(sweep: Sweep, outcomes: list[Outcome]) -> list[Path]:
    sweep.out.mkdir(parents=True, exist_ok=True)
    write_csv(sweep, outcomes, sweep.out / "results.csv")
    plots = write_plots(sweep, outcomes, sweep.out / "plots")
    write_markdown(sweep, outcomes, sweep.out / "results.md", plots)
    return [sweep.out / "results.csv", sweep.out / "results.md", *plots]


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in out)


def _plan_table(plans: list[Plan]) -> str:
    rows = []
    for p in plans:
        why = "invalid config (below)" if p.action == "invalid" else p.reason
        sets = ", ".join(f"{k}={value_text(v)}" for k, v in p.cell.axis_overrides.items())
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
                "" if not is_number(value) else format_stat(metric or "", value, None),
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
            print("every cell: " + ", ".join(f"{k}={value_text(v)}" for k, v in shared.items()))
        print(_plan_table(plans))
        for p in plans:
            if p.action == "invalid":
                print(f"cell {p.cell.id}: {p.reason}")
        return 1 if any(p.action == "invalid" for p in plans) else 0

    try:
        with lock_sweep(sweep.out) as lock:
            return _run(sweep, cells, args.only_report, lock)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


def _run(sweep: Sweep, cells: list[Cell], only_report: bool, lock: int) -> int:
    """The sweep (or its report alone), with its folder locked (`lock`: the descriptor)."""
    if only_report:
        outcomes = [outcome_from_files(sweep, cell) for cell in cells]
        stopped = None
    else:
        snapshot = sweep.spec.model_dump(mode="json")
        (sweep.out / "sweep.yaml").write_text(yaml.safe_dump(snapshot, sort_keys=False))
        plans = [plan_cell(sweep, cell) for cell in cells]
        print(
            f"rayd ablate: sweep {sweep.spec.name}: {len(cells)} cells, "
            f"{sum(p.action in ('run', 'rerun') for p in plans)} to run, "
            f"concurrency {sweep.spec.concurrency}; results in {sweep.out}",
            flush=True,
        )
        outcomes, stopped = run_sweep(sweep, plans, (lock,))

    written = write_report(sweep, outcomes)
    print(_outcome_table(sweep, outcomes))
    print("rayd ablate: wrote " + ", ".join(str(p) for p in written))
    if stopped is not None:
        name = signal.Signals(stopped).name
        print(
            f"rayd ablate: stopped by {name}; the running cells were stopped; run the same "
            "command again to finish",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED if stopped == signal.SIGTERM else 128 + stopped
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
