"""Make and measure the portable world (rayd/world.py, docs/experiments/world.md): a measurement
script beside the benches, not a `rayd bench` section.

    python -m rayd.commands.bench.world plateau --arch 1,64,2 [--steps 8000 --every 1000]
    python -m rayd.commands.bench.world build --arch 1,64,2 --steps N
    python -m rayd.commands.bench.world measure [--count 2000] [--json out.json]
    python -m rayd.commands.bench.world students RUN/student ... [--json out.json]
    python -m rayd.commands.bench.world newtask --lr 1e-3 --steps 400 --every 100
    python -m rayd.commands.bench.world build-subtraction
    python -m rayd.commands.bench.world forgetting RUN/student ... [--json out.json]

One process, plain transformers, no Ray.
- `plateau`: a student of the given shape (layers, hidden, heads) trained by rationale SFT on
  fresh clean traces (each prompt once), its greedy accuracy on the validation split every
  `--every` steps: how the start student's shape and budget were chosen.
- `build`: the teacher from its recipe (tiny:world-teacher-recipe) and the student from the
  chosen shape and budget, copied into rayd/worlds/addition/ with MANIFEST.json (each file's
  sha256, the recipes, the machine). Run once; the results are committed, never rebuilt by runs.
- `measure`: the world's preconditions on the shipped files: teacher and student accuracy
  (greedy and temperature 1) on the test split, the teacher's greedy traces against the gold
  ones, and the teacher's repairs from the student's own first errors, by kind.
- `students`: trained students' test accuracy and how often their samples repair (the marker).
- `newtask`: the start student taught the new task (subtraction) by SFT on its gold traces, its
  validation accuracy on both tasks every `--every` steps: how the forgetting sweep's budget was
  chosen. `build-subtraction` adds the new task's teacher (tiny:world-subtraction-teacher-recipe)
  to the world, leaving the other files as they were; `forgetting` measures trained students on
  the test split of both tasks.

The student's SFT traces are the gold clean rationales of training prompts past the first
20000 of the train stream: a run's `data.train_size` (at most 20000) draws its prompts from the
start of that stream, so continued SFT and on-policy runs see prompts the student never trained
on. Gold traces stand in for the teacher's own greedy traces because the two are the same text
(`measure` reports the share that agree).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rayd.commands.bench import machine_info
from rayd.commands.bench.regimes import _accuracy, _load, generate, next_token_probs
from rayd.tasks import AdditionTask, SubtractionTask, make_task
from rayd.tasks.arithmetic import REPAIR_MARKER
from rayd.tasks.base import Example
from rayd.world import MANIFEST, TASK_OPTIONS, WORLD_DIR, digests, shipped
from rayd.zoo import PRESETS, resolve_model_path

RESERVED = 20000  # the head of the train stream, left to the runs (see the module's docstring)
TEACHER_RECIPE = "world-teacher-recipe"
CHECK_PROMPTS = 200
KINDS = ("operand", "carry", "total", "format", "answer", "stopped")


def _subtraction() -> SubtractionTask:
    task = make_task("subtraction", **TASK_OPTIONS)
    assert isinstance(task, SubtractionTask)
    return task


def _task() -> AdditionTask:
    task = make_task("addition", **TASK_OPTIONS)
    assert isinstance(task, AdditionTask)
    return task


def _arch(text: str) -> dict[str, int]:
    layers, hidden, heads = (int(x) for x in text.split(","))
    return {"layers": layers, "hidden": hidden, "heads": heads}


def accuracy(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    temperature: float = 0.0,
    task: AdditionTask | None = None,
):
    completions = generate(
        model, tokenizer, [e.prompt for e in examples], temperature=temperature, seed=1
    )
    return _accuracy(task or _task(), examples, completions), completions


def train_student(out: Path, arch: dict[str, int], steps: int, every: int = 0, count: int = 500):
    """A student of shape `arch` trained in `out` by SFT on fresh clean traces; returns its
    validation accuracy curve [(step, greedy accuracy)] when `every` is set."""
    from rayd.models import build_tiny_llama
    from rayd.pretrain import train_on_examples

    task = _task()
    batch = 64
    traces = task.examples("train", RESERVED + steps * batch)[RESERVED:]
    validation = task.examples("validation", count)
    build_tiny_llama(out, seed=0, **arch)
    tokenizer = _load(str(out))[1]
    curve: list[tuple[int, float]] = []

    def record(step: int, model: Any) -> None:
        acc, _ = accuracy(model, tokenizer, validation)
        curve.append((step, acc))
        print(f"  step {step}: validation greedy accuracy {acc:.3f}", flush=True)

    train_on_examples(
        out,
        traces,
        steps=steps,
        batch_size=batch,
        lr=3e-3,
        seed=0,
        once=True,
        every=every,
        on_every=record if every else None,
        progress="student SFT",
    )
    return curve


def first_error(completion: str, gold: str) -> tuple[int, str]:
    """Where `completion` first leaves `gold` (both completions of one prompt) and the kind of
    character it should have written there."""
    at = next((i for i, (c, g) in enumerate(zip(completion, gold, strict=False)) if c != g), None)
    if at is None:
        return min(len(completion), len(gold)), "stopped"  # one is a prefix of the other
    if at >= gold.index("A="):
        return at, "answer"
    step_start = gold.rfind(";", 0, at) + 1
    offset = at - step_start
    if gold[at] in "+=;":
        return at, "format"
    if offset in (0, 2):
        return at, "operand"
    if offset == 4:
        return at, "carry"
    return at, "total"


def repairs(teacher: Any, tokenizer: Any, states: list[tuple[Example, str]]) -> dict[str, Any]:
    """The teacher's answer to each wrong state (a prompt and the student's completion up to
    and including its first wrong character): P(marker) next, whether its greedy next tokens
    are the marker and the right character, and whether it then reaches the right answer."""
    task = _task()
    by_kind: dict[str, dict[str, Any]] = {
        k: {"n": 0, "p_marker": 0.0, "repaired": 0, "correct": 0} for k in KINDS
    }
    rows = []
    for ex, completion in states:
        at, kind = first_error(completion, ex.completion)
        if kind == "stopped":
            by_kind[kind]["n"] += 1
            continue
        rows.append((ex, completion[: at + 1], ex.completion[at], kind))
    prefixes = [ex.prompt + head for ex, head, _, _ in rows]
    p_marker = next_token_probs(teacher, tokenizer, prefixes)[
        :, tokenizer.convert_tokens_to_ids(REPAIR_MARKER)
    ]
    continuations = generate(teacher, tokenizer, prefixes)
    for (ex, head, right, kind), p, cont in zip(rows, p_marker, continuations, strict=True):
        cell = by_kind[kind]
        cell["n"] += 1
        cell["p_marker"] += float(p)
        cell["repaired"] += cont.startswith(REPAIR_MARKER + right)
        cell["correct"] += task.is_correct(head + cont, ex.answer)
    for cell in by_kind.values():
        n = max(cell["n"], 1)
        cell["p_marker"] = round(cell["p_marker"] / n, 4)
        cell["repaired"] = round(cell["repaired"] / n, 4)
        cell["correct"] = round(cell["correct"] / n, 4)
    return by_kind


def injected_states(examples: Sequence[Example], seed: int = 0) -> list[tuple[Example, str]]:
    """For each example and each slip kind, its gold completion cut after one digit written
    wrong: a random column step, a random place of that kind, a random other digit. The
    student's own states hold few carry or total slips; these measure the teacher on each."""
    import random

    from rayd.tasks.arithmetic import SLIP_KINDS

    rng = random.Random(seed)
    out = []
    for ex in examples:
        steps = ex.rationale.split(";")[:-1]
        for kind in SLIP_KINDS:
            col = rng.randrange(len(steps))
            start = sum(len(s) + 1 for s in steps[:col])
            step = steps[col]
            total_at = step.index("=") + 1
            offset = {"operand": rng.choice((0, 2)), "carry": 4}.get(
                kind, rng.randrange(total_at, len(step))
            )
            at = start + offset
            wrong = rng.choice([d for d in "0123456789" if d != ex.completion[at]])
            out.append((ex, ex.completion[:at] + wrong))
    return out


def measure(count: int) -> dict[str, Any]:
    task = _task()
    test = task.examples("test", count)
    validation = task.examples("validation", count)
    teacher, tokenizer = _load(shipped("teacher"))
    student, _ = _load(shipped("student"))
    out: dict[str, Any] = {"count": count, "split": "test"}
    for name, model in (("teacher", teacher), ("student", student)):
        greedy, completions = accuracy(model, tokenizer, test)
        sampled, samples = accuracy(model, tokenizer, test, temperature=1.0)
        out[name] = {
            "greedy": greedy,
            "temperature_1": sampled,
            "greedy_equal_to_gold": sum(
                c == e.completion for c, e in zip(completions, test, strict=True)
            )
            / count,
            "samples_with_marker": sum(REPAIR_MARKER in s for s in samples) / count,
        }
    # The student's own states: one temperature-1 sample per validation prompt, cut after its
    # first wrong character.
    _, samples = accuracy(student, tokenizer, validation, temperature=1.0)
    wrong = [(e, s) for e, s in zip(validation, samples, strict=True) if s != e.completion]
    out["repairs"] = {"states": len(wrong), "of": count, "split": "validation"}
    out["repairs"]["by_kind"] = repairs(teacher, tokenizer, wrong)
    injected = injected_states(validation[: count // 4])
    out["injected"] = {"states": len(injected), "split": "validation"}
    out["injected"]["by_kind"] = {
        k: v for k, v in repairs(teacher, tokenizer, injected).items() if v["n"]
    }
    return out


def check(folder: Path, prompts: int = CHECK_PROMPTS) -> dict[str, int]:
    """Greedy right answers of each model in `folder` on the first test prompts: what
    tests/unit/test_world.py checks another machine against."""
    test = _task().examples("test", prompts)
    out: dict[str, int] = {"prompts": prompts}
    for role in ("teacher", "student"):
        model, tokenizer = _load(str(folder / role))
        out[f"{role}_greedy_right"] = round(accuracy(model, tokenizer, test)[0] * prompts)
    return out


def students(folders: Sequence[Path], count: int) -> dict[str, Any]:
    """Each trained student's test accuracy (greedy, temperature 1) and how often its
    temperature-1 samples repair (write the marker), and repair into a right answer."""
    task = _task()
    test = task.examples("test", count)
    out: dict[str, Any] = {}
    for folder in folders:
        model, tokenizer = _load(str(folder))
        greedy, _ = accuracy(model, tokenizer, test)
        sampled, samples = accuracy(model, tokenizer, test, temperature=1.0)
        marked = [(s, e) for s, e in zip(samples, test, strict=True) if REPAIR_MARKER in s]
        out[str(folder)] = {
            "greedy": greedy,
            "temperature_1": sampled,
            "samples_with_marker": len(marked) / count,
            "marked_and_right": sum(task.is_correct(s, e.answer) for s, e in marked) / count,
        }
    return out


def newtask(out: Path, lr: float, steps: int, every: int, count: int = 500) -> list[dict]:
    """The shipped student taught subtraction in `out` by SFT on fresh gold traces; its
    validation greedy accuracy on subtraction (new) and addition (old) every `every` steps."""
    from rayd.pretrain import train_on_examples

    old, new = _task(), _subtraction()
    shutil.copytree(shipped("student"), out)
    start, tokenizer = _load(str(out))
    traces = new.examples("train", RESERVED + steps * 64)[RESERVED:]
    checks = {"new": new.examples("validation", count), "old": old.examples("validation", count)}
    tasks = {"new": new, "old": old}
    curve: list[dict] = []

    def record(step: int, model: Any) -> None:
        row = {"step": step}
        for name, examples in checks.items():
            row[name] = accuracy(model, tokenizer, examples, task=tasks[name])[0]
        curve.append(row)
        print(f"  {row}", flush=True)

    # SDFT's teacher at the start: the student shown the gold completion (the config's default
    # teacher.prompt_template), asked the same prompt.
    shown = [Example(f"{e.prompt}\n\n{e.completion}", e.rationale, e.answer) for e in checks["new"]]
    privileged = accuracy(start, tokenizer, shown, task=new)[0]
    record(0, start)
    curve[0]["new_privileged_self"] = privileged
    print(f"  start, shown the gold completion: {privileged:.3f} on the new task", flush=True)
    train_on_examples(
        out,
        traces,
        steps=steps,
        batch_size=64,
        lr=lr,
        seed=0,
        once=True,
        every=every,
        on_every=record,
        progress="new-task SFT",
    )
    return curve


def forgetting(folders: Sequence[Path], count: int) -> dict[str, Any]:
    """Each trained student's test accuracy (greedy, temperature 1) on the new task
    (subtraction) and the old one (addition)."""
    tasks = {"new": _subtraction(), "old": _task()}
    tests = {name: task.examples("test", count) for name, task in tasks.items()}
    out: dict[str, Any] = {}
    for folder in folders:
        model, tokenizer = _load(str(folder))
        row: dict[str, float] = {}
        for name, task in tasks.items():
            for label, temperature in (("greedy", 0.0), ("temperature_1", 1.0)):
                row[f"{name}_{label}"] = accuracy(
                    model, tokenizer, tests[name], temperature, task=task
                )[0]
        out[str(folder)] = row
        print(f"  {folder}: {row}", flush=True)
    return out


def forgetting_table(results: dict[str, Any], baseline: str) -> str:
    """A markdown table of `forgetting`'s results for sweep cells named METHOD-seed=N: each
    method's mean ± std, and minus `baseline` paired by seed with its 95% t-interval, in points."""
    from rayd.commands.ablate.report import paired_by_seed

    metrics = ["new_greedy", "new_temperature_1", "old_greedy", "old_temperature_1"]
    return paired_by_seed(results, baseline, {m: 100.0 for m in metrics})


def build_subtraction() -> None:
    """Add the new task's teacher to the shipped world; the other files stay as they were."""
    started = time.monotonic()
    role = "subtraction-teacher"
    built = Path(resolve_model_path(f"tiny:world-{role}-recipe"))
    shutil.rmtree(WORLD_DIR / role, ignore_errors=True)
    shutil.copytree(built, WORLD_DIR / role)
    record = json.loads(MANIFEST.read_text())
    model, tokenizer = _load(str(WORLD_DIR / role))
    task = _subtraction()
    test = task.examples("test", CHECK_PROMPTS)
    record[role] = {
        "task": "subtraction",
        "recipe": PRESETS[f"world-{role}-recipe"],
        "files": digests(WORLD_DIR / role),
        "check": {
            "prompts": CHECK_PROMPTS,
            "greedy_right": round(accuracy(model, tokenizer, test, task=task)[0] * CHECK_PROMPTS),
        },
        "built_on": machine_info()["cpu"],
        "built_s": round(time.monotonic() - started),
    }
    MANIFEST.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{role} written to {WORLD_DIR / role}", flush=True)


def build(arch: dict[str, int], steps: int) -> None:
    started = time.monotonic()
    teacher = Path(resolve_model_path(f"tiny:{TEACHER_RECIPE}"))
    staging = WORLD_DIR.parent / ".world-staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(teacher, staging / "teacher")
    train_student(staging / "student", arch, steps)
    record = {
        "task_options": TASK_OPTIONS,
        "teacher": {"recipe": PRESETS[TEACHER_RECIPE], "files": digests(staging / "teacher")},
        "student": {
            "recipe": {
                "arch": arch,
                "sft": {
                    "steps": steps,
                    "batch_size": 64,
                    "lr": 3e-3,
                    "traces": f"gold clean, train stream [{RESERVED}:], each once",
                },
            },
            "files": digests(staging / "student"),
        },
        "check": check(staging),
        "built_on": machine_info()["cpu"],
        "built_s": round(time.monotonic() - started),
    }
    (staging / MANIFEST.name).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(WORLD_DIR, ignore_errors=True)
    staging.rename(WORLD_DIR)
    print(f"world written to {WORLD_DIR}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rayd.commands.bench.world")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("plateau")
    p.add_argument("--arch", type=_arch, required=True, help="layers,hidden,heads")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--every", type=int, default=1000)
    p.add_argument("--json", type=Path)
    b = sub.add_parser("build")
    b.add_argument("--arch", type=_arch, required=True)
    b.add_argument("--steps", type=int, required=True)
    m = sub.add_parser("measure")
    m.add_argument("--count", type=int, default=2000)
    m.add_argument("--json", type=Path)
    t = sub.add_parser("students")
    t.add_argument("folders", type=Path, nargs="+", help="trained students (a run's student/)")
    t.add_argument("--count", type=int, default=2000)
    t.add_argument("--json", type=Path)
    n = sub.add_parser("newtask")
    n.add_argument("--lr", type=float, default=1e-3)
    n.add_argument("--steps", type=int, default=400)
    n.add_argument("--every", type=int, default=100)
    n.add_argument("--json", type=Path)
    sub.add_parser("build-subtraction")
    f = sub.add_parser("forgetting")
    f.add_argument("folders", type=Path, nargs="+", help="trained students (a run's student/)")
    f.add_argument("--count", type=int, default=2000)
    f.add_argument("--json", type=Path)
    f.add_argument("--baseline", help="sweep cells: the method the others are paired against")
    args = parser.parse_args(argv)
    if args.what == "plateau":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            curve = train_student(Path(tmp) / "student", args.arch, args.steps, args.every)
        result: dict[str, Any] = {
            "arch": args.arch,
            "curve": curve,
            "wall_s": round(time.monotonic() - started),
        }
    elif args.what == "build":
        build(args.arch, args.steps)
        return 0
    elif args.what == "build-subtraction":
        build_subtraction()
        return 0
    elif args.what == "newtask":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            started = time.monotonic()
            curve = newtask(Path(tmp) / "student", args.lr, args.steps, args.every)
        result = {"lr": args.lr, "curve": curve, "wall_s": round(time.monotonic() - started)}
    elif args.what == "forgetting":
        result = forgetting(args.folders, args.count)
        if args.baseline:
            print(forgetting_table(result, args.baseline))
    elif args.what == "students":
        result = students(args.folders, args.count)
    else:
        result = measure(args.count)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
