"""`rayd export RUN --out DIR`: a run's student as a Hugging Face checkpoint with a model card.

RUN is a run folder, or its `student/` (the same things `rayd eval` takes).

The weights come from the run's final `student/` folder, or, for a run that stopped early
(preempted, failed, still going), from its newest checkpoint that verifies: DeepSpeed's ZeRO
shards are consolidated into one fp32 state dict on the CPU, so no learner or GPU is needed.
The folder holds safetensors, the tokenizer (with its chat template), a generation config, a
model card (`README.md`: a prompt as the student expects it and its expected output, load
snippets for transformers and vLLM, where the weights came from, the run's config, its eval
results and the provenance of its models and data) and `rayd_export.json` with the same facts
for programs, including the eval settings `rayd eval DIR` reads (task, options, prompt format).

`--quantize int8` stores int8 weight-only weights (torchao; the `quant` extra) for deployment
after distillation, and measures the task accuracy before and after on the run's eval task, so
the card says what quantization cost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rayd.commands.eval import (
    EXPORT_RECORD,
    TargetError,
    resolve_target,
    run_settings,
)
from rayd.commands.model_card import adapter_card, model_card
from rayd.staging import refuse_to_replace, staged_folder

if TYPE_CHECKING:
    from rayd.config import RunConfig

_FEATURE_PROJ = "rayd_feature_proj."  # feature_kd's training-only projections


def _error(message: str) -> Exception:
    """A ConfigError (one line for the user), rayd.config imported only when one is raised:
    `rayd export --help` stays fast."""
    from rayd.config import ConfigError

    return ConfigError(message)


def run_config(run: Path) -> RunConfig:
    import yaml

    from rayd.config import RunConfig

    path = run / "config.yaml"
    if not path.is_file():
        raise _error(f"export error: {str(run)!r} is not a rayd run folder (no config.yaml)")
    return RunConfig.model_validate(yaml.safe_load(path.read_text()))


def checkpoint_state(run: Path) -> tuple[dict[str, Any], int, dict[str, Any] | None]:
    """(fp32 state dict, step, the run's last eval before it) from the newest checkpoint that
    verifies."""
    from rayd.checkpoint import CheckpointStore

    ckpt, rejected = CheckpointStore(run / "checkpoints").latest_valid()
    for line in rejected:
        print(f"rayd export: skipping corrupt checkpoint {line}", file=sys.stderr)
    if ckpt is None:
        raise _error(
            f"export error: {run} has neither a final student/ folder nor a checkpoint that "
            "verifies (set trainer.save_every to checkpoint runs)"
        )
    student = learner_state_dict(Path(ckpt.learner_dir))
    return student, ckpt.step, ckpt.driver_state().get("last_eval")


def learner_state_dict(learner: Path) -> dict[str, Any]:
    """The student's fp32 state dict from one checkpoint's learner folder (any ZeRO stage),
    without feature_kd's projections. Every file is loaded with weights_only=True: a run
    folder from someone else runs no code here."""
    from rayd.checkpoint import LEARNER_TAG, CheckpointError, safe_torch_load, weights_only_loads

    tag_dir = learner / LEARNER_TAG
    try:
        if any(tag_dir.glob("*optim_states.pt")) and any(
            "zero" in p.name for p in tag_dir.iterdir()
        ):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with weights_only_loads():  # it unpickles with weights_only=False otherwise
                state = get_fp32_state_dict_from_zero_checkpoint(str(learner), tag=LEARNER_TAG)
        else:  # ZeRO stage 0: the module's state dict is stored whole
            files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
            if not files:
                raise _error(f"export error: {tag_dir}: no DeepSpeed model states in it")
            state = safe_torch_load(files[0])["module"]
    except CheckpointError as exc:
        raise _error(f"export error: {exc}") from None
    return {k: v for k, v in state.items() if not k.startswith(_FEATURE_PROJ)}


def load_student(run: Path, cfg: RunConfig, source: str) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, origin): from `student/` or from the newest checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from rayd.weight_sync import load_whole_state_dict
    from rayd.zoo import resolve_model_path

    final = run / "student"
    if source == "final" or (source == "auto" and (final / "config.json").is_file()):
        if not (final / "config.json").is_file():
            raise _error(f"export error: {run} has no final student/ (the run did not finish)")
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
        summary = json.loads((run / "summary.json").read_text())
        origin = {"from": "final", "step": summary.get("steps"), "eval": summary.get("final")}
        return model, AutoTokenizer.from_pretrained(final), origin
    # The architecture and tokenizer are those the run started from; the weights the checkpoint's.
    init = resolve_model_path(
        cfg.models.student.path, seed=cfg.models.student.build_seed(cfg.trainer.seed)
    )
    state, step, last_eval = checkpoint_state(run)
    if cfg.learner.lora is not None:  # a LoRA student: its adapters merged into the weights
        from rayd.learner.lora import merged_state

        state = merged_state(state, cfg.learner.lora)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(init), dtype=torch.float32)
    misfit = load_whole_state_dict(model, state)
    if misfit:
        raise _error(f"export error: the checkpoint does not fit {init} ({misfit})")
    with contextlib.suppress(OSError):  # without one, export() builds it from the tokenizer
        model.generation_config = GenerationConfig.from_pretrained(init)
    origin = {"from": "checkpoint", "step": step, "eval": last_eval}
    return model, AutoTokenizer.from_pretrained(init), origin


def provenance(run: Path, cfg: RunConfig) -> dict[str, Any]:
    """What the run's models and training data were, from the files rayd wrote beside them."""
    out: dict[str, Any] = {"rayd_version": _rayd_version(), "rayd_commit": _git_commit()}
    several = [(f"teacher:{t.name}", t) for t in cfg.models.teachers or []]
    roles = [("student_init", cfg.models.student), ("teacher", cfg.models.teacher), *several]
    for role, spec in roles:
        if spec is None:
            continue
        entry: dict[str, Any] = {"path": spec.path}
        # A tiny:<preset> is described by its name (resolving it could build it); a converted
        # model folder carries where it came from.
        record = Path(spec.path) / "rayd_convert.json"
        if record.is_file():
            entry["converted"] = json.loads(record.read_text())
        out[role] = entry
    if cfg.data.train_dataset:
        prov = Path(cfg.data.train_dataset).parent / "provenance.json"
        out["train_dataset"] = {
            "path": cfg.data.train_dataset,
            **({"provenance": json.loads(prov.read_text())} if prov.is_file() else {}),
        }
    return out


def _rayd_version() -> str:
    from rayd import __version__

    return __version__


def _git_commit() -> str | None:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def task_accuracy(model_dir: Path, cfg: RunConfig, count: int) -> float | None:
    """Greedy accuracy on the run's eval task, with the transformers backend (which also runs
    torchao's int8 weights), or None when the run's data has no task verifier."""
    task = run_task(cfg)
    if task is None:
        return None
    from rayd.evaluate import evaluate_model

    result = evaluate_model(
        str(model_dir),
        task,
        count=count,
        max_new_tokens=cfg.rollout.max_new_tokens,
        backend="hf",
        max_model_len=cfg.rollout.max_model_len,
        seed=cfg.trainer.seed,
        chat_template=cfg.data.chat_template == "auto",
        long_prompts=cfg.data.long_prompts,
    )
    return float(result["accuracy"])


def check_out(run: Path, out: Path, force: bool) -> None:
    """--out before anything is loaded: a folder that holds neither the run nor its weights,
    empty unless --force."""
    if out.exists() and not out.is_dir():
        raise _error(f"export error: --out {str(out)!r} is a file; give a folder")
    o, r = out.resolve(), run.resolve()
    if o == r or (r in o.parents and o.relative_to(r).parts[0] in ("student", "checkpoints")):
        raise _error(f"export error: --out {str(out)!r} would overwrite the run's own files")
    if out.exists() and any(out.iterdir()) and not force:
        raise _error(f"export error: --out {str(out)!r} exists and is not empty (use --force)")
    # --force replaces an earlier export, never a folder of the user's.
    refused = refuse_to_replace(out, EXPORT_RECORD, "a rayd export", {"the run": run})
    if refused:
        raise _error(f"export error: --out {refused}")


def export(
    run: Path,
    out: Path,
    *,
    source: str = "auto",
    quantize: str | None = None,
    eval_count: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """Write the export folder; returns the record also saved as `rayd_export.json`."""
    cfg = run_config(run)
    check_out(run, out, force)
    if quantize is not None:
        try:
            import torchao  # noqa: F401
        except ImportError:
            raise _error(
                "export error: --quantize int8 needs torchao (pip install 'rayd[quant]')"
            ) from None
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer, origin = load_student(run, cfg, source)
    if model.generation_config.eos_token_id is None:
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    record: dict[str, Any] = {
        "run": str(run),
        "weights": {k: v for k, v in origin.items() if k != "eval"},
        "algorithm": cfg.algorithm.name,
        "eval_in_run": origin.get("eval"),
        # What `rayd eval EXPORT` reads: the run's task, options, prompt format and eval split
        "eval": run_settings(cfg),
        "provenance": provenance(run, cfg),
        "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        if quantize is not None or eval_count:
            count = eval_count or 200
            record["accuracy"] = {"float32": task_accuracy(staging, cfg, count), "prompts": count}
        if quantize is not None:
            _quantize_int8(staging)
            record["quantization"] = "int8 weight-only (torchao Int8WeightOnlyConfig)"
            record["accuracy"]["int8"] = task_accuracy(staging, cfg, record["accuracy"]["prompts"])
        # The card's example: the first eval prompt, answered by the files just written
        record["example"] = card_example(staging, cfg)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        (staging / "README.md").write_text(model_card(record, cfg, str(out)))
    return record


def export_adapter(run: Path, out: Path, *, source: str = "auto", force: bool = False) -> dict:
    """A LoRA run's adapter (peft's folder layout) instead of merged weights; returns the record
    also saved as `rayd_export.json`."""
    from transformers import AutoTokenizer

    from rayd.learner.lora import ADAPTER_DIR, adapter_state, save_adapter
    from rayd.weight_sync import deserialize_state_dict

    cfg = run_config(run)
    check_out(run, out, force)
    if cfg.learner.lora is None:
        raise _error(
            "export error: --adapter: the run trained full weights (learner.lora is not set); "
            "export without --adapter"
        )
    final = run / "student" / ADAPTER_DIR / "adapter_model.safetensors"
    if source == "final" or (source == "auto" and final.is_file()):
        if not final.is_file():
            raise _error(f"export error: {run} has no final student/{ADAPTER_DIR}/")
        adapters = deserialize_state_dict(final.read_bytes())
        summary = json.loads((run / "summary.json").read_text())
        origin: dict[str, Any] = {"from": "final", "step": summary.get("steps")}
    else:
        state, step, _ = checkpoint_state(run)
        adapters, origin = adapter_state(state), {"from": "checkpoint", "step": step}
    base = cfg.models.student.path
    record: dict[str, Any] = {
        "run": str(run),
        "weights": {**origin, "kind": "lora adapter", "base_model": base},
        "algorithm": cfg.algorithm.name,
        "lora": cfg.learner.lora.model_dump(),
        "eval": run_settings(cfg),
        "provenance": provenance(run, cfg),
        "exported": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    from rayd.zoo import resolve_model_path

    with staged_folder(out) as staging:
        save_adapter(staging, adapters, cfg.learner.lora, base)
        init = resolve_model_path(base, seed=cfg.models.student.build_seed(cfg.trainer.seed))
        AutoTokenizer.from_pretrained(init).save_pretrained(staging)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
        (staging / "README.md").write_text(adapter_card(record, str(out)))
    return record


def run_task(cfg: RunConfig) -> Any:
    """The run's task (data.source task:NAME), or None for JSONL and hub data."""
    if not cfg.data.source.startswith("task:"):
        return None
    from rayd.tasks import make_task

    name = cfg.data.source.removeprefix("task:")
    seed = cfg.data.split_seed_for(cfg.trainer.seed)
    return make_task(name, seed=seed, **cfg.data.task_options)


def first_eval_prompt(cfg: RunConfig) -> tuple[str, str | None]:
    """(prompt text, gold answer or None) of the run's first held-out prompt, as
    rayd.data.prompts.load_prompts picks it."""
    task = run_task(cfg)
    if task is not None:
        example = task.examples("eval", 1)[0]
        return example.prompt, example.answer
    from rayd.data.prompts import read_rows

    prompt, _, answer, _, _ = read_rows(cfg.data, cfg.trainer.seed).eval[0]
    return prompt, answer


def card_example(folder: Path, cfg: RunConfig) -> dict[str, Any]:
    """A prompt exactly as the student expects it and the greedy output of `folder` for it,
    generated the way the card's transformers snippet does."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    question, answer = first_eval_prompt(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = cfg.data.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
    prompt = question
    if chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=cfg.rollout.max_new_tokens, do_sample=False
        )
    text = tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    task = run_task(cfg)
    return {
        "question": question,
        "chat_template": chat,
        "prompt": prompt,
        "output": text,
        "answer": answer,
        "correct": None if task is None or answer is None else task.is_correct(text, answer),
    }


def _quantize_int8(folder: Path) -> None:
    """Replace the float weights in `folder` with int8 weight-only ones (torchao via
    transformers, so `from_pretrained` reloads them without extra code)."""
    import torch
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
    )
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    model.save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    from rayd.cli import ArgumentParser, non_negative_int, output_folder

    parser = ArgumentParser(
        prog="rayd export",
        description="A run's student as a Hugging Face checkpoint with a model card.",
    )
    parser.add_argument(
        "target",
        metavar="RUN",
        type=Path,
        help="the run folder (runs/<name>), or its student/ (what rayd eval takes)",
    )
    parser.add_argument("--out", required=True, type=output_folder, help="folder to write")
    parser.add_argument(
        "--from",
        dest="source",
        choices=("auto", "final", "checkpoint"),
        default="auto",
        help="auto: the final student/ if the run finished, else its newest valid checkpoint",
    )
    parser.add_argument("--quantize", choices=("int8",), help="int8 weight-only (torchao)")
    parser.add_argument(
        "--eval",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="eval prompts for the accuracy in the card "
        "(default 0; 200 with --quantize, before and after)",
    )
    parser.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run (learner.lora): write its adapter (peft's layout) instead of merged "
        "weights",
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    if args.adapter and (args.quantize or args.eval):
        parser.error("--adapter writes the adapter alone: no --quantize or --eval with it")
    from rayd.config import ConfigError
    from rayd.staging import EXIT_TERMINATED, Terminated, terminate_as_exception

    with terminate_as_exception():  # SIGTERM: the staging folder removed, exit 143
        try:
            return _export_main(args)
        except Terminated:
            print(
                f"rayd export: stopped by SIGTERM; nothing was written to {args.out}",
                file=sys.stderr,
            )
            return EXIT_TERMINATED
        except TargetError as exc:
            print(exc, file=sys.stderr)
            return 2
        except ConfigError as exc:
            print(f"rayd export: {str(exc).removeprefix('export error: ')}", file=sys.stderr)
            return 2


def _export_main(args: Any) -> int:
    from rayd.staging import output_parent_problem

    target = resolve_target(args.target, "rayd export: RUN")
    if target.run is None:
        raise TargetError(
            f"rayd export: RUN: {str(args.target)!r} is a model folder outside a run (no "
            "config.yaml beside it); give the run folder it was trained in"
        )
    if args.source == "final" and target.model is None:
        raise TargetError(
            f"rayd export: --from final: the run {str(target.run)!r} has no student/ (it did "
            "not finish); use --from auto or checkpoint"
        )
    if target.model is None and not any((target.run / "checkpoints").glob("step-*")):
        raise TargetError(
            f"rayd export: RUN: {str(target.run)!r} has neither a final student/ (the run did "
            "not finish) nor checkpoints (trainer.save_every) to export from"
        )
    check_out(target.run, args.out, args.force)
    problem = output_parent_problem(args.out)
    if problem:
        raise TargetError(f"rayd export: --out {problem}")
    if args.adapter:
        record = export_adapter(target.run, args.out, source=args.source, force=args.force)
        weights = record["weights"]
        print(f"rayd export: {args.out} (LoRA adapter, {weights['from']} step {weights['step']})")
        return 0
    record = export(
        target.run,
        args.out,
        source=args.source,
        quantize=args.quantize,
        eval_count=args.eval,
        force=args.force,
    )
    weights = record["weights"]
    print(f"rayd export: {args.out} ({weights['from']} weights, step {weights.get('step')})")
    if record.get("accuracy"):
        print("rayd export: accuracy " + json.dumps(record["accuracy"]))
    ex = record["example"]
    print(
        f"rayd export: model card {args.out / 'README.md'}: {ex['question']!r} -> {ex['output']!r}"
    )
    return 0
