"""A sweep's plots (plots/*.png): each final metric against the swept axis, and the
training curves."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from rayd.commands.ablate.report import aggregate, choose_metric, is_number, read_metrics
from rayd.commands.ablate.run import Outcome
from rayd.commands.ablate.sweep import Sweep, SweepSpec, cell_dir, slug, value_text


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
        and all(is_number(v) for v in spec.axes[a])
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
        spec.label(value_text(v))
        if spec.is_bundle_axis(a) or isinstance(v, str)
        else f"{spec.label(a)}={spec.label(value_text(v))}"
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
    x_values = list(dict.fromkeys(value_text(v) for v in spec.axes[x_axis])) if x_axis else [""]
    if x_axis and spec.is_bundle_axis(x_axis):
        x_values = list(spec.axes[x_axis])
    numeric = (
        x_axis is not None
        and not spec.is_bundle_axis(x_axis)
        and all(is_number(v) for v in spec.axes[x_axis])
    )
    position = {text: (float(text) if numeric else i) for i, text in enumerate(x_values)}
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for group in groups:
        if metric not in group.stats:
            continue
        name = setting_name(spec, {a: group.values[a] for a in others})
        x = position[value_text(group.values[x_axis])] if x_axis else 0
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
    path = plot_dir / f"final_{slug(metric.rsplit('/', 1)[-1])}_vs_{slug(x_name)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
        records = read_metrics(cell_dir(sweep, o.cell) / "metrics.jsonl")
        name = setting_name(spec, {a: v for a, v in o.cell.values.items() if a != seed})
        first = name not in group_color
        color = group_color.setdefault(name, colors[len(group_color) % len(colors)])
        label = name if first else None
        train = [(r["step"], r["loss"]) for r in records if is_number(r.get("loss"))]
        if train:
            ax_loss.plot(*zip(*train, strict=True), color=color, alpha=0.8, lw=1, label=label)
        if metric is not None:
            evals = [
                (r["step"], r[metric] * _scale(metric)) for r in records if is_number(r.get(metric))
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
