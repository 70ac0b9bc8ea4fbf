"""One learner step: rayd's DeepSpeed backend at ZeRO 0, 2 and 3 vs a plain torch AdamW loop.

All four take the same batch (top-k reverse KL, the learner's token-sum normalisation, grad clip
1.0, AdamW with the config defaults) on the same model, with the same torch thread count. The
DeepSpeed runs use `LearnerWorker` in this process, world size 1 over gloo: the figures are the
cost of DeepSpeed's engine and ZeRO bookkeeping on one rank, not of data parallelism (there is
no second rank to reduce with). Each variant runs one warm-up step, then the median of a few
steps, the variants taken in turn.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rayd.losses import LossSpec, batch_loss
from rayd.types import Sample, TeacherScore, TrainBatch, collate

SPEC = LossSpec("reverse_kl")
OPTIM = {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.95), "eps": 1e-8, "grad_clip": 1.0}


def make_batch(vocab: int, rows: int, prompt_len: int, completion_len: int) -> TrainBatch:
    """Random token rows with a random (seeded) teacher top-8; only the shapes matter here."""
    gen = torch.Generator().manual_seed(0)
    samples, scores = [], []
    for i in range(rows):
        prompt = torch.randint(4, vocab, (prompt_len,), generator=gen).tolist()
        completion = torch.randint(4, vocab, (completion_len,), generator=gen).tolist()
        teacher = torch.randn((completion_len, vocab), generator=gen).log_softmax(-1)
        top = teacher.topk(8, dim=-1)
        samples.append(Sample(prompt, completion, [-1.0] * completion_len, prompt_index=i))
        scores.append(TeacherScore(teacher[:, 0].contiguous(), top.indices, top.values))
    return collate(samples, scores, pad_id=0)


def torch_stepper(model_path: str, batch: TrainBatch) -> Callable[[], None]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=OPTIM["lr"],
        betas=OPTIM["betas"],
        eps=OPTIM["eps"],
        weight_decay=OPTIM["weight_decay"],
    )
    tokens = max(batch.num_tokens, 1)

    def step() -> None:
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        per_token, _ = batch_loss(out.logits[:, :-1], batch, SPEC)
        (per_token.sum() / tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def deepspeed_stepper(
    model_path: str, batch: TrainBatch, zero_stage: int, threads: int
) -> Callable[[], Any]:
    from dataclasses import replace

    from rayd.cluster import free_port
    from rayd.config import RunConfig
    from rayd.learner.spec import LearnerSpec
    from rayd.learner.worker import LearnerWorker

    cfg = RunConfig.model_validate(
        {
            # The batch carries the teacher's scores: no teacher is loaded, any path will do.
            "models": {"student": {"path": model_path}, "teacher": {"path": model_path}},
            "learner": {
                "num_learners": 1,
                "zero_stage": zero_stage,
                "micro_batch_size": len(batch),
                "grad_accum": 1,
                "threads": threads,
                "optim": {**OPTIM, "warmup_steps": 0},
            },
            "trainer": {"max_steps": 1000, "prompts_per_step": len(batch)},
        }
    )
    spec = replace(LearnerSpec.from_config(cfg, model_path), loss=SPEC)
    worker = LearnerWorker(0, 1, "127.0.0.1", free_port(), spec)
    return partial(worker.train_step, batch, batch.num_tokens)


def interleaved_times(steps: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Per variant, `reps` step times after one warm-up step each, taken round-robin: load from
    other processes then falls on every variant alike instead of on whichever ran during it."""
    for step in steps.values():
        step()  # warm-up: allocations, DeepSpeed's lazy set-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    from rayd.models import build_tiny_llama, count_params

    arch = dict(layers=2, hidden=128, heads=2) if quick else dict(layers=4, hidden=256, heads=4)
    model_path = str(build_tiny_llama(workdir / "model", seed=0, **arch))
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(model_path).vocab_size)
    rows, completion_len = (4, 32) if quick else (8, 96)
    batch = make_batch(vocab, rows, prompt_len=16, completion_len=completion_len)
    reps = 5 if quick else 9
    threads = min(2, os.cpu_count() or 1)
    torch.set_num_threads(threads)

    # All four live in this process at once (separate models and engines, one gloo group).
    steps = {"torch": torch_stepper(model_path, batch)}
    for stage in (0, 2, 3):
        steps[f"zero{stage}"] = deepspeed_stepper(model_path, batch, stage, threads)
    raw = interleaved_times(steps, reps)
    seconds = {name: statistics.median(t) for name, t in raw.items()}
    tokens = batch.num_tokens
    tps = {name: tokens / s for name, s in seconds.items()}
    from transformers import AutoModelForCausalLM

    params = count_params(AutoModelForCausalLM.from_pretrained(model_path))
    return {
        "zero2_over_torch": tps["zero2"] / tps["torch"],
        "zero0_over_torch": tps["zero0"] / tps["torch"],
        "zero3_over_torch": tps["zero3"] / tps["torch"],
        "tokens_per_s": tps,
        "step_s_median": seconds,
        "step_s_all": raw,
        "model_params": params,
        "batch_rows": rows,
        "loss_tokens_per_step": tokens,
        "torch_threads": threads,
        "notes": [
            "single process, world size 1 over gloo: DeepSpeed's per-rank overhead, no "
            "data-parallel reduction; tokens/s = loss tokens / median step time "
            f"({reps} steps each after one warm-up, the four variants taken in turn)",
        ],
    }
