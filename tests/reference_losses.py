"""Oracles for rayd/losses.py, written once and without it: each divergence as its textbook
formula on probability vectors, the top-k bins built from a full softmax, Hinton's loss and
cross-entropy. Shapes as in rayd/losses.py: logits [B, T, V], mask [B, T] -> [B, T], exactly 0
where masked. Differentiable, so gradients can be compared too. Inputs are expected clean at
unmasked positions (the tests poison only rayd's inputs); masked positions may hold anything.

rayd trains through `batch_loss` alone; these are what it is checked against (verl keeps its
oracles in its tests the same way, tests/.../test_core_algos_on_cpu.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _kl(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_i p_i (log p_i - log q_i) over the last dim; bins with p_i = 0 add nothing."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros((), dtype=p.dtype)).sum(-1)


def divergence(
    kind: str, log_s: Tensor, log_t: Tensor, beta: float = 0.5, skew: float = 0.1
) -> Tensor:
    """The divergence `kind` between student and teacher log-probs over the last dim [..., N]
    -> [...]. jsd is TRL's generalized JSD (m = beta p_T + (1 - beta) p_S; beta 0 = forward
    KL, 1 = reverse KL); skew_kl is DistiLLM's KL(p_T || skew p_T + (1 - skew) p_S),
    skew_reverse_kl KL(p_S || skew p_S + (1 - skew) p_T)."""
    p_s, p_t = log_s.exp(), log_t.exp()
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(p_t, log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(p_s, log_s, log_t)
    if kind == "jsd":
        log_m = (beta * p_t + (1 - beta) * p_s).log()
        return beta * _kl(p_t, log_t, log_m) + (1 - beta) * _kl(p_s, log_s, log_m)
    if kind == "tvd":
        return 0.5 * (p_s - p_t).abs().sum(-1)
    if kind == "skew_kl":
        return _kl(p_t, log_t, (skew * p_t + (1 - skew) * p_s).log())
    if kind == "skew_reverse_kl":
        return _kl(p_s, log_s, (skew * p_s + (1 - skew) * p_t).log())
    raise ValueError(f"no reference for {kind!r}")


def _masked(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype))


def full_vocab(
    kind: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    temperature: float = 1.0,
    **knobs: float,
) -> Tensor:
    """`divergence` over the whole vocabulary, both sides softened by `temperature`."""
    log_s = (student_logits / temperature).log_softmax(-1)
    log_t = (teacher_logits / temperature).log_softmax(-1)
    return _masked(divergence(kind, log_s, log_t, **knobs), mask)


def topk_bins(
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    mask: Tensor,
    tail: bool = True,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the k distinct `ids` [B, T, k] (the teacher's
    log-probs there: `logprobs`), plus one bin for the rest of the vocabulary when `tail`
    (temperature 1; k < V), or both renormalised within the k bins at `temperature`."""
    k = ids.shape[-1]
    keep = mask.unsqueeze(-1)
    ids = torch.where(keep, ids, torch.arange(k))  # masked positions: any valid ids
    logprobs = torch.where(keep, logprobs, torch.full((), -math.log(k + 1), dtype=logprobs.dtype))
    s_k = student_logits.log_softmax(-1).gather(-1, ids)
    if not tail:
        return (s_k / temperature).log_softmax(-1), (logprobs / temperature).log_softmax(-1)
    rest_s = torch.log1p(-s_k.exp().sum(-1, keepdim=True))
    rest_t = torch.log1p(-logprobs.exp().sum(-1, keepdim=True))
    return torch.cat([s_k, rest_s], -1), torch.cat([logprobs, rest_t], -1)


def topk(
    kind: str,
    student_logits: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    mask: Tensor,
    tail: bool = True,
    temperature: float = 1.0,
    **knobs: float,
) -> Tensor:
    """`divergence` over the bins of `topk_bins`."""
    log_s, log_t = topk_bins(student_logits, ids, logprobs, mask, tail, temperature)
    return _masked(divergence(kind, log_s, log_t, **knobs), mask)


def cross_entropy(student_logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """-log p_S(target) at temperature 1."""
    picked = student_logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1))
    return _masked(-picked.squeeze(-1), mask)


def hinton(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Hinton et al. (2015): alpha * T^2 * KL(p_T^T || p_S^T) + (1 - alpha) * CE at 1."""
    soft = full_vocab("forward_kl", student_logits, teacher_logits, mask, temperature)
    hard = cross_entropy(student_logits, targets, mask)
    return alpha * temperature**2 * soft + (1 - alpha) * hard
