"""`rayd demo` (`make demo`): the whole system on the embedded default, in minutes on a CPU.

1. the teacher (tiny:addition-teacher) is trained on gold carry rationales, or reused from cache;
2. it writes rationales for the training prompts (`rayd generate configs/demo/traces.yaml`),
   verified, deduplicated and checked for eval leaks;
3. the student (5.7x smaller) learns from them three ways: rationale SFT (response
   distillation), Distilling Step-by-Step, and on-policy distillation continuing from a short
   rationale SFT (the SFT-then-on-policy recipe);
4. the same student trains on gold answers alone, without a teacher, for as many steps as the
   longest distilled recipe: the baseline;
5. every model is scored on the same held-out prompts (greedy, vLLM) and the report is written:
   runs/demo/report.md, report.json and plots/.
Every run is a plain `rayd train` of configs/demo/student.yaml with the overrides printed.
A finished stage is reused when the demo runs again (delete runs/demo to start over).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "demo"

# Each run: (overrides of configs/demo/student.yaml, the run it continues from). `{traces}` is
# the generated dataset, `{from}` the student of the run it continues from. "warmup" is a short
# rationale SFT that on-policy distillation starts from (a random student samples nothing the
# teacher can correct); it is a stage, not a reported method. From it, on-policy distillation
# and continued SFT train the same number of steps with the same learning-rate schedule: a
# fresh optimizer warms its learning rate up again (CONTINUED), since a full learning rate on
# a fresh Adam state collapsed the warm student in its first step (issue 22).
CONTINUED = [
    "models.student.path={from}",
    "trainer.max_steps={on_policy_steps}",
    "trainer.eval_every=50",
    "learner.optim.lr=1.0e-3",
    "learner.optim.warmup_steps=10",
    "learner.optim.schedule=constant",
]
# The demo's students are 0.14M parameters: their learners sample (no rollout engine to start,
# no weights to sync), and on-policy distillation's teacher scores with transformers; at this
# size an engine's calls cost more than its speed saves (docs/experiments/performance.md).
SMALL = ["rollout.backend=learner"]
METHODS: dict[str, tuple[list[str], str | None]] = {
    "sft": (["algorithm.name=sft", "data.train_dataset={traces}"], None),
    "step_by_step": (
        [
            "algorithm.name=step_by_step",
            "data.train_dataset={traces}",
            "trainer.prompts_per_step=32",
        ],
        None,
    ),
    "warmup": (
        [
            "algorithm.name=sft",
            "data.train_dataset={traces}",
            "trainer.max_steps={warmup_steps}",
            "trainer.eval_every=0",
        ],
        None,
    ),
    "sft_continued": (
        ["algorithm.name=sft", "data.train_dataset={traces}", *CONTINUED],
        "warmup",
    ),
    "on_policy": (
        [
            "algorithm.name=on_policy",
            "algorithm.loss=reverse_kl",
            "teacher.backend=hf",
            *CONTINUED,
        ],
        "warmup",
    ),
}
# What this world can and cannot show, said in the report beside the figures it explains.
REGIME = (
    "Regime: plain addition has one valid rationale per sum, the teacher is nearly deterministic "
    "and its traces are verified, and the student is big enough to learn them: the regime where "
    "SFT on teacher rationales is expected to win, since it already imitates the teacher along "
    "the only path that matters (docs/experiments/rationale-onpolicy-vs-sft.md). On-policy "
    "distillation's regime, a student that SFT leaves below the teacher on a task with several "
    "rationales and repairs, is measured in docs/experiments/plateau.md."
)
STAGES = ("warmup",)  # runs that feed another and are not reported as methods
BASELINE = ["algorithm.name=sft", "data.rationales=false", "models.teacher=null"]


def run_demo(
    out: Path, steps: int, warmup_steps: int, on_policy_steps: int, eval_count: int
) -> dict[str, Any]:
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
    task_options = base_cfg.data.task_options
    # Both configs are read before the teacher is built: a bad one fails in a second.
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
    fills = {
        "traces": traces["dataset"],
        "on_policy_steps": str(on_policy_steps),
        "warmup_steps": str(warmup_steps),
    }
    runs: dict[str, dict[str, Any]] = {}

    def run(name: str, overrides: list[str], total_steps: int) -> None:
        args = [f"name={name}", f"output_dir={out}/{{name}}", f"trainer.max_steps={steps}"]
        args += [o.format(**fills) for o in [*SMALL, *overrides]]
        print("rayd train configs/demo/student.yaml " + " ".join(args), flush=True)
        cfg = load_config(base, args)
        summary_file = cfg.run_dir / "summary.json"
        if _finished_with(cfg, summary_file):
            print(f"rayd demo: {name}: finished before, reused ({summary_file})")
            summary = json.loads(summary_file.read_text())
        else:
            t0 = time.perf_counter()
            summary = train(cfg)
            summary["seconds"] = time.perf_counter() - t0
            summary_file.write_text(json.dumps(summary, indent=2))
            print(f"rayd demo: {name}: trained in {duration(summary['seconds'])}", flush=True)
        runs[name] = {"summary": summary, "steps": total_steps, "overrides": args}

    _stage(
        "3/5 distilled students: rationale SFT, step-by-step; from a short SFT: continued SFT "
        "and on-policy distillation"
    )
    for method, (overrides, parent) in METHODS.items():
        if parent is not None:
            fills["from"] = runs[parent]["summary"]["student"]
        own = warmup_steps if method == "warmup" else on_policy_steps if parent else steps
        run(method, overrides, own + (runs[parent]["steps"] if parent else 0))

    _stage("4/5 baseline: the same student on gold answers alone, no teacher")
    baseline_steps = max(r["steps"] for r in runs.values())
    run("baseline", [*BASELINE, f"trainer.max_steps={baseline_steps}"], baseline_steps)

    _stage(f"5/5 held-out evaluation: {eval_count} eval prompts, greedy decoding (vLLM)")
    split_seed = base_cfg.data.split_seed_for(base_cfg.trainer.seed)
    task = make_task("addition", seed=split_seed, **task_options)
    models = {"teacher": teacher} | {
        name: r["summary"]["student"] for name, r in runs.items() if name not in STAGES
    }
    scores = {}
    for name, path in models.items():
        t0 = time.perf_counter()
        scores[name] = evaluate_model(
            path, task, count=eval_count, max_new_tokens=base_cfg.rollout.max_new_tokens
        )
        took = duration(time.perf_counter() - t0)
        print(f"  {name:<14} accuracy {100 * scores[name]['accuracy']:.1f}% ({took})", flush=True)
    _stage.finish()

    report = build_report(models, scores, runs, traces, eval_count, task_options)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_report(out, report, runs)
    return report


def build_report(models, scores, runs, traces, eval_count, task_options) -> dict[str, Any]:
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
            e["continues_from"] = METHODS.get(name, ([], None))[1]
            e["command"] = "rayd train configs/demo/student.yaml " + " ".join(
                runs[name]["overrides"]
            )
        return e

    teacher = entry("teacher")
    baseline = entry("baseline")
    students = {name: entry(name) for name in METHODS if name not in STAGES}
    best = max(students, key=lambda n: students[n]["accuracy"])
    best_acc = students[best]["accuracy"]
    continued = {n: e for n, e in students.items() if e.get("continues_from")}
    return {
        "task": {"name": "addition", **task_options, "eval_prompts": eval_count},
        # like with like: the rows that continue from the same student, at the same steps
        "from_the_same_start": {
            "start": next(iter(continued.values()))["continues_from"] if continued else None,
            "start_steps": runs["warmup"]["steps"] if "warmup" in runs else 0,
            "rows": {
                n: {"accuracy": e["accuracy"], "seconds": e.get("seconds")}
                for n, e in continued.items()
            },
        },
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


def report_table(report: dict[str, Any]) -> str:
    rows = [("teacher", report["teacher"]), ("baseline (answers only)", report["baseline"])]
    rows += [(f"student: {name}", e) for name, e in report["students"].items()]
    teacher_params = report["teacher"]["params"]
    same = report.get("from_the_same_start", {})
    lines = [
        "| model | params | size vs teacher | starts from | train steps | train time "
        "| held-out accuracy |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, e in rows:
        start = e.get("continues_from")
        start_text = f"{start} ({same.get('start_steps', '?')} SFT steps)" if start else "random"
        seconds = e.get("seconds")
        lines.append(
            f"| {name} | {e['params'] / 1e6:.2f}M | {teacher_params / e['params']:.1f}x smaller "
            f"| {start_text if 'steps' in e else '-'} | {e.get('steps', '-')} "
            f"| {f'{seconds:.0f} s' if seconds else '-'} | {100 * e['accuracy']:.1f}% |"
        )
    lines[2] = lines[2].replace("1.0x smaller", "-")
    best = report["best"]
    lines += [
        "",
        f"Best distilled student: **{best['method']}**, {100 * best['accuracy']:.1f}% = "
        f"{100 * best['teacher_retention']:.0f}% of the teacher's accuracy, "
        f"{best['over_baseline_points']:+.1f} points over the answers-only baseline "
        f"(targets: >= 90% and >= +15; {'met' if report['targets']['met'] else 'NOT met'}).",
    ]
    if same.get("rows"):
        compared = ", ".join(
            f"{n} {100 * r['accuracy']:.1f}%"
            + (f" in {r['seconds']:.0f} s" if r.get("seconds") else "")
            for n, r in same["rows"].items()
        )
        lines.append(
            f"From the same start ({same['start']}, {same['start_steps']} rationale SFT steps), "
            f"the same number of steps and learning-rate schedule: {compared} (train time is "
            "each run's own, start-up included)."
        )
    return "\n".join(lines)


def write_report(out: Path, report: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = report_table(report)
    t = report["task"]
    traces = report["traces"]
    text = [
        "# rayd demo report",
        "",
        f"Task: {t.get('digits', '?')}-digit addition, {t['eval_prompts']} held-out prompts, "
        "greedy decoding. Produced by `make demo` (`rayd demo`).",
        "",
        table,
        "",
        REGIME,
        "",
        f"Teacher rationales: {traces['samples']} samples for {traces['prompts']} prompts, "
        f"{traces['kept']} kept; dropped: "
        + ", ".join(f"{k} {v}" for k, v in traces["dropped"].items()),
        "",
        "Commands:",
        "",
    ]
    for name, r in runs.items():
        parent = METHODS.get(name, ([], None))[1]
        after = f" (continues from {parent})" if parent else ""
        text.append(
            f"- {name}{after}: `rayd train configs/demo/student.yaml {' '.join(r['overrides'])}`"
        )
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
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, accs, color=["#555555", "#bbbbbb"] + ["#3b7dd8"] * len(report["students"]))
    for i, a in enumerate(accs):
        ax.text(i, a + 1, f"{a:.1f}%", ha="center")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 110)
    ax.set_title("Teacher, answers-only baseline and distilled students")
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in runs.items():
        records = [
            json.loads(line) for line in Path(r["summary"]["metrics"]).read_text().splitlines()
        ]
        parent = METHODS.get(name, ([], None))[1]
        offset = runs[parent]["steps"] if parent else 0  # it continues from that student
        train = [x for x in records if "loss" in x]
        left.plot([offset + x["step"] for x in train], [x["loss"] for x in train], label=name)
        evals = [x for x in records if "eval/accuracy" in x]
        right.plot(
            [offset + x["step"] for x in evals],
            [100 * x["eval/accuracy"] for x in evals],
            marker="o",
            label=name,
        )
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("training loss (each method's own)")
    right.set_xlabel("step")
    right.set_ylabel("eval accuracy (%), during training")
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
    parser.add_argument("--steps", type=positive_int, default=1000, help="offline training steps")
    parser.add_argument(
        "--warmup-steps", type=positive_int, default=300, help="SFT before on-policy"
    )
    parser.add_argument("--on-policy-steps", type=positive_int, default=150)
    parser.add_argument("--eval-count", type=positive_int, default=500, help="held-out prompts")
    args = parser.parse_args(argv)
    from rayd.config import ConfigError

    try:
        report = run_demo(
            args.out, args.steps, args.warmup_steps, args.on_policy_steps, args.eval_count
        )
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print("\n" + report_table(report))
    print(f"\nrayd demo: report in {args.out}/report.md ({report['seconds']:.0f} s)")
    return 0  # the report says whether the targets were met; the demo itself worked
