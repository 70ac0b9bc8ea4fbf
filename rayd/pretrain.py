"""Supervised training of a small model on task examples (used to make the embedded teacher).

One process, plain torch: the teacher of the embedded demo is trained on gold rationales before
any distillation happens, so the distributed machinery is not needed here.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayd.progress import Progress
from rayd.tasks.base import Example


def encode_examples(tokenizer, examples: list[Example], with_rationale: bool = True):
    """(input_ids, loss_mask) lists: the loss covers the completion and the end-of-sequence."""
    rows = []
    for ex in examples:
        prompt = tokenizer(ex.prompt, add_special_tokens=False).input_ids
        if with_rationale:
            completion, mask = _encode_with_unlearned(tokenizer, ex)
        else:
            completion = tokenizer("A=" + ex.answer, add_special_tokens=False).input_ids
            mask = [1] * len(completion)
        completion.append(tokenizer.eos_token_id)  # an id, never the "</s>" string (see models.py)
        rows.append((prompt + completion, [0] * len(prompt) + mask + [1]))
    return rows


def _encode_with_unlearned(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """The completion's ids and a loss mask that is 0 on the tokens of `ex.unlearned`."""
    text = ex.completion
    ids: list[int] = []
    mask: list[int] = []
    cuts = [0, *(c for span in ex.unlearned for c in span), len(text)]
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        piece = tokenizer(text[lo:hi], add_special_tokens=False).input_ids
        ids += piece
        mask += [i % 2 == 0] * len(piece)  # even pieces lie between spans, odd ones inside
    if ex.unlearned and ids != tokenizer(text, add_special_tokens=False).input_ids:
        # A subword tokenizer may merge across a span's edge: then no token mask matches it.
        raise ValueError(
            "unlearned spans need a tokenizer that splits at their edges (a character "
            f"tokenizer does); this one tokenises {text!r} differently in pieces"
        )
    return ids, [int(m) for m in mask]


def train_on_examples(
    model_dir: str | Path,
    examples: list[Example],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    with_rationale: bool = True,
    log_every: int = 0,
    progress: str | None = None,
    once: bool = False,
    every: int = 0,
    on_every: Callable[[int, Any], None] | None = None,
) -> list[float]:
    """Train the checkpoint in `model_dir` in place; returns the per-step losses. `progress`
    names the job in a progress bar (periodic lines when stderr is not a terminal).

    `once`: each example is used once, in a seeded order (fresh traces every step: an SFT
    plateau then measures the model, not memorisation); it needs steps x batch_size examples.
    `on_every(step, model)` is called after every `every` steps (in eval mode, then back)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    rows = encode_examples(tokenizer, examples, with_rationale)
    if once:
        if len(rows) < steps * batch_size:
            raise ValueError(
                f"once=True needs steps x batch_size = {steps * batch_size} examples, "
                f"got {len(rows)}"
            )
        rng.shuffle(rows)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    # Linear decay to a tenth: the last steps settle the digit-level facts the accuracy needs.
    schedule = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0 - 0.9 * s / max(steps, 1))
    losses = []
    bar = Progress(progress or "pretraining", steps, enabled=progress is not None)
    for step in range(steps):
        if once:
            batch = rows[step * batch_size : (step + 1) * batch_size]
        else:
            batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros((batch_size, width))
        attn = torch.zeros((batch_size, width), dtype=torch.long)
        for i, (row_ids, row_mask) in enumerate(batch):
            ids[i, : len(row_ids)] = torch.tensor(row_ids)
            mask[i, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.float32)
            attn[i, : len(row_ids)] = 1
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(batch_size, -1)
        target_mask = mask[:, 1:]
        loss = (token_loss * target_mask).sum() / target_mask.sum().clamp(min=1)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix({"loss": losses[-1]})
        bar.update()
        if log_every and (step + 1) % log_every == 0:
            print(f"  pretrain step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
        if on_every and every and (step + 1) % every == 0:
            model.eval()
            on_every(step + 1, model)
            model.train()
    bar.close()
    model.save_pretrained(model_dir)
    return losses
