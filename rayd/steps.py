"""Reasoning steps of sampled completions: which token belongs to which step, the per-token
weights of on-policy rationale distillation, and where the student diverges from the teacher.

A completion such as "7+8+0=15;4+3+1=8;A=85</s>" has the steps "7+8+0=15;", "4+3+1=8;" and
"A=85</s>": a step ends with the delimiter, and the answer, from the task's last marker on, is a
step of its own (delimiters inside it do not split it). The driver does this with the tokenizer;
the weights themselves are the pure torch `step_token_weights` below.
"""

from __future__ import annotations

import bisect
import math
from typing import Any, Literal

import torch
from torch import Tensor

from rayd.config import AlgorithmConfig
from rayd.types import Sample, TrainBatch


def step_token_weights(
    step_ids: Tensor,
    mask: Tensor,
    mode: Literal["uniform", "divergence"],
    reverse_kl: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token loss weights that share each completion's weight among its reasoning steps.

    step_ids [B, T] int64: the step of each token (0, 1, ... within its row; any value where
    `mask` is False). mask [B, T] bool. reverse_kl [B, T]: the per-token reverse-KL estimate
    behaviour_lp - teacher_lp (divergence only; detached here). Returns [B, T] float32.

    A row with N tokens in S non-empty steps gives step s (n_s tokens) the total weight
    N * share_s, spread evenly over its tokens (N * share_s / n_s each), so every row's mean
    token weight is 1 and the loss stays on the scale of unweighted training:
      uniform:    share_s = 1 / S: a long step no longer outweighs a short one;
      divergence: share_s = softmax_s(d_s / temperature), d_s the step's mean reverse KL:
                  the steps where the student strays most get the most weight;
                  temperature -> inf gives uniform, -> 0 all weight on the worst step.
    Masked positions and rows without tokens get weight 0 (never NaN).
    """
    if mode not in ("uniform", "divergence"):
        raise ValueError(f"step weighting mode must be 'uniform' or 'divergence', got {mode!r}")
    if not temperature > 0.0:
        raise ValueError(f"step weighting temperature must be > 0, got {temperature}")
    if step_ids.shape != mask.shape:
        raise ValueError(f"step ids {tuple(step_ids.shape)} and mask {tuple(mask.shape)} differ")
    ids = torch.where(mask, step_ids, 0)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("step ids must be >= 0 at every unmasked position")
    steps = int(ids.max()) + 1 if ids.numel() else 1
    rows = mask.shape[0]
    ones = mask.to(torch.float64)
    counts = torch.zeros(rows, steps, dtype=torch.float64).scatter_add_(1, ids, ones)
    present = counts > 0
    if mode == "uniform":
        share = present / present.sum(1, keepdim=True).clamp(min=1)
    else:
        if reverse_kl is None:
            raise ValueError("divergence step weighting needs the per-token reverse_kl")
        kl = torch.where(mask, reverse_kl.detach().to(torch.float64), 0.0)
        sums = torch.zeros_like(counts).scatter_add_(1, ids, kl)
        step_mean = sums / counts.clamp(min=1)
        # Empty steps (ids skipped) and empty rows must get no share and no NaN: -inf logits
        # vanish in the softmax; an all-empty row gets finite zeros instead of 0/0.
        logits = torch.where(present, step_mean / temperature, -math.inf)
        logits = torch.where(present.any(1, keepdim=True), logits, 0.0)
        share = torch.softmax(logits, dim=1) * present
    per_step = counts.sum(1, keepdim=True) * share / counts.clamp(min=1)
    weights = torch.gather(per_step, 1, ids)
    return torch.where(mask, weights, 0.0).float()


def step_ids_of_pieces(pieces: list[str], delimiter: str, marker: str | None) -> list[int]:
    """The step (0, 1, ...) of each token, given the text each token decodes to.

    A token belongs to the step its first character is in, so a multi-character token that
    holds a delimiter's end (a BPE ";\\n") stays with the step the delimiter closes. Tokens
    that decode to nothing (EOS, other special tokens) join the step of the token before them.
    No delimiter and no marker: one step. Steps are numbered without gaps.
    """
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    text = "".join(pieces)
    answer_at = text.rfind(marker) if marker else -1
    reasoning_end = answer_at if answer_at >= 0 else len(text)
    # Offsets where a new step starts: after each delimiter of the reasoning, and at the answer.
    starts: list[int] = []
    at = text.find(delimiter)
    while at >= 0 and at + len(delimiter) <= reasoning_end:
        starts.append(at + len(delimiter))
        at = text.find(delimiter, at + len(delimiter))
    if answer_at >= 0:
        starts.append(answer_at)

    out: list[int] = []
    offset, step, raw_prev = 0, 0, None
    for piece in pieces:
        if piece or raw_prev is None:
            raw = bisect.bisect_right(starts, offset)  # starts is sorted: answer_at comes last
            if raw_prev is not None and raw != raw_prev:
                step += 1  # renumber: several boundaries inside one token make one new step
            raw_prev = raw
        out.append(step)
        offset += len(piece)
    return out


def completion_step_ids(
    tokenizer: Any, completion_ids: list[int], delimiter: str, marker: str | None
) -> list[int]:
    """`step_ids_of_pieces` of a completion, each token decoded on its own.

    Single-token decoding is what makes token boundaries line up with text offsets; its known
    approximations (a byte-level token holding half a UTF-8 character decodes to U+FFFD; a
    SentencePiece token loses its leading space) can move a step boundary by one token only
    when the delimiter itself is made of such characters.
    """
    pieces = tokenizer.batch_decode(
        [[i] for i in completion_ids],
        skip_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )
    return step_ids_of_pieces(pieces, delimiter, marker)


def weigh_steps(
    batch: TrainBatch,
    samples: list[Sample],
    tokenizer: Any,
    algo: AlgorithmConfig,
    marker: str | None,
) -> tuple[Tensor, dict[str, float]]:
    """(token_weight [B, L-1] for `batch`, step metrics) under algo.step_weighting.

    Rows of the label task (hard_target) keep weight 1. The divergence of a step is estimated
    on the student's own samples (behaviour_lp - teacher_lp); gkd's dataset completions have no
    behaviour log-probs, so they get uniform step weights under `divergence`.
    """
    mode = algo.step_weighting
    if mode == "none":
        raise ValueError("weigh_steps needs algorithm.step_weighting uniform or divergence")
    mask = batch.loss_mask
    step_ids = torch.zeros(mask.shape, dtype=torch.long)
    for row, sample in enumerate(samples):
        if sample.hard_target:
            continue
        start = len(sample.prompt_ids) - 1  # target column of the first completion token
        ids = completion_step_ids(tokenizer, sample.completion_ids, algo.step_delimiter, marker)
        step_ids[row, start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)

    hard = torch.tensor([s.hard_target for s in samples], dtype=torch.bool).unsqueeze(-1)
    sampled = torch.tensor([s.on_policy for s in samples], dtype=torch.bool).unsqueeze(-1)
    scored = mask & ~hard & sampled  # student samples: behaviour log-probs are known
    dataset = mask & ~hard & ~sampled
    reverse_kl = batch.behavior_logprobs - batch.teacher_logprobs
    weights = torch.where(mask & hard, 1.0, 0.0)
    weights += step_token_weights(step_ids, scored, mode, reverse_kl, algo.step_temperature)
    if dataset.any():
        weights += step_token_weights(step_ids, dataset, "uniform")
    return weights, step_metrics(step_ids, scored, reverse_kl, weights)


def step_metrics(
    step_ids: Tensor, mask: Tensor, reverse_kl: Tensor, weights: Tensor
) -> dict[str, float]:
    """Where the student diverges, over the rows that have tokens in `mask`; all [B, T].

    steps/count            mean number of steps per completion
    steps/reverse_kl_first mean reverse KL (per token) of the first step
    steps/reverse_kl_last  ... of the last step (the answer, when the completion has one)
    steps/reverse_kl_worst ... of each completion's most divergent step
    steps/worst_position   where that step lies: 0 = first step, 1 = last (one-step rows: 0)
    steps/max_share        the largest share of a completion's weight on one step (1/count
                           for uniform weighting; larger when divergence weighting focuses)
    """
    rows = mask.any(1)
    if not rows.any():
        return {}
    ids = torch.where(mask, step_ids, 0)[rows]
    m = mask[rows].to(torch.float64)
    kl = torch.where(mask, reverse_kl.to(torch.float64), 0.0)[rows]
    w = torch.where(mask, weights.to(torch.float64), 0.0)[rows]
    width = int(ids.max()) + 1
    counts = torch.zeros(len(ids), width, dtype=torch.float64).scatter_add_(1, ids, m)
    kl_sums = torch.zeros_like(counts).scatter_add_(1, ids, kl)
    w_sums = torch.zeros_like(counts).scatter_add_(1, ids, w)
    present = counts > 0
    means = torch.where(present, kl_sums / counts.clamp(min=1), -torch.inf)
    first = present.to(torch.long).argmax(1)  # 0 after the driver's renumbering; kept general
    last = width - 1 - present.flip(1).to(torch.long).argmax(1)
    worst = means.argmax(1)
    n_steps = present.sum(1).to(torch.float64)
    # Position of the worst step among the row's steps, as a fraction of the way to the last.
    rank = present.cumsum(1).gather(1, worst.unsqueeze(1)).squeeze(1).to(torch.float64) - 1
    position = torch.where(n_steps > 1, rank / (n_steps - 1).clamp(min=1), 0.0)
    share = (w_sums / w_sums.sum(1, keepdim=True).clamp(min=1e-12)).max(1).values

    def mean_kl_of(step: Tensor) -> float:
        return means.gather(1, step.unsqueeze(1)).mean().item()

    return {
        "steps/count": n_steps.mean().item(),
        "steps/reverse_kl_first": mean_kl_of(first),
        "steps/reverse_kl_last": mean_kl_of(last),
        "steps/reverse_kl_worst": mean_kl_of(worst),
        "steps/worst_position": position.mean().item(),
        "steps/max_share": share.mean().item(),
    }
