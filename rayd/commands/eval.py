"""`rayd eval MODEL --task ...`: accuracy and pass@k of any checkpoint on a task's eval split."""

from __future__ import annotations

import math
from typing import Any

from rayd.tasks.base import Task


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples with `correct` right (Chen et al. 2021, Codex)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def evaluate_model(
    model: str,
    task: Task,
    *,
    count: int = 200,
    ks: tuple[int, ...] = (),
    samples: int = 0,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    backend: str = "vllm",
    max_model_len: int | None = None,
    seed: int = 0,
    chat_template: bool = True,
) -> dict[str, Any]:
    """Greedy accuracy (and pass@k from `samples` draws per prompt) on the eval split, generated
    by a rollout engine actor on the local or joined Ray cluster."""
    import ray
    from transformers import AutoConfig, AutoTokenizer

    from rayd import cluster
    from rayd.config import RolloutConfig
    from rayd.data.prompts import encode_prompt
    from rayd.rollout.group import engine_runtime_env
    from rayd.rollout.spec import EngineSpec
    from rayd.rollout.worker import RolloutWorker

    examples = task.examples("eval", count)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if max_model_len is None:  # the model's own limit, capped where the KV cache stays small
        positions = getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", 512)
        max_model_len = min(int(positions), 2048)
    ids = [encode_prompt(tokenizer, e.prompt, chat_template) for e in examples]
    indices = list(range(len(examples)))
    cluster.connect()
    worker = (
        ray.remote(RolloutWorker)
        .options(num_cpus=1, runtime_env=engine_runtime_env())
        .remote(
            EngineSpec.from_section(
                model,
                RolloutConfig(backend=backend, max_model_len=max_model_len),
                dtype="auto",
                seed=seed,
                max_logprobs=20,
            )
        )
    )
    try:
        greedy = cluster.get(
            worker.generate.remote(
                ids, indices, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens
            ),
            3600,
            "eval generate",
        )
        right = [task.is_correct(s.text, e.answer) for s, e in zip(greedy, examples, strict=True)]
        out: dict[str, Any] = {
            "model": model,
            "prompts": len(examples),
            "accuracy": sum(right) / len(right),
            "completion_len": sum(len(s.completion_ids) for s in greedy) / len(greedy),
            "examples": [
                {"prompt": e.prompt, "answer": e.answer, "completion": s.text, "correct": ok}
                for e, s, ok in zip(examples[:5], greedy, right, strict=False)
            ],
        }
        if ks:
            n = max(samples, max(ks))
            drawn = cluster.get(
                worker.generate.remote(
                    ids,
                    indices,
                    n=n,
                    temperature=temperature,
                    top_p=1.0,
                    max_new_tokens=max_new_tokens,
                    seed=seed,
                ),
                3600,
                "eval sample",
            )
            correct = [0] * len(examples)
            for s in drawn:
                correct[s.prompt_index] += task.is_correct(s.text, examples[s.prompt_index].answer)
            for k in ks:
                out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
            out["samples_per_prompt"] = n
            out["temperature"] = temperature
    finally:
        ray.kill(worker)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    from rayd.tasks import make_task

    parser = argparse.ArgumentParser(
        prog="rayd eval", description="greedy accuracy and pass@k of a model on a task"
    )
    parser.add_argument("model", help="a Hugging Face checkpoint folder (e.g. runs/X/student)")
    parser.add_argument("--task", default="addition", help="built-in task name, or jsonl")
    parser.add_argument(
        "--option", action="append", default=[], help="task option key=value (e.g. digits=3)"
    )
    parser.add_argument("--count", type=int, default=200, help="eval-split prompts")
    parser.add_argument("--pass-k", default="", help="comma-separated k for pass@k, e.g. 1,4")
    parser.add_argument("--samples", type=int, default=0, help="draws per prompt for pass@k")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chat-template",
        choices=("auto", "never"),
        default="auto",
        help="auto: prompts in the model's chat template when it has one (as training does)",
    )
    parser.add_argument("--out", help="JSON file (default: MODEL/eval-TASK.json)")
    args = parser.parse_args(argv)
    import yaml

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"rayd eval: --option {item!r} is not key=value", file=sys.stderr)
            return 2
        options[key] = yaml.safe_load(value)
    if not (Path(args.model) / "config.json").is_file():
        print(f"rayd eval: {args.model!r} is not a model folder (no config.json)", file=sys.stderr)
        return 2
    try:
        task = make_task(args.task, seed=args.seed, **options)
        ks = tuple(int(k) for k in args.pass_k.split(",") if k.strip())
    except (KeyError, TypeError, ValueError) as exc:
        print(f"rayd eval: {exc}", file=sys.stderr)
        return 2
    result = evaluate_model(
        args.model,
        task,
        count=args.count,
        ks=ks,
        samples=args.samples,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        seed=args.seed,
        chat_template=args.chat_template == "auto",
    )
    result["task"] = {"name": args.task, **options}
    out = Path(args.out) if args.out else Path(args.model) / f"eval-{args.task}.json"
    out.write_text(json.dumps(result, indent=2))
    metrics = [k for k in result if k == "accuracy" or k.startswith("pass@")]
    print(f"{'model':<40} {'prompts':>8} " + " ".join(f"{m:>9}" for m in metrics))
    print(
        f"{args.model[-40:]:<40} {result['prompts']:>8} "
        + " ".join(f"{100 * result[m]:>8.1f}%" for m in metrics)
    )
    print(f"rayd eval: written {out}")
    return 0
