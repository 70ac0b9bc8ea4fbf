"""`rayd demo` (`make demo`): the whole system on the embedded defaults, in minutes on a CPU.

Two worlds, each the regime of one method, each row of the report saying which:

SFT's regime (3-digit addition, one valid rationale per sum, a random 0.14M student):
1. the teacher (tiny:addition-teacher) is trained on gold carry rationales, or reused from cache;
2. it writes rationales for the training prompts (`rayd generate configs/demo/traces.yaml`),
   verified, deduplicated and checked for eval leaks;
3. the student (5.7x smaller) learns from them by rationale SFT (response distillation) and by
   Distilling Step-by-Step; the same student trained on gold answers alone, without a teacher,
   for as many steps, is the baseline; all are scored on the same held-out prompts (greedy, vLLM).

On-policy distillation's regime (the portable world, docs/experiments/world.md: a shipped
student at its SFT plateau, 73% right, and a shipped teacher that repairs its wrong digits):
4. from that student, on-policy distillation and continued SFT train the same steps at the same
   learning rate: seed 0 of sweep 1 in docs/experiments/onpolicy-regime.md, scored in the run on
   the world's 2000 test prompts, greedy and at temperature 1.

5. the held-out evaluations, and the report: runs/demo/report.md, report.json and plots/.
Every run is a plain `rayd train` of configs/demo/student.yaml or configs/world/student.yaml
with the overrides printed. A finished run is reused when the demo runs again (delete runs/demo
to start over).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "demo"
WORLD_CONFIG = ROOT / "configs" / "world" / "student.yaml"

# SFT's regime: runs of configs/demo/student.yaml from the random student. The demo's students
# are 0.14M parameters: their learners sample for the in-loop evals (no rollout engine to start);
# at this size an engine's calls cost more than its speed saves (docs/experiments/performance.md).
SMALL = ["rollout.backend=learner"]
METHODS: dict[str, list[str]] = {
    "sft": ["algorithm.name=sft", "data.train_dataset={traces}"],
    "step_by_step": [
        "algorithm.name=step_by_step",
        "data.train_dataset={traces}",
        "trainer.prompts_per_step=32",
    ],
}
BASELINE = ["algorithm.name=sft", "data.rationales=false", "models.teacher=null"]
# On-policy distillation's regime: runs of configs/world/student.yaml, both from the world's start
# student, at the learning rate each got in configs/sweeps/world_lr.yaml (3e-4 for both), seed 0:
# the two arms of configs/sweeps/world_plateau.yaml that compare on-policy with continued SFT.
WORLD_METHODS: dict[str, list[str]] = {
    "sft_continued": ["algorithm.name=sft", "algorithm.loss=null", "learner.optim.lr=3.0e-4"],
    "on_policy": ["algorithm.name=on_policy", "learner.optim.lr=3.0e-4"],
}
REGIMES = {
    "sft": (
        "SFT's regime: plain addition has one valid rationale per sum, the teacher is nearly "
        "deterministic and its traces are verified, and a random student is big enough to learn "
        "them: SFT on teacher rationales already imitates the teacher along the only path that "
        "matters (docs/experiments/rationale-onpolicy-vs-sft.md)."
    ),
    "on_policy": (
        "On-policy distillation's regime, as the literature describes it: a student already "
        "competent (73% at its SFT plateau), sampling its own errors at temperature 1, and a "
        "teacher that flags and rewrites a wrong digit of any kind (docs/experiments/world.md). "
        "One seed here; five seeds with paired intervals, and what held of the predictions made "
        "before they ran: docs/experiments/onpolicy-regime.md."
    ),
}


def run_demo(out: Path, steps: int, world_steps: int, eval_count: int) -> dict[str, Any]:
    from rayd import cluster
    from rayd.commands.generate import generate, load_generate_config
    from rayd.config import load_config
    from rayd.driver import train
    from rayd.evaluate import evaluate_model
    from rayd.progress import duration
    from rayd.tasks import make_task
    from rayd.zoo import resolve_model_path

    started = time.perf_counter()
    _stage = _Stages()
    out.mkdir(parents=True, exist_ok=True)
    base = CONFIGS / "student.yaml"
    base_cfg = load_config(base)
    world_cfg = load_config(WORLD_CONFIG)
    task_options = base_cfg.data.task_options
    # Every config is read before the teacher is built: a bad one fails in a second.
    gen_cfg = load_generate_config(str(CONFIGS / "traces.yaml"), [f"output_dir={out / 'traces'}"])

    _stage("1/5 teacher: tiny:addition-teacher (trained on gold rationales once, then cached)")
    teacher_spec = base_cfg.models.teacher
    teacher = resolve_model_path(
        teacher_spec.path, seed=teacher_spec.build_seed(base_cfg.trainer.seed)
    )

    _stage("2/5 teacher rationales: rayd generate configs/demo/traces.yaml")
    traces = generate(gen_cfg)
    print(json.dumps(traces, indent=2))

    cluster.connect()
    fills = {"traces": traces["dataset"]}
    runs: dict[str, dict[str, Any]] = {}

    def run(name: str, config: Path, overrides: list[str], run_steps: int) -> None:
        args = [f"name={name}", f"output_dir={out}/{{name}}", f"trainer.max_steps={run_steps}"]
        args += [o.format(**fills) for o in overrides]
        command = f"rayd train {config.relative_to(ROOT)} " + " ".join(args)
        print(command, flush=True)
        cfg = load_config(config, args)
        summary_file = cfg.run_dir / "summary.json"
        if _finished_with(cfg, summary_file):
            print(f"rayd demo: {name}: finished before, reused ({summary_file})")
            summary = json.loads(summary_file.read_text())
        else:
            t0 = time.perf_counter()
            summary = train(cfg)
            summary["seconds"] = time.perf_counter() - t0
            summary_file.write_text(json.dumps(summary, indent=2))
            if summary["preempted"]:  # Ctrl-C or SIGTERM: the whole demo stops, not one run
                signame = summary["stopped_by"] or "SIGTERM"
                print(
                    f"rayd demo: {name}: stopped by {signame} (checkpointed); run the demo "
                    "again to resume it",
                    file=sys.stderr,
                )
                raise SystemExit(130 if signame == "SIGINT" else 143)
            print(f"rayd demo: {name}: trained in {duration(summary['seconds'])}", flush=True)
        runs[name] = {"summary": summary, "steps": run_steps, "command": command}

    _stage("3/5 SFT's regime: rationale SFT, step-by-step and the answers-only baseline")
    for method, overrides in METHODS.items():
        run(method, base, [*SMALL, *overrides], steps)
    run("baseline", base, [*SMALL, *BASELINE], steps)

    _stage(
        "4/5 on-policy's regime (the portable world): on-policy distillation and continued SFT "
        "from the same 73% student"
    )
    for method, overrides in WORLD_METHODS.items():
        run(f"world_{method}", WORLD_CONFIG, [*overrides, "trainer.seed=0"], world_steps)

    _stage(
        f"5/5 held-out evaluation (vLLM): SFT's regime on {eval_count} eval prompts, greedy; "
        "the world's teacher on its test split (its students were scored in their runs)"
    )
    split_seed = base_cfg.data.split_seed_for(base_cfg.trainer.seed)
    task = make_task("addition", seed=split_seed, **task_options)
    models = {"teacher": teacher, "baseline": runs["baseline"]["summary"]["student"]}
    models |= {name: runs[name]["summary"]["student"] for name in METHODS}
    scores = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        scores[name] = evaluate_model(
            path, task, count=eval_count, max_new_tokens=base_cfg.rollout.max_new_tokens
        )
        took = duration(time.perf_counter() - t0)
        print(f"  {name:<14} accuracy {100 * scores[name]['accuracy']:.1f}% ({took})", flush=True)
    # The world's teacher on the test split its students were scored on in their runs.
    world_data = world_cfg.data
    world_task = make_task("addition", seed=world_data.split_seed_for(0), **world_data.task_options)
    world_teacher = resolve_model_path(world_cfg.models.teacher.path)
    world_teacher_score = evaluate_model(
        world_teacher,
        world_task,
        count=world_data.eval_size,
        split=world_data.eval_split,
        max_new_tokens=world_cfg.rollout.max_new_tokens,
    )
    _stage.finish()

    report = build_report(models, scores, runs, traces, eval_count, task_options)
    report["world"] = world_report(world_teacher, world_teacher_score, runs, world_cfg)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(out, report, runs)
    return report


def world_report(
    teacher: str, teacher_score: dict[str, Any], runs: dict[str, dict[str, Any]], cfg: Any
) -> dict[str, Any]:
    """On-policy's regime: each run's own held-out evals at its start and its end."""
    first = runs[f"world_{next(iter(WORLD_METHODS))}"]["summary"]
    rows = {
        "start": {
            "accuracy": first["initial"]["eval/accuracy"],
            "sampled_accuracy": first["initial"].get("eval/sampled_accuracy"),
            "path": cfg.models.student.path,
        }
    }
    for method in WORLD_METHODS:
        r = runs[f"world_{method}"]
        rows[method] = {
            "accuracy": r["summary"]["final"]["eval/accuracy"],
            "sampled_accuracy": r["summary"]["final"].get("eval/sampled_accuracy"),
            "path": r["summary"]["student"],
            "steps": r["steps"],
            "seconds": r["summary"].get("seconds"),
            "command": r["command"],
        }
    return {
        "task": {
            "name": "addition",
            **cfg.data.task_options,
            "split": cfg.data.eval_split,
            "eval_prompts": cfg.data.eval_size,
            "sample_temperature": cfg.trainer.eval_sample_temperature,
        },
        "teacher": {"accuracy": teacher_score["accuracy"], "path": teacher},
        "rows": rows,
        "on_policy_minus_sft_continued_points": 100
        * (rows["on_policy"]["accuracy"] - rows["sft_continued"]["accuracy"]),
    }


def build_report(models, scores, runs, traces, eval_count, task_options) -> dict[str, Any]:
    """SFT's regime: the teacher, the baseline and the distilled students on the demo's task."""
    from transformers import AutoConfig

    def params(path: str) -> int:
        from transformers import AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())

    def entry(name: str) -> dict[str, Any]:
        e = {
            "accuracy": scores[name]["accuracy"],
            "params": params(models[name]),
            "path": models[name],
        }
        if name in runs:
            e["steps"] = runs[name]["steps"]
            e["seconds"] = runs[name]["summary"].get("seconds")  # this run's own training
            e["command"] = runs[name]["command"]
        return e

    teacher = entry("teacher")
    baseline = entry("baseline")
    students = {name: entry(name) for name in METHODS}
    best = max(students, key=lambda n: students[n]["accuracy"])
    best_acc = students[best]["accuracy"]
    return {
        "task": {"name": "addition", **task_options, "eval_prompts": eval_count},
        "teacher": teacher,
        "baseline": baseline,
        "students": students,
        "traces": traces,
        "best": {
            "method": best,
            "accuracy": best_acc,
            "teacher_retention": best_acc / teacher["accuracy"] if teacher["accuracy"] else 0.0,
            "over_baseline_points": 100 * (best_acc - baseline["accuracy"]),
        },
        "targets": {
            "teacher_retention_at_least": 0.9,
            "over_baseline_points_at_least": 15,
            "met": bool(
                teacher["accuracy"]
                and best_acc >= 0.9 * teacher["accuracy"]
                and 100 * (best_acc - baseline["accuracy"]) >= 15
            ),
        },
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def report_table(report: dict[str, Any]) -> str:
    rows = [("teacher", report["teacher"]), ("baseline (answers only)", report["baseline"])]
    rows += [(f"student: {name}", e) for name, e in report["students"].items()]
    teacher_params = report["teacher"]["params"]
    lines = [
        "| model | regime | params | size vs teacher | starts from | train steps | train time "
        "| held-out accuracy |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, e in rows:
        seconds = e.get("seconds")
        lines.append(
            f"| {name} | SFT's | {e['params'] / 1e6:.2f}M "
            f"| {teacher_params / e['params']:.1f}x smaller "
            f"| {'random' if 'steps' in e else '-'} | {e.get('steps', '-')} "
            f"| {f'{seconds:.0f} s' if seconds else '-'} | {_percent(e['accuracy'])} |"
        )
    lines[2] = lines[2].replace("1.0x smaller", "-")
    best = report["best"]
    lines += [
        "",
        f"Best distilled student: **{best['method']}**, {_percent(best['accuracy'])} = "
        f"{100 * best['teacher_retention']:.0f}% of the teacher's accuracy, "
        f"{best['over_baseline_points']:+.1f} points over the answers-only baseline "
        f"(targets: >= 90% and >= +15; {'met' if report['targets']['met'] else 'NOT met'}).",
    ]
    world = report.get("world")
    if world:
        lines += ["", world_table(world)]
    return "\n".join(lines)


def world_table(world: dict[str, Any]) -> str:
    t = world["task"]
    start = world["rows"]["start"]
    lines = [
        "| model | regime | starts from | train steps | train time | greedy "
        f"| T={t['sample_temperature']:g} |",
        "|---|---|---|---:|---:|---:|---:|",
        f"| world teacher | on-policy's | - | - | - | {_percent(world['teacher']['accuracy'])} "
        "| - |",
        f"| world start student | on-policy's | its SFT plateau | - | - "
        f"| {_percent(start['accuracy'])} | {_percent(start['sampled_accuracy'])} |",
    ]
    for method in WORLD_METHODS:
        e = world["rows"][method]
        seconds = e.get("seconds")
        lines.append(
            f"| student: {method} | on-policy's | the start student | {e['steps']} "
            f"| {f'{seconds:.0f} s' if seconds else '-'} | {_percent(e['accuracy'])} "
            f"| {_percent(e['sampled_accuracy'])} |"
        )
    lines += [
        "",
        f"On-policy distillation minus continued SFT, from the same start at the same steps and "
        f"learning rate: {world['on_policy_minus_sft_continued_points']:+.1f} points greedy "
        f"({t['eval_prompts']} {t['split']} prompts of {t.get('digits', '?')}-digit addition, "
        "one seed).",
    ]
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    t = report["task"]
    traces = report["traces"]
    text = [
        "# rayd demo report",
        "",
        "Produced by `make demo` (`rayd demo`). Each table is one world, each the regime of one "
        "method; the rows say which.",
        "",
        f"## SFT's regime: {t.get('digits', '?')}-digit addition, {t['eval_prompts']} held-out "
        "prompts, greedy decoding",
        "",
        REGIMES["sft"],
        "",
        report_table({k: v for k, v in report.items() if k != "world"}),
        "",
        f"Teacher rationales: {traces['samples']} samples for {traces['prompts']} prompts, "
        f"{traces['kept']} kept; dropped: "
        + ", ".join(f"{k} {v}" for k, v in traces["dropped"].items()),
    ]
    if "world" in report:
        text += [
            "",
            "## On-policy distillation's regime: the portable world",
            "",
            REGIMES["on_policy"],
            "",
            world_table(report["world"]),
        ]
    text += ["", "Commands:", ""]
    text += [f"- {name}: `{r['command']}`" for name, r in runs.items()]
    text += ["", "Plots: plots/accuracy.png, plots/learning_curves.png", ""]
    (out / "report.md").write_text("\n".join(text))
    plot_report(out / "plots", report, runs)


def plot_report(folder: Path, report: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names = ["teacher", "baseline", *report["students"]]
    accs = [100 * (report.get(n) or report["students"][n])["accuracy"] for n in names]
    world = report.get("world")
    fig, axes = plt.subplots(1, 2 if world else 1, figsize=(11 if world else 7, 3.5))
    left = axes[0] if world else axes
    left.bar(names, accs, color=["#555555", "#bbbbbb"] + ["#3b7dd8"] * len(report["students"]))
    for i, a in enumerate(accs):
        left.text(i, a + 1, f"{a:.1f}%", ha="center")
    left.set_ylabel("held-out accuracy (%)")
    left.set_ylim(0, 110)
    left.set_title("SFT's regime: greedy")
    if world:
        right = axes[1]
        rows = world["rows"]
        labels = ["start", *WORLD_METHODS]
        for offset, key, label in ((-0.2, "accuracy", "greedy"), (0.2, "sampled_accuracy", "T=1")):
            values = [100 * (rows[n][key] or 0.0) for n in labels]
            right.bar([i + offset for i in range(len(labels))], values, width=0.4, label=label)
        right.set_xticks(range(len(labels)), labels)
        low = min(100 * rows[n]["accuracy"] for n in labels)
        right.set_ylim(max(0.0, low - 5), min(100.0, low + 5))  # the differences are points
        right.set_ylabel("test accuracy (%)")
        right.set_title("On-policy's regime: the portable world")
        right.legend()
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in runs.items():
        if name.startswith("world_"):
            continue  # another task; its curves are the sweeps' (onpolicy-regime.md)
        records = [
            json.loads(line) for line in Path(r["summary"]["metrics"]).read_text().splitlines()
        ]
        train = [x for x in records if "loss" in x]
        left.plot([x["step"] for x in train], [x["loss"] for x in train], label=name)
        evals = [x for x in records if "eval/accuracy" in x]
        right.plot(
            [x["step"] for x in evals],
            [100 * x["eval/accuracy"] for x in evals],
            marker="o",
            label=name,
        )
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("training loss (each method's own)")
    right.set_xlabel("step")
    right.set_ylabel("eval accuracy (%), during training")
    left.set_title("SFT's regime")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(folder / "learning_curves.png", dpi=120)
    plt.close(fig)


def _finished_with(cfg: Any, summary_file: Path) -> bool:
    """A run can be reused when it finished and ran with this very config."""
    import yaml

    saved = cfg.run_dir / "config.yaml"
    if not summary_file.is_file() or not saved.is_file():
        return False
    if json.loads(summary_file.read_text()).get("preempted", True):
        return False
    return yaml.safe_load(saved.read_text()) == cfg.model_dump(mode="json")


class _Stages:
    """`stage(text)` announces a stage (and says how long the one before took); `finish()`
    closes the last one."""

    def __init__(self) -> None:
        self._current: tuple[str, float] | None = None

    def __call__(self, text: str) -> None:
        self.finish()
        print(f"\n== rayd demo: {text}", flush=True)
        self._current = (text.split(" ", 1)[0], time.perf_counter())

    def finish(self) -> None:
        from rayd.progress import duration

        if self._current is not None:
            number, t0 = self._current
            took = duration(time.perf_counter() - t0)
            print(f"rayd demo: stage {number} done in {took}", flush=True)
            self._current = None


def main(argv: list[str] | None = None) -> int:
    from rayd.cli import ArgumentParser, output_folder, positive_int

    parser = ArgumentParser(prog="rayd demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", type=output_folder, help="output folder")
    parser.add_argument(
        "--steps", type=positive_int, default=1000, help="SFT's regime: training steps"
    )
    parser.add_argument(
        "--world-steps",
        type=positive_int,
        default=200,
        help="on-policy's regime: steps of on-policy distillation and continued SFT",
    )
    parser.add_argument(
        "--eval-count", type=positive_int, default=500, help="SFT's regime: held-out prompts"
    )
    args = parser.parse_args(argv)
    from rayd.config import ConfigError

    try:
        report = run_demo(args.out, args.steps, args.world_steps, args.eval_count)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print("\n" + report_table(report))
    print(f"\nrayd demo: report in {args.out}/report.md ({report['seconds']:.0f} s)")
    return 0  # the report says whether the targets were met; the demo itself worked
