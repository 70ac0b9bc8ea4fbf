"""A sweep's results: results.csv, the results.md table (mean ± std over seeds; with a
`baseline`, paired differences against it with 95% t-intervals), and the files both are written
from."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayd.commands.ablate.run import Outcome
from rayd.commands.ablate.sweep import Sweep, cell_dir, value_text


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
    # Accuracy first: it is the number a reader looks for; other accuracies (sampled) next to it.
    return sorted(keys, key=lambda k: (k != "eval/accuracy", not k.endswith("accuracy"), k))


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
                    *[value_text(o.cell.values[a]) for a in axes],
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

    def by_seed(self, seed_axis: str | None, metric: str) -> dict[str, float]:
        """The finished cells' finite `metric`, by seed value (one "" cell without a seed axis)."""
        out = {}
        for o in self.cells:
            value = ((o.summary or {}).get("final") or {}).get(metric) if o.ok else None
            if is_number(value) and math.isfinite(value):
                out[value_text(o.cell.values[seed_axis]) if seed_axis else ""] = float(value)
        return out


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no spread from a single value."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


# Student t's 0.975 quantiles for 1..30 degrees of freedom (scipy.stats.t.ppf(0.975, df); scipy
# is not in the lock, and a sweep has a handful of seeds).
T_975 = (
    12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836,
    2.446911851, 2.364624252, 2.306004135, 2.262157163, 2.228138852,
    2.200985160, 2.178812830, 2.160368656, 2.144786688, 2.131449546,
    2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447,
    2.079613845, 2.073873068, 2.068657610, 2.063898562, 2.059538553,
    2.055529439, 2.051830516, 2.048407142, 2.045229642, 2.042272456,
)  # fmt: skip
Z_975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """Student t's 0.975 quantile: the table to 30 degrees of freedom, then the normal quantile
    with Cornish-Fisher's corrections in 1/df (Abramowitz & Stegun 26.7.5; within 1e-7 past
    30, where the bare normal quantile would be 4% short)."""
    if df < 1:
        raise ValueError(f"need df >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class Paired:
    """A setting minus its baseline over the seeds both have: the mean difference, its 95%
    Student-t interval (None from one pair), the pairs, and the cells left without a partner."""

    mean: float | None  # None: no seed in common
    interval: tuple[float, float] | None
    pairs: int
    unpaired: int


def paired_difference(values: dict[str, float], baseline: dict[str, float]) -> Paired:
    """`values` minus `baseline`, seed by seed (the keys: seed values)."""
    shared = [seed for seed in values if seed in baseline]
    unpaired = len(values) + len(baseline) - 2 * len(shared)
    if not shared:
        return Paired(None, None, 0, unpaired)
    diffs = [values[seed] - baseline[seed] for seed in shared]
    mean, std = mean_std(diffs)
    interval = None
    if std is not None:
        half = t_quantile_975(len(diffs) - 1) * std / math.sqrt(len(diffs))
        interval = (mean - half, mean + half)
    return Paired(mean, interval, len(diffs), unpaired)


def paired_by_seed(
    results: dict[str, dict[str, float]], baseline: str, metrics: dict[str, float]
) -> str:
    """A markdown table of per-cell measurements made outside a sweep's runs (a student's other
    tasks, its drift from the start), for cells named METHOD-seed=N (a run folder or its
    `student/`): each method's mean ± std per metric (times its scale), and minus `baseline`
    paired by seed with its 95% t-interval."""
    import re

    by_method: dict[str, dict[str, dict[str, float]]] = {}
    for folder, row in results.items():
        cell = Path(folder).parent.name if Path(folder).name == "student" else Path(folder).name
        m = re.fullmatch(r"(.+)-seed=(\d+)", cell)
        if m:
            by_method.setdefault(m[1], {})[m[2]] = row
    lines = [
        "| method | n | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for method, seeds in by_method.items():
        cells = []
        for metric, scale in metrics.items():
            mean, std = mean_std([scale * r[metric] for r in seeds.values()])
            digits = 1 if scale == 100.0 else 3
            text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
            if method != baseline and baseline in by_method:
                d = paired_difference(
                    {k: scale * r[metric] for k, r in seeds.items()},
                    {k: scale * r[metric] for k, r in by_method[baseline].items()},
                )
                if d.mean is not None:
                    text += f"; Δ {d.mean:+.{digits}f}"
                    if d.interval:
                        text += f" [{d.interval[0]:+.{digits}f}, {d.interval[1]:+.{digits}f}]"
            cells.append(text)
        lines.append(f"| {method} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aggregate(sweep: Sweep, outcomes: list[Outcome]) -> list[Group]:
    """Groups in product order; per final metric: (mean, std, n) over the group's seeds."""
    seed = sweep.spec.seed_axis
    kept = [a for a in sweep.spec.axes if a != seed]
    groups: dict[tuple[str, ...], Group] = {}
    for o in outcomes:
        values = {a: o.cell.values[a] for a in kept}
        key = tuple(value_text(v) for v in values.values())
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


def format_difference(metric: str, d: Paired) -> str:
    if d.mean is None:
        return "–"
    if metric.endswith("accuracy"):  # percentage points: a difference of percentages
        text = f"{100 * d.mean:+.1f}"
        if d.interval is not None:
            text += f" [{100 * d.interval[0]:+.1f}, {100 * d.interval[1]:+.1f}]"
        return text + " pp"
    text = f"{d.mean:+.3g}"
    if d.interval is not None:
        text += f" [{d.interval[0]:+.3g}, {d.interval[1]:+.3g}]"
    return text


def baseline_of(sweep: Sweep, group: Group) -> tuple[str, ...]:
    """The key of `group`'s control: the baseline's values, the group's own on other axes."""
    chosen = sweep.spec.baseline or {}
    return tuple(value_text(chosen.get(a, v)) for a, v in group.values.items())


def paired_table(sweep: Sweep, groups: list[Group], metrics: list[str]) -> list[str]:
    """Each setting minus its baseline, per metric, over the seeds both finished."""
    spec = sweep.spec
    seed = spec.seed_axis
    kept = [a for a in spec.axes if a != seed]
    chosen = spec.baseline or {}
    by_key = {tuple(value_text(v) for v in g.values.values()): g for g in groups}
    named = ", ".join(f"{spec.label(a)} = {spec.label(value_text(v))}" for a, v in chosen.items())
    matched = [spec.label(a) for a in kept if a not in chosen]
    if matched:
        named += f"; {', '.join(matched)} as in the row"
    pairing = (
        f"runs with the same {spec.label(seed)} pair up; mean difference [95% Student-t "
        "interval, pairs − 1 degrees of freedom]"
        if seed
        else "no seed axis: one run each, the difference alone"
    )
    lines = [
        "",
        f"Paired differences against the baseline ({named}): a setting minus the baseline, "
        f"{pairing}; accuracies in percentage points. pairs = seeds both finished; left out = "
        "finished runs whose seed the other side lacks.",
        "",
    ]
    header = [spec.label(a) for a in kept] + ["pairs", "left out"]
    header += [f"Δ {spec.label(m)}" for m in metrics]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in groups:
        key = baseline_of(sweep, group)
        if key == tuple(value_text(v) for v in group.values.values()):
            continue  # a baseline itself
        control = by_key.get(key)
        diffs = [
            paired_difference(group.by_seed(seed, m), control.by_seed(seed, m) if control else {})
            for m in metrics
        ]
        first = diffs[0] if diffs else Paired(None, None, 0, 0)
        row = [spec.label(value_text(group.values[a])) for a in kept]
        row += [str(first.pairs), str(first.unpaired)]
        for metric, d in zip(metrics, diffs, strict=True):
            cell = format_difference(metric, d)
            # pairs and left out count the first metric's runs; a metric that some runs lack
            # shows its own count.
            if d.mean is not None and d.pairs != first.pairs:
                cell += f" (pairs {d.pairs})"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
    return lines


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
        shared = ", ".join(f"`{k}={value_text(v)}`" for k, v in spec.overrides.items())
        lines.append(f"Every cell: {shared}.")
    for axis in spec.axes:
        if spec.is_bundle_axis(axis):
            for bundle, overrides in spec.axes[axis].items():
                sets = ", ".join(f"`{k}={value_text(v)}`" for k, v in (overrides or {}).items())
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
        row = [spec.label(value_text(group.values[a])) for a in kept]
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
    if spec.baseline is not None:
        lines += paired_table(sweep, groups, metrics)
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
                for r in read_metrics(cell_dir(sweep, o.cell) / "metrics.jsonl"):
                    if is_number(r.get(metric)) and math.isfinite(r[metric]):
                        by_step.setdefault(r["step"], []).append(float(r[metric]))
        curves.append(by_step)
    steps = sorted({s for by_step in curves for s in by_step})
    if not steps:
        return []
    header = [spec.label(a) for a in kept] + [f"step {s}" for s in steps]
    lines = ["", f"{spec.label(metric)} at each evaluation step, mean ± std over seeds:", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, by_step in zip(groups, curves, strict=True):
        row = [spec.label(value_text(group.values[a])) for a in kept]
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


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict[str, Any]]:
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
