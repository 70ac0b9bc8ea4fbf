"""`rayd eval PATH`: greedy accuracy, sampled accuracy and pass@k of a checkpoint on a task's
eval split.

What it takes (the same as `rayd export`):
- a run folder (`config.yaml` + `student/`): the run's final student, evaluated the way the run
  evaluated it: its task and options, prompt format (`data.chat_template`), eval split
  (`data.eval_size`, `data.split_seed` or else `trainer.seed`), `rollout.max_new_tokens` and
  `max_model_len`, so `rayd eval RUN` reproduces the run's final held-out accuracy (summary.json);
- a model folder (`config.json`): `RUN/student` counts as its run; a `rayd export` folder carries
  the same settings in `rayd_export.json`; any other model needs `--task`.
Flags override what the run says; the first line printed says where each setting came from.
`--temperature T` adds the accuracy of one draw per prompt at T (with `--pass-k`: the draws'
temperature, 1.0 when not given); draws are seeded by the split seed (`--seed`).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rayd.tasks.base import Task

EXPORT_RECORD = "rayd_export.json"  # written by `rayd export`; its "eval" entry is read here
# What a setting is when neither the run nor a flag says (a plain model folder)
DEFAULTS: dict[str, Any] = {
    "count": 200,
    "split": "eval",
    "chat_template": "auto",
    "max_new_tokens": 64,
    "seed": 0,
    "backend": "vllm",
    "long_prompts": "error",
    "dtype": "auto",
}


class TargetError(ValueError):
    """A folder that is neither a run nor a model (one line, exit 2)."""


@dataclass(frozen=True)
class Target:
    """What PATH names (a run or a model folder)."""

    model: Path | None  # the Hugging Face folder (None: a run that did not finish)
    run: Path | None  # the run folder, when known
    settings: dict[str, Any] = field(default_factory=dict)  # eval settings it carries
    origin: str | None = None  # where they came from: "run RUN" or "export DIR"


def run_settings(cfg: Any) -> dict[str, Any]:
    """How a run evaluates its student (rayd.evaluate.heldout_metrics over
    rayd.data.prompts.load_prompts' eval split), as plain values."""
    source = cfg.data.source
    return {
        "task": source.removeprefix("task:") if source.startswith("task:") else None,
        "data_source": source,
        "options": dict(cfg.data.task_options),
        "seed": cfg.data.split_seed_for(cfg.trainer.seed),
        "count": cfg.data.eval_size,
        "split": cfg.data.eval_split,
        "chat_template": cfg.data.chat_template,
        "max_new_tokens": cfg.rollout.max_new_tokens,
        "max_model_len": cfg.rollout.max_model_len,
        "long_prompts": cfg.data.long_prompts,
        # rollout.backend=learner sampled with transformers generate inside the learners
        "backend": "hf" if cfg.rollout.backend == "learner" else cfg.rollout.backend,
        "dtype": cfg.models.student.dtype,
    }


def load_run_config(run: Path, who: str) -> Any:
    from rayd.config import ConfigError, load_config

    try:
        return load_config(run / "config.yaml")
    except ConfigError as exc:
        raise TargetError(f"{who}: {run}/config.yaml no longer loads ({exc})") from None


def resolve_target(path: Path, who: str) -> Target:
    """A run folder (config.yaml; student/ when it finished) or a model folder (config.json;
    RUN/student belongs to RUN; a `rayd export` folder carries its eval settings)."""
    if not path.exists():
        raise TargetError(f"{who}: {str(path)!r} does not exist (give a run or model folder)")
    if (path / "config.yaml").is_file():
        cfg = load_run_config(path, who)
        student = path / "student"
        model = student if (student / "config.json").is_file() else None
        return Target(model, path, run_settings(cfg), f"run {path}")
    if (path / "config.json").is_file():
        parent = path.resolve().parent
        if path.resolve().name == "student" and (parent / "config.yaml").is_file():
            cfg = load_run_config(path.parent, who)
            return Target(path, path.parent, run_settings(cfg), f"run {path.parent}")
        record = path / EXPORT_RECORD
        if record.is_file():
            import json

            try:
                settings = json.loads(record.read_text())["eval"]
            except (ValueError, KeyError, TypeError):
                raise TargetError(
                    f"{who}: {record} has no eval settings (exported by an older rayd?); "
                    "give --task"
                ) from None
            return Target(path, None, settings, f"export {path}")
        return Target(path, None)
    raise TargetError(
        f"{who}: {str(path)!r} is neither a run folder (config.yaml) nor a model folder "
        "(config.json)"
    )


def _parse_options(items: list[str]) -> dict[str, Any]:
    import yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TargetError(f"rayd eval: --option {item!r}: expected key=value (e.g. digits=3)")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise TargetError(f"rayd eval: --option {item!r}: the value is not YAML") from None
    return options


def _parse_ks(text: str) -> tuple[int, ...]:
    ks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise TargetError(
                f"rayd eval: --pass-k {text!r}: expected positive integers separated by commas "
                "(e.g. 1,4)"
            )
        ks.append(int(part))
    if text.strip() and not ks:
        raise TargetError(f"rayd eval: --pass-k {text!r}: no k given (e.g. 1,4)")
    return tuple(sorted(set(ks)))


def settle(target: Target, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """(settings, where each came from: "flag", the target's origin, or "default")."""
    known = target.settings
    settings: dict[str, Any] = {}
    where: dict[str, str] = {}
    flag_task = args.task
    if flag_task is not None:
        settings["task"], where["task"] = flag_task, "flag"
    elif known.get("task"):
        settings["task"], where["task"] = known["task"], target.origin or "default"
    elif target.origin is not None:  # a run on a JSONL / hub source: no verifier to score with
        raise TargetError(
            f"rayd eval: --task: the run's data.source {known.get('data_source')!r} is not a task "
            "with an answer verifier; give --task (and --option)"
        )
    else:
        raise TargetError(
            f"rayd eval: --task: {str(target.model)!r} is a plain model folder (not a run or a "
            "rayd export), so it says no task; give --task (and --option)"
        )
    # The run's options belong to the run's task; --option keys override them one by one.
    options: dict[str, Any] = {}
    options_from = "default"
    if target.origin is not None and settings["task"] == known.get("task"):
        options, options_from = dict(known.get("options") or {}), target.origin
    flag_options = _parse_options(args.option)
    if flag_options:
        options_from = "flag" if options_from == "default" else f"{options_from} + flag"
        options.update(flag_options)
    settings["options"], where["options"] = options, options_from
    for key in ("count", "split", "seed", "chat_template", "max_new_tokens", "backend"):
        value = getattr(args, key)
        if value is not None:
            settings[key], where[key] = value, "flag"
        elif key in known:
            settings[key], where[key] = known[key], target.origin or "default"
        else:
            settings[key], where[key] = DEFAULTS[key], "default"
    for key in ("max_model_len", "long_prompts", "dtype"):  # no flag: the run's or the default
        settings[key] = known.get(key, DEFAULTS.get(key))
        where[key] = target.origin if key in known and target.origin else "default"
    limit = settings["max_model_len"]
    if limit is not None and settings["max_new_tokens"] >= limit:
        raise TargetError(
            f"rayd eval: --max-new-tokens {settings['max_new_tokens']}: must be smaller than the "
            f"run's rollout.max_model_len={limit}"
        )
    return settings, where


def describe(settings: dict[str, Any], where: dict[str, str]) -> str:
    """One line: each setting with where it came from."""
    shown = {
        "task": settings["task"],
        "options": ",".join(f"{k}={v}" for k, v in settings["options"].items()) or "(none)",
        "count": settings["count"],
        "split": settings["split"],
        "chat_template": settings["chat_template"],
        "max_new_tokens": settings["max_new_tokens"],
        "seed": settings["seed"],
        "backend": settings["backend"],
    }
    groups: dict[str, list[str]] = {}
    for key, value in shown.items():
        groups.setdefault(where[key], []).append(f"{key}={value}")
    order = sorted(groups, key=lambda w: (w == "default", w == "flag", w))
    label = {"flag": "from flags", "default": "defaults"}
    return "rayd eval: " + "; ".join(
        f"{label.get(w, 'from ' + w)}: {' '.join(groups[w])}" for w in order
    )


def _parser() -> argparse.ArgumentParser:
    from rayd.cli import ArgumentParser, positive_int

    parser = ArgumentParser(
        prog="rayd eval",
        description="Greedy accuracy, sampled accuracy (--temperature) and pass@k of a run's "
        "student (or any model folder) on a task's eval split. Given a run (or RUN/student, "
        "or a rayd export), the task, its options, the prompt format, the eval split and "
        "max_new_tokens are the run's; flags override them.",
    )
    parser.add_argument(
        "target",
        metavar="PATH",
        type=Path,
        help="a run folder (runs/X: config.yaml + student/), a model folder (runs/X/student, "
        "a rayd export, any Hugging Face checkpoint)",
    )
    parser.add_argument("--task", help="task name (addition, jsonl); default: the run's")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="task option (e.g. digits=3), over the run's task_options; repeatable",
    )
    parser.add_argument(
        "--count", type=positive_int, help="eval-split prompts (default: the run's data.eval_size)"
    )
    parser.add_argument("--pass-k", default="", help="comma-separated k for pass@k, e.g. 1,4")
    parser.add_argument(
        "--samples", type=positive_int, default=0, help="draws per prompt for pass@k (>= max k)"
    )
    parser.add_argument(
        "--temperature",
        type=_positive_float,
        help="without --pass-k: also the accuracy of one draw per prompt at this temperature "
        "(seeded by --seed); with --pass-k: the draws' temperature (default 1.0)",
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, help="default: the run's rollout.max_new_tokens"
    )
    parser.add_argument("--backend", choices=("vllm", "hf"), help="default: the run's")
    parser.add_argument(
        "--split",
        choices=("eval", "validation", "test"),
        help="the held-out split (default: the run's data.eval_split, else eval)",
    )
    parser.add_argument("--seed", type=int, help="the task's split seed (default: the run's)")
    parser.add_argument(
        "--chat-template",
        choices=("auto", "never"),
        help="auto: prompts in the model's chat template when it has one (default: the run's "
        "data.chat_template)",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default: MODEL/eval-TASK.json)")
    return parser


@dataclass(frozen=True)
class _Request:
    """`rayd eval`'s checked command line: what to evaluate, how, and where it came from."""

    target: Target
    ks: tuple[int, ...]
    settings: dict[str, Any]
    where: dict[str, str]
    task: Task
    temperature: float | None  # None: greedy accuracy alone (no --pass-k, no --temperature)


def _checked(args: argparse.Namespace) -> _Request:
    """The command line against the target it names; TargetError (one line) when it does not
    fit."""
    target = resolve_target(args.target, "rayd eval: PATH")
    if target.model is None:
        raise TargetError(
            f"rayd eval: PATH: the run {str(target.run)!r} has no student/ (it did not "
            "finish); export its newest checkpoint (rayd export RUN --out DIR), then "
            "evaluate DIR"
        )
    ks = _parse_ks(args.pass_k)
    if args.samples and not ks:
        raise TargetError("rayd eval: --samples: draws for pass@k; give --pass-k too")
    if ks and args.samples and args.samples < max(ks):
        raise TargetError(
            f"rayd eval: --samples {args.samples}: pass@{max(ks)} needs at least "
            f"{max(ks)} draws per prompt"
        )
    settings, where = settle(target, args)
    if args.out is not None and args.out.is_dir():
        raise TargetError(f"rayd eval: --out {str(args.out)!r} is a folder; give a file")
    # pass@k has always drawn at 1.0 when not told; plain `rayd eval` stays greedy alone.
    temperature = 1.0 if ks and args.temperature is None else args.temperature
    task = _make_task(settings)
    try:
        task.examples(settings["split"], 1)
    except ValueError as exc:  # a task with no validation/test halves (jsonl)
        raise TargetError(f"rayd eval: --split {settings['split']!r}: {exc}") from None
    return _Request(target, ks, settings, where, task, temperature)


def main(argv: list[str] | None = None) -> int:
    import json

    args = _parser().parse_args(argv)
    try:
        request = _checked(args)
    except TargetError as exc:
        print(exc, file=sys.stderr)
        return 2
    target, settings, where = request.target, request.settings, request.where
    print(describe(settings, where), flush=True)
    from rayd.evaluate import evaluate_model  # Ray, torch and the engines: after the checks

    assert target.model is not None  # _checked refused a run without student/
    model = str(target.model)
    result = evaluate_model(
        model,
        request.task,
        count=settings["count"],
        split=settings["split"],
        ks=request.ks,
        samples=args.samples,
        temperature=request.temperature,
        max_new_tokens=settings["max_new_tokens"],
        backend=settings["backend"],
        max_model_len=settings["max_model_len"],
        seed=settings["seed"],
        chat_template=settings["chat_template"] == "auto",
        long_prompts=settings["long_prompts"],
        dtype=settings["dtype"],
    )
    result["task"] = {"name": settings["task"], **settings["options"]}
    result["settings"] = {k: {"value": settings[k], "from": where[k]} for k in where}
    run_accuracy = _run_accuracy(target, settings)
    if run_accuracy is not None:
        result["run_final_accuracy"] = run_accuracy
    out = args.out or target.model / f"eval-{settings['task']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _print_result(model, result, run_accuracy, settings["seed"])
    print(f"rayd eval: written {out}")
    return 0


def _print_result(
    model: str, result: dict[str, Any], run_accuracy: float | None, seed: int
) -> None:
    metrics = [k for k in result if k == "accuracy" or k.startswith("pass@")]
    metrics += ["sampled_accuracy"] if "sampled_accuracy" in result else []
    names = {"accuracy": "accuracy", "sampled_accuracy": "sampled"}
    print(f"{'model':<40} {'prompts':>8} " + " ".join(f"{names.get(m, m):>9}" for m in metrics))
    print(
        f"{model[-40:]:<40} {result['prompts']:>8} "
        + " ".join(f"{100 * result[m]:>8.1f}%" for m in metrics)
    )
    if "temperature" in result:
        what = "sampled" if "sampled_accuracy" in result else "pass@k"
        draws = result.get("samples_per_prompt", 1)
        print(
            f"rayd eval: accuracy is greedy; {what}: {draws} draw{'s' * (draws > 1)} per prompt "
            f"at temperature {result['temperature']:g}, seed {seed} (--seed)"
        )
    if run_accuracy is not None:
        print(
            f"rayd eval: the run's own final held-out accuracy (summary.json): "
            f"{100 * run_accuracy:.1f}%"
        )


def _make_task(settings: dict[str, Any]) -> Task:
    import inspect

    from rayd.tasks import TASKS, make_task

    name, options = settings["task"], settings["options"]
    if name not in TASKS:
        raise TargetError(f"rayd eval: --task {name!r}: known tasks: {', '.join(sorted(TASKS))}")
    # Each option against the task's own signature: a name it does not take, or a value of
    # another type than its default, is named here rather than deep inside the task.
    params = inspect.signature(TASKS[name].__init__).parameters
    for key, value in options.items():
        if key not in params or key in ("self", "seed"):
            takes = ", ".join(p for p in params if p not in ("self", "seed"))
            raise TargetError(
                f"rayd eval: --option {key}={value}: task {name!r} takes no option {key!r} "
                f"(it takes: {takes})"
            )
        default = params[key].default
        kind = type(default)
        fits = (
            default is inspect.Parameter.empty
            or default is None
            or (kind is float and isinstance(value, int | float) and not isinstance(value, bool))
            or (
                kind is not float
                and isinstance(value, kind)
                and not (kind is int and isinstance(value, bool))
            )
        )
        if not fits:
            raise TargetError(
                f"rayd eval: --option {key}={value}: expected {kind.__name__} "
                f"(like {default!r}), got {type(value).__name__}"
            )
    try:
        return make_task(name, seed=settings["seed"], **options)
    except (TypeError, ValueError) as exc:
        raise TargetError(f"rayd eval: --option: {exc}") from None


def _run_accuracy(target: Target, settings: dict[str, Any]) -> float | None:
    """The run's final eval/accuracy, when this eval used the run's own prompts and settings."""
    import json

    if target.run is None:
        return None
    same = ("task", "options", "count", "split", "seed", "chat_template", "max_new_tokens")
    if any(settings[k] != target.settings.get(k) for k in same):
        return None
    try:
        final = json.loads((target.run / "summary.json").read_text()).get("final") or {}
    except (OSError, ValueError):
        return None
    value = final.get("eval/accuracy")
    return float(value) if isinstance(value, int | float) else None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value
