"""Forgetting on a real model (configs/smollm2/forgetting.yaml, docs/experiments/onpolicy-regime.md
section 5): a measurement script beside the benches, not a `rayd bench` section.

    python -m rayd.commands.bench.forgetting check [--config C] [--count 100]
    python -m rayd.commands.bench.forgetting measure RUN ... --baseline METHOD [--json out.json]

One process, plain transformers, no Ray.
- `check`: the start model on the new task (the config's validation split, greedy, in its chat
  template): asked the prompt alone, and shown the gold completion in the config's
  `teacher.prompt_template` (SDFT's teacher at step 0). A self-teacher that cannot use the
  demonstration has nothing to teach.
- `measure`: each run folder (named METHOD-seed=N, as `rayd ablate` names its cells): the new
  task's test accuracy, greedy and at temperature 1, from the run's own held-out evals
  (summary.json, at its start and its end), and its drift from the start model on what that
  model did before: KL(start || trained) per token, exact over the vocabulary at every position
  of the start model's seeded temperature-1 answers (at most 64 tokens) to the fixed everyday
  instructions of configs/smollm2/everyday-prompts.txt. A model that answers them as before
  scores 0; the table pairs the methods by seed against `--baseline`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rayd.commands.bench.regimes import _load

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "smollm2" / "forgetting.yaml"
EVERYDAY = ROOT / "configs" / "smollm2" / "everyday-prompts.txt"
ANSWER_TOKENS = 64  # of each everyday answer, sampled from the start model
METRICS = {"new_greedy": 100.0, "new_temperature_1": 100.0, "old_kl": 1.0}


def _chat_text(tokenizer: Any, text: str) -> str:
    """`text` as a user turn, as text (the generate helper of bench.regimes takes text; rayd's
    own encoding, rayd.data.prompts.encode_prompt, gives the same ids); the plain text for a
    tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )


def check(config: Path, count: int) -> dict[str, Any]:
    from rayd.commands.bench.regimes import generate
    from rayd.config import load_config
    from rayd.tasks import make_task

    cfg = load_config(config)
    data = cfg.data
    task = make_task(data.source.split(":", 1)[1], seed=data.split_seed_for(0), **data.task_options)
    examples = task.examples("validation", count)
    model, tokenizer = _load(cfg.models.student.path)
    template = cfg.teacher.prompt_template
    asked = {
        "alone": [e.prompt for e in examples],
        "shown_the_gold_completion": [
            template.format(prompt=e.prompt, privileged_context=e.completion) for e in examples
        ],
    }
    out: dict[str, Any] = {"model": cfg.models.student.path, "prompts": count}
    for name, prompts in asked.items():
        completions = generate(model, tokenizer, [_chat_text(tokenizer, p) for p in prompts])
        pairs = zip(completions, examples, strict=True)
        right = sum(task.is_correct(c, e.answer) for c, e in pairs)
        out[name] = {"accuracy": right / count, "example": completions[0]}
        print(f"  {name}: {right}/{count} right; e.g. {completions[0]!r}", flush=True)
    return out


@torch.no_grad()
def everyday_answers(
    start: Any, tokenizer: Any, seed: int = 0, prompts: Sequence[str] | None = None
) -> list[tuple[int, list[int]]]:
    """The start model's seeded temperature-1 answer to each everyday instruction (or to each of
    `prompts`): (the prompt's length in tokens, the prompt's and the answer's ids)."""
    from rayd.data.prompts import encode_prompt

    if prompts is None:
        prompts = [p for p in EVERYDAY.read_text(encoding="utf-8").splitlines() if p.strip()]
    torch.manual_seed(seed)  # generate draws from the global stream
    out = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt)
        sequence = start.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=ANSWER_TOKENS,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[0].tolist()
        out.append((len(ids), sequence))
    return out


@torch.no_grad()
def drift(start: Any, model: Any, answers: Sequence[tuple[int, list[int]]]) -> float:
    """KL(start || model) per answer token: at each position of the start model's answers, the
    exact KL between the two next-token distributions, averaged over every answer token."""
    total, tokens = 0.0, 0
    for prompt_len, sequence in answers:
        ids = torch.tensor([sequence])
        # positions prompt_len - 1 .. end - 2 predict the answer's tokens
        at = slice(prompt_len - 1, len(sequence) - 1)
        p = torch.log_softmax(start(ids).logits[0, at].double(), dim=-1)
        q = torch.log_softmax(model(ids).logits[0, at].double(), dim=-1)
        total += float((p.exp() * (p - q)).sum())
        tokens += len(sequence) - prompt_len
    return total / tokens


def measure(folders: Sequence[Path]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    starts: dict[str, tuple[Any, list[tuple[int, list[int]]]]] = {}
    for folder in folders:
        saved = yaml.safe_load((folder / "config.yaml").read_text())
        summary = json.loads((folder / "summary.json").read_text())
        start_path = saved["models"]["student"]["path"]
        if start_path not in starts:
            start, tokenizer = _load(start_path)
            starts[start_path] = (start, everyday_answers(start, tokenizer))
        start, answers = starts[start_path]
        model, _ = _load(summary["student"])
        row = {
            "new_greedy": summary["final"]["eval/accuracy"],
            "new_temperature_1": summary["final"]["eval/sampled_accuracy"],
            "new_greedy_at_start": summary["initial"]["eval/accuracy"],
            "new_temperature_1_at_start": summary["initial"]["eval/sampled_accuracy"],
            "old_kl": drift(start, model, answers),
            "answer_tokens": sum(len(s) - n for n, s in answers),
        }
        out[str(folder)] = row
        print(f"  {folder}: {row}", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from rayd.cli import positive_int

    parser = argparse.ArgumentParser(
        prog="python -m rayd.commands.bench.forgetting", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    c = commands.add_parser("check", help="the start model and SDFT's teacher on the new task")
    c.add_argument("--config", type=Path, default=CONFIG)
    c.add_argument("--count", type=positive_int, default=100)
    m = commands.add_parser("measure", help="trained runs on the new task and the old")
    m.add_argument("folders", type=Path, nargs="+", help="run folders, METHOD-seed=N")
    m.add_argument("--baseline", required=True, help="the METHOD the others are paired with")
    for p in (c, m):
        p.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    for folder in getattr(args, "folders", []):
        for name in ("config.yaml", "summary.json"):
            if not (folder / name).is_file():
                parser.error(f"{folder}: no {name}; expected a finished run folder")
    if args.command == "check":
        result = check(args.config, args.count)
    else:
        from rayd.commands.ablate.report import paired_by_seed

        result = measure(args.folders)
        print(paired_by_seed(result, args.baseline, METRICS))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
