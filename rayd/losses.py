"""Distillation losses: pure torch, no Ray, no transformers.

Every loss here returns a *per-token* tensor (shape [B, T]) that is exactly 0 where `mask` is
False; callers reduce. The learner sums the per-token loss over its micro-batches and divides by
the global count of loss tokens itself, so a rank with few tokens is not over-weighted; use
`masked_mean` only where one local mean is what you want.

Masked positions may hold anything (padding logits, -inf teacher log-probs, NaN): inputs are
replaced with harmless finite values by `torch.where` *before* any arithmetic, because a NaN
that reaches a product poisons the gradient even when the product is masked out afterwards
(0 * NaN = NaN in the backward pass). For the student this costs one [B, T, V] copy of the
logits, which takes the raw logits' place in the autograd graph: callers should not keep another
reference to the raw logits alive across backward.

Shapes: B batch, T target positions (L - 1 in a TrainBatch), V vocabulary, k teacher top-k width.
Distributions: p_T teacher, p_S student; forward KL = KL(p_T || p_S), reverse KL = KL(p_S || p_T).

The learner's entry point is `batch_loss`: one shared preparation (`LossContext`), the loss
named by `LossSpec.kind` from the table `LOSSES` (add one with `@register(name)`), one shared
finish. The other public functions are the pieces it is built of that other rooms use too
(`token_logprobs`, `full_vocab_rows`, `sequence_reward_pg`). The oracles the table is tested
against are in tests/reference_losses.py, written without this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rayd.types import TrainBatch

LossKind = Literal[
    "on_policy_pg",
    "forward_kl",
    "reverse_kl",
    "jsd",
    "tvd",
    "skew_kl",
    "skew_reverse_kl",
    "sft",
    "logit_kd",
    "feature_kd",
]


@dataclass(frozen=True)
class LossSpec:
    """Which loss `batch_loss` computes, and its knobs. `kind` names an entry of `LOSSES`."""

    kind: LossKind
    beta: float = 0.5  # jsd only: 0 = forward KL, 1 = reverse KL (TRL's convention)
    temperature: float = 1.0
    tail: bool = True  # top-k modes: add a tail bin for the mass outside the teacher's top-k
    is_clip: float | None = None  # on_policy_pg: truncate the importance ratio at this value
    alpha: float = 0.5  # logit_kd: weight of the soft-target term (1 - alpha: hard CE)
    # feature_kd: (student, teacher) hidden-state index pairs, the teacher's hidden size (the
    # projections' output), the distance and the weight of the feature term
    feature_pairs: tuple[tuple[int, int], ...] = ()
    teacher_hidden_size: int = 0
    feature_kind: Literal["mse", "cosine"] = "mse"
    feature_weight: float = 1.0
    # teacher.support=full: the divergence over the whole vocabulary, from the teacher's logits
    # (`batch_loss(teacher_logits=...)`); the top-k fields of the batch are then unused
    full_vocab: bool = False
    skew: float = 0.1  # skew_kl, skew_reverse_kl: DistiLLM's alpha, in [0, 1) (0 = plain KL)
    # Distillation plus a task reward: the loss is distill_weight * (the loss above) +
    # reward_weight * `sequence_reward_pg` of batch.advantage, on the rows that carry one.
    distill_weight: float = 1.0
    reward_weight: float = 0.0
    # Position-weighted OPD (`position_weights`): iw_opd multiplies each token's distillation
    # loss by 1 + iw_opd_gamma * (the share of its completion's discrepancy still ahead of it).
    position_weighting: Literal["none", "iw_opd"] = "none"
    iw_opd_gamma: float = 0.5
    iw_opd_epsilon: float = 1e-8

    def __post_init__(self) -> None:
        entry = LOSSES.get(self.kind)
        if entry is None:
            raise ValueError(f"unknown loss kind {self.kind!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"loss beta must lie in [0, 1], got {self.beta}")
        if not self.temperature > 0.0:
            raise ValueError(f"loss temperature must be > 0, got {self.temperature}")
        if self.is_clip is not None and not self.is_clip > 0.0:
            raise ValueError(f"loss is_clip must be > 0 or None, got {self.is_clip}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"loss alpha must lie in [0, 1], got {self.alpha}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"loss skew must lie in [0, 1), got {self.skew}")
        if self.full_vocab and not entry.full_vocab:
            names = [name for name, e in LOSSES.items() if e.full_vocab]
            raise ValueError(
                f"full_vocab applies to {', '.join(names[:-1])} and {names[-1]}, not {self.kind}"
            )
        if entry.bins and self.tail and not self.full_vocab and self.temperature != 1.0:
            raise ValueError(_TAIL_TEMPERATURE_ERROR.format(t=self.temperature))
        if self.kind in ("sft", "feature_kd") and self.temperature != 1.0:
            raise ValueError(f"{self.kind} uses CE at temperature 1, got {self.temperature}")
        if self.kind == "feature_kd" and not (self.feature_pairs and self.teacher_hidden_size):
            raise ValueError("feature_kd needs feature_pairs and teacher_hidden_size")
        if self.feature_weight < 0.0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")
        if self.position_weighting not in ("none", "iw_opd"):
            raise ValueError(f"unknown position weighting {self.position_weighting!r}")
        if (
            self.position_weighting != "none"
            and not entry.divergence
            and self.kind != "on_policy_pg"
        ):
            raise ValueError(
                f"position weighting applies to the on-policy losses (on_policy_pg and the "
                f"divergences), not {self.kind}"
            )
        if self.iw_opd_gamma < 0.0 or not self.iw_opd_epsilon > 0.0:
            raise ValueError(
                f"iw_opd needs gamma >= 0 and epsilon > 0, got {self.iw_opd_gamma} and "
                f"{self.iw_opd_epsilon}"
            )
        if self.distill_weight < 0.0 or self.reward_weight < 0.0:
            raise ValueError(
                f"distill_weight and reward_weight must be >= 0, got {self.distill_weight} "
                f"and {self.reward_weight}"
            )


_TAIL_TEMPERATURE_ERROR = (
    "top-k distillation with tail=True needs temperature 1.0 (got {t}): the teacher's top-k "
    "log-probs arrive at temperature 1 and the tail mass cannot be re-tempered without the "
    "teacher's full logits; set tail=False (re-tempers within the k bins) or temperature=1.0"
)


# ---------------------------------------------------------------------------------------------
# Helpers


def _zero_masked(x: Tensor, mask: Tensor, fill: float = 0.0) -> Tensor:
    """`x` where `mask` is True, `fill` elsewhere; mask [B, T] broadcasts over trailing dims."""
    while mask.dim() < x.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, x, torch.full((), fill, dtype=x.dtype, device=x.device))


def _as_float(x: Tensor) -> Tensor:
    # bf16/fp16 log-sum-exps lose ~1e-2 nats over a large vocabulary: do the maths in fp32.
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the last dim. [..., N] log-probs -> [...].

    Bins where p is 0 (log_p = -inf) contribute 0, and their gradient is 0 rather than NaN:
    the difference is replaced before it meets the product.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros((), dtype=p.dtype, device=p.device))
    return (p * diff).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(weight_p * p + (1 - weight_p) * q), computed in log space. 0 < weight_p < 1."""
    return torch.logsumexp(
        torch.stack([log_p + math.log(weight_p), log_q + math.log1p(-weight_p)]), dim=0
    )


def _generalized_jsd_lp(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Generalized JSD of GKD on log-probs [..., N] -> [...], with TRL's mixture convention.

    Convention read in huggingface/trl: `GKDTrainer.generalized_jsd_loss`
    (trl/experimental/gkd/gkd_trainer.py) and `_jsd_divergence` of
    trl/experimental/distillation/distillation_trainer.py (DistillationTrainer) agree:
        beta == 0: KL(teacher || student)                      (forward KL)
        beta == 1: KL(student || teacher)                      (reverse KL)
        else:      m = beta * teacher + (1 - beta) * student
                   beta * KL(teacher || m) + (1 - beta) * KL(student || m)
    (TRL builds m with logsumexp over [student + log(1 - beta), teacher + log(beta)], as here.)
    The interior formula tends to 0 (not to the KLs) as beta -> 0 or 1, so the two ends are
    special cases there and here; rayd is benchmarked against TRL with the same beta. TRL's
    per-token value is the same sum over the vocabulary; its "batchmean" then divides by the
    number of completion tokens, as rayd's learner does.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD beta must lie in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = _log_mix(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _tvd_lp(log_s: Tensor, log_t: Tensor) -> Tensor:
    """Total variation distance 0.5 * sum |p_S - p_T| of log-probs [..., N] -> [...]."""
    return 0.5 * (log_s.exp() - log_t.exp()).abs().sum(-1)


def _skew_kl_lp(log_s: Tensor, log_t: Tensor, alpha: float, reverse: bool) -> Tensor:
    """DistiLLM's skew KL of log-probs [..., N] -> [...] (see `skew_kl`)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew KL alpha must lie in [0, 1), got {alpha}")
    log_p, log_q = (log_s, log_t) if reverse else (log_t, log_s)
    log_m = log_q if alpha == 0.0 else _log_mix(log_p, log_q, alpha)
    return _kl(log_p, log_m)


def _per_token(x: Tensor, mask: Tensor) -> Tensor:
    return _zero_masked(x, mask)


def full_vocab_rows(
    student_rows: Tensor,
    teacher_rows: Tensor,
    targets: Tensor,
    kind: str,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """The divergence over the whole vocabulary at N positions: logits [N, V] -> [N], plus
    the tempered log-probs of `targets` [N] under student and teacher ([N] each, detached),
    which the same pass over the rows yields for free.

    kind as in `full_vocab_divergence`. The teacher is detached. A student wanting gradients
    gets them in closed form (`_FullVocabDivergence`).
    """
    if student_rows.shape != teacher_rows.shape or student_rows.dim() != 2:
        raise ValueError(
            f"student rows {tuple(student_rows.shape)} and teacher rows "
            f"{tuple(teacher_rows.shape)} must be the same [N, V] (vocabulary sizes must match)"
        )
    if kind == "logit_kd":
        kind = "forward_kl"
    if kind not in ("forward_kl", "reverse_kl", "jsd"):
        raise ValueError(f"no full-vocabulary divergence for loss kind {kind!r}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized JSD beta must lie in [0, 1], got {beta}")
    if kind == "jsd" and beta in (0.0, 1.0):  # the interior formula is 0 at the ends
        kind = "forward_kl" if beta == 0.0 else "reverse_kl"
    return _FullVocabDivergence.apply(
        student_rows, teacher_rows.detach(), targets, kind, beta, temperature
    )


def _scatter_rows(rows: Tensor, mask: Tensor) -> Tensor:
    """[N] values at the mask's positions (row-major) -> [B, T], 0 elsewhere; differentiable."""
    return torch.zeros(mask.shape, dtype=rows.dtype, device=rows.device).masked_scatter(mask, rows)


# Rows of a [N, V] divergence handled at once: 64 x 49,152 floats (12 MiB) stay in cache for
# the dozen elementwise passes, where whole [N, V] tensors would go to memory and back each time.
_CHUNK_ROWS = 64


class _FullVocabDivergence(torch.autograd.Function):
    """A divergence between softmax(z / T) (student) and softmax(teacher_z / T), [N, V] -> [N],
    with its gradient in closed form, computed in the forward pass chunk by chunk: autograd
    through log_softmax, the log-space mixture and the KLs keeps about a dozen [N, V] tensors
    and makes as many passes over memory; this keeps one (dJ/dz) and reads each input once.
    Inputs may be bf16/fp16: each chunk is taken to fp32, and dJ/dz comes back in z's dtype.

    With p = softmax(z / T), t = softmax(teacher_z / T) and d = log p - log r, every kind here
    has dJ/dp_i = c * d_i + const (the const cancels in the softmax Jacobian), so
        dJ/dz = (c / T) * p * (d - sum_i p_i d_i)
    reverse KL: r = t, c = 1; JSD (TRL's convention, m = beta t + (1 - beta) p): r = m,
    c = 1 - beta; forward KL: dJ/dz = (p - t) / T.

    Two more outputs, not differentiable: log p(targets) and log t(targets), [N] each.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        z: Tensor,
        teacher_z: Tensor,
        targets: Tensor,
        kind: str,
        beta: float,
        temperature: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        want_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        n = z.shape[0]
        values = z.new_empty(n, dtype=_as_float(z[:0]).dtype)
        student_lp = torch.empty_like(values)
        teacher_lp = torch.empty_like(values)
        dz = torch.empty_like(z) if want_grad else None
        picked = targets.unsqueeze(-1)
        for start in range(0, n, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            log_s = torch.log_softmax(_as_float(z[rows]) / temperature, dim=-1)
            log_t = torch.log_softmax(_as_float(teacher_z[rows]) / temperature, dim=-1)
            student_lp[rows] = log_s.gather(-1, picked[rows]).squeeze(-1)
            teacher_lp[rows] = log_t.gather(-1, picked[rows]).squeeze(-1)
            p_s = log_s.exp()
            if kind == "forward_kl":
                p_t = log_t.exp()
                values[rows] = (p_t * torch.where(p_t > 0, log_t - log_s, 0.0)).sum(-1)
                grad = (p_s - p_t) / temperature if want_grad else None
            else:
                if kind == "reverse_kl":
                    d, scale = log_s - log_t, 1.0
                else:
                    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
                    d, scale = log_s - log_m, 1.0 - beta
                mean_d = (p_s * d).sum(-1, keepdim=True)  # E_p[d], in the value and the grad
                if kind == "reverse_kl":
                    values[rows] = mean_d.squeeze(-1)
                else:
                    # where t = 0 its term is 0 (log_t = -inf must not meet a 0 in a product)
                    t_part = torch.where(log_t > -math.inf, log_t - log_m, 0.0)
                    t_term = (log_t.exp() * t_part).sum(-1)
                    values[rows] = beta * t_term + scale * mean_d.squeeze(-1)
                grad = p_s * (d - mean_d) * (scale / temperature) if want_grad else None
            if dz is not None and grad is not None:
                dz[rows] = grad
        ctx.save_for_backward(dz)
        ctx.mark_non_differentiable(student_lp, teacher_lp)
        return values, student_lp, teacher_lp

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor, *_: Tensor
    ) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (dz,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return dz * grad.unsqueeze(-1).to(dz.dtype), None, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Sparse top-k divergences (the teacher sent only its top-k log-probs)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _tail_log_mass(topk_logprobs: Tensor) -> Tensor:
    """log(1 - sum_k exp(lp_k)) for log-probs [..., k] -> [..., 1].

    Rounding can push the top-k sum to or past 1 (k = V, or a teacher whose mass is all in the
    k): the log-sum is clamped just below 0 so the tail stays a tiny finite bin instead of
    log(0) = -inf or log(negative) = NaN. The clamp also stops the gradient through a tail that
    is rounding noise. (TRL's `_add_tail_bucket` in its distillation trainers does the same with
    a fixed ceiling of -1e-7.)
    """
    log_in = torch.logsumexp(topk_logprobs, dim=-1, keepdim=True)
    # float32 resolves 1 - 2^-24; going closer to 0 makes log(-expm1) meaningless noise.
    ceiling = math.log1p(-torch.finfo(log_in.dtype).eps)
    return _log1mexp(log_in.clamp(max=ceiling))


# An empty bin: exp(-1e4) is exactly 0 in float32 and float64, and unlike -inf it keeps the
# JSD's log-mixture (a logsumexp) finite, whose backward would turn -inf - -inf into NaN.
_EMPTY_BIN = -1e4


def _repeated_ids(ids: Tensor) -> Tensor:
    """True where an id already occurred earlier in its row of the last dim. [..., k] -> bool.

    A support built by the caller (the union of two top-k lists, or a student's list) may name a
    token twice; counting its mass twice would break the bins' sum to 1.
    """
    sorted_ids, order = ids.sort(dim=-1, stable=True)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[..., 1:] = sorted_ids[..., 1:] == sorted_ids[..., :-1]
    return torch.zeros_like(repeat).scatter(-1, order, repeat)


def _topk_bins(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    tail: bool,
    temperature: float,
    student_lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probs over the same bins: [B, T, k] (tail=False) or [B, T, k+1].

    Only the k chosen columns of the student's raw logits are gathered: no [B, T, V]
    log-softmax is built (NVIDIA-NeMo/RL#3314: ~2.3 GiB -> ~1 MiB per 4k-token sample at
    V=152k, k=64). tail=True needs the student's log-sum-exp over V, a reduction.

    The ids are any support the caller chose with the teacher's exact log-probs at them: the
    teacher's own top-k (default), the student's top-k (`teacher.support=student_topk`) or both
    (`union`). Nothing here assumes they are sorted or the teacher's most likely tokens: bins
    are order-free, a repeated id becomes an empty bin (probability 0 on both sides), and the
    tail is whatever mass the distinct ids leave. Any such partition of the vocabulary gives a
    divergence between the binned distributions, at most the full-vocabulary one and equal to
    it when the ids cover every token (k = V: the tail is a clamped speck, see
    `_tail_log_mass`).

    Temperature (tail=False only): the teacher's top-k log-probs arrive at temperature 1
    (vLLM prompt_logprobs), so both sides are re-tempered within the k bins, log_softmax(lp / t).
    That is exact for the distribution *restricted to the k tokens*, but only an approximation
    of the full tempered distribution, whose mass outside the k is unknown.
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail and temperature != 1.0:
        raise ValueError(_TAIL_TEMPERATURE_ERROR.format(t=temperature))
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(
            f"teacher top-k ids {tuple(teacher_topk_ids.shape)} and log-probs "
            f"{tuple(teacher_topk_logprobs.shape)} differ in shape"
        )
    k = teacher_topk_ids.shape[-1]
    vocab = student_logits.shape[-1]
    ids = _zero_masked(teacher_topk_ids, mask)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"teacher top-k ids span [{int(ids.min())}, {int(ids.max())}] but the student "
            f"vocabulary has {vocab} entries: teacher and student must share a tokenizer, and "
            "the teacher's padded vocabulary rows must never be in its top-k"
        )
    # Masked positions (all ids 0 there) are left out of the repeat check: they keep their
    # uniform filler below and stay a valid distribution.
    repeated = _repeated_ids(ids) & mask.unsqueeze(-1)
    # A masked position becomes a valid uniform distribution over k+1 bins: finite everywhere.
    log_t = _zero_masked(_as_float(teacher_topk_logprobs.detach()), mask, -math.log(k + 1))
    logits = _zero_masked(student_logits, mask)
    s_k = _as_float(torch.gather(logits, -1, ids))
    # -inf first, so the softmax within k (tail=False) and the tail mass (tail=True) skip the
    # repeats; replaced by the finite empty bin at the end.
    log_t = log_t.masked_fill(repeated, -math.inf)
    s_k = s_k.masked_fill(repeated, -math.inf)
    if not tail:
        log_s, log_t = F.log_softmax(s_k / temperature, -1), F.log_softmax(log_t / temperature, -1)
    else:
        if student_lse is None:
            student_lse = torch.logsumexp(_as_float(logits), dim=-1)
        else:
            student_lse = _zero_masked(student_lse, mask)
        log_s = s_k - student_lse.unsqueeze(-1)
        log_s = torch.cat([log_s, _tail_log_mass(log_s)], dim=-1)
        log_t = torch.cat([log_t, _tail_log_mass(log_t)], dim=-1)
    if not bool(repeated.any()):
        return log_s, log_t
    empty = F.pad(repeated, (0, log_s.shape[-1] - k))
    return log_s.masked_fill(empty, _EMPTY_BIN), log_t.masked_fill(empty, _EMPTY_BIN)


# ---------------------------------------------------------------------------------------------
# Sampled-token losses


def token_logprobs(
    logits: Tensor, targets: Tensor, mask: Tensor | None = None, lse: Tensor | None = None
) -> Tensor:
    """log p(targets) per position: the target logit minus the log-sum-exp over V.

    No [B, T, V] log-softmax is materialised. logits [B, T, V], targets [B, T] int64,
    mask [B, T] bool (positions outside it may hold any target id, e.g. -100) -> [B, T],
    0 where masked. `lse` [B, T] may be passed when already computed.
    """
    if mask is not None:
        logits = _zero_masked(logits, mask)
        targets = _zero_masked(targets, mask)
    if lse is None:
        lse = torch.logsumexp(_as_float(logits), dim=-1)
    picked = _as_float(torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1))
    out = picked - lse
    return out if mask is None else _per_token(out, mask)


def policy_gradient(
    student_logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantage: Tensor,
    mask: Tensor,
    is_clip: float | None = None,
) -> Tensor:
    """Importance-sampled policy gradient: -ratio * advantage per token. All [B, T] -> [B, T].

    ratio = exp(student_lp - behavior_lp) corrects for rollouts sampled by stale weights; the
    advantage is detached. Its gradient is -ratio * advantage * d(student_lp); at ratio 1,
    -advantage * d(student_lp).

    is_clip: truncated importance sampling. The weight min(ratio, is_clip) is detached and
    multiplies the score function, so a truncated token still gets the gradient
    -is_clip * advantage * d(student_lp) (rather than none, as a clamp of the ratio would give).
    Without truncation value and gradient equal those of -ratio * advantage.
    """
    zero = torch.zeros((), dtype=student_logprobs.dtype, device=student_logprobs.device)
    s = torch.where(mask, student_logprobs, zero)
    b = torch.where(mask, behavior_logprobs.detach(), zero)
    a = torch.where(mask, advantage.detach().to(s.dtype), zero)
    log_ratio = s - b
    if is_clip is None:
        ratio = log_ratio.exp()
    else:
        if not is_clip > 0.0:
            raise ValueError(f"is_clip must be > 0, got {is_clip}")
        # Clamping in log space first keeps exp() from overflowing on wildly stale tokens.
        weight = log_ratio.detach().clamp(max=math.log(is_clip)).exp()
        ratio = weight * (s - s.detach()).exp()
    return _per_token(-ratio * a, mask)


def token_reverse_kl_pg(
    student_logprobs: Tensor,
    behavior_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    is_clip: float | None = None,
) -> Tensor:
    """Per-token reverse-KL policy gradient of on-policy distillation. All inputs [B, T] -> [B, T].

    Thinking Machines' "On-Policy Distillation" (Tinker recipe): the per-token reward is the
    negative sampled-token reverse KL, so advantage = teacher_lp - behavior_lp (detached), and
    the loss is `policy_gradient` of it.
    """
    advantage = teacher_logprobs.detach() - behavior_logprobs.detach()
    return policy_gradient(student_logprobs, behavior_logprobs, advantage, mask, is_clip)


def sequence_reward_pg(
    student_logprobs: Tensor,
    behavior_logprobs: Tensor,
    advantage: Tensor,
    mask: Tensor,
    is_clip: float | None = None,
) -> Tensor:
    """A sequence-level reward's policy gradient on every token of its row: REINFORCE with a
    baseline. advantage [B] (the row's reward minus the baseline, detached); the others
    [B, T] -> [B, T]. Summed over a row's tokens, its gradient is -advantage times the
    gradient of the row's log-probability (ratio 1)."""
    if advantage.shape != mask.shape[:1]:
        raise ValueError(f"advantages {tuple(advantage.shape)} do not match {mask.shape[0]} rows")
    per_token = advantage.to(mask.device).unsqueeze(-1).expand(mask.shape)
    return policy_gradient(student_logprobs, behavior_logprobs, per_token, mask, is_clip)


# Truncation of the stale-row importance weight when algorithm.is_clip is unset: the cap of
# truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings
# you off-policy RL training"; verl's rollout IS threshold defaults to 2): one step of lag moves
# few tokens' ratios far from 1, and a cap of 2 bounds the variance a rare token can add while
# leaving the typical ratio (close to 1) untouched.
STALE_IS_CLIP = 2.0


def stale_importance_weight(
    student_logprobs: Tensor,
    behavior_logprobs: Tensor,
    stale: Tensor,
    mask: Tensor,
    clip: float = STALE_IS_CLIP,
) -> Tensor:
    """Per-token truncated importance weight min(exp(student_lp - behavior_lp), clip) for the
    rows sampled by older weights than the learner's. [B, T], [B, T], stale [B] bool,
    mask [B, T] -> [B, T] float32, detached.

    A top-k loss at a position of a stale rollout is a divergence at a prefix the current
    student would have drawn with a different probability; the per-token ratio of the sampled
    token corrects for that to first order (token-level IS, as in PPO-style objectives), and
    the truncation keeps a token whose probability rose sharply from dominating the step.
    The weight is detached: it scales the loss's gradient and nothing flows through it, so the
    gradient of w * loss is w * d(loss). Fresh rows (stale False), and masked positions, get
    exactly 1, so a batch without stale rows is trained as before.
    """
    if not clip > 0.0:
        raise ValueError(f"importance weight clip must be > 0, got {clip}")
    if stale.shape != mask.shape[:1]:
        raise ValueError(f"stale flags {tuple(stale.shape)} do not match {mask.shape[0]} rows")
    zero = torch.zeros((), dtype=student_logprobs.dtype, device=student_logprobs.device)
    log_ratio = torch.where(mask, student_logprobs.detach() - behavior_logprobs.detach(), zero)
    # Clamping in log space first: a wildly stale token cannot overflow exp().
    weight = log_ratio.clamp(max=math.log(clip)).exp().float()
    use = stale.to(mask.device).unsqueeze(-1) & mask
    return torch.where(use, weight, torch.ones_like(weight))


def feature_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    projection: nn.Module,
    mask: Tensor,
    kind: Literal["mse", "cosine"] = "mse",
) -> Tensor:
    """Hidden-state matching per token (FitNets-style). -> [B, T].

    student_hidden [B, T, Ds] is mapped by `projection` (e.g. nn.Linear(Ds, Dt), trained with
    the student) to [B, T, Dt] and compared with teacher_hidden [B, T, Dt] (detached):
    "mse" = mean over Dt of the squared difference, "cosine" = 1 - cosine similarity.
    """
    s = projection(_zero_masked(student_hidden, mask))
    t = _zero_masked(teacher_hidden.detach(), mask)
    if s.shape != t.shape:
        raise ValueError(
            f"projected student hidden {tuple(s.shape)} does not match teacher hidden "
            f"{tuple(t.shape)}"
        )
    if kind == "mse":
        per_token = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_token = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"feature_loss kind must be 'mse' or 'cosine', got {kind!r}")
    return _per_token(per_token, mask)


def position_weights(discrepancy: Tensor, mask: Tensor, gamma: float, epsilon: float) -> Tensor:
    """IW-OPD's per-token weights (arXiv 2606.22600; TRL's `trl.experimental.iw_opd`), detached.

    discrepancy [B, T] >= 0 (any value where `mask` is False), mask [B, T] -> [B, T] float:
        w_t = 1 + gamma * (1 - P_t / max(Z, epsilon)),
    P_t the discrepancy of the row's tokens before t (exclusive prefix sum), Z the row's total:
    1 + gamma at a row's first token, falling towards 1 as its discrepancy accumulates, never
    rising; 1 + gamma everywhere on a row without any. A row is one completion, so nothing
    crosses from one sample to another. Not normalised (TRL neither): the weights' mean is
    between 1 and 1 + gamma. 0 where masked.
    """
    d = torch.where(mask, discrepancy.detach().abs(), torch.zeros((), dtype=discrepancy.dtype))
    before = d.cumsum(-1) - d
    total = d.sum(-1, keepdim=True).clamp(min=epsilon)
    weights = 1.0 + gamma * (1.0 - before / total)
    return torch.where(mask, weights, torch.zeros((), dtype=weights.dtype))


def position_weight_metrics(weights: Tensor, mask: Tensor, quarters: int = 4) -> dict[str, Tensor]:
    """Where the position weights put the signal, as [B, T] tensors the learner sums over the
    step: the weight itself and its square (mean and spread), and per quarter q of each
    completion (by relative position) the weight and the token count there, whose ratio the
    driver reports as that quarter's mean weight (`metrics.position_weight_means`)."""
    index = mask.long().cumsum(-1) - 1  # each token's place in its completion
    length = mask.sum(-1, keepdim=True).clamp(min=1)
    quarter = torch.div(index * quarters, length, rounding_mode="floor")
    out = {"iw_opd/weight": weights, "iw_opd/weight_sq": weights.square()}
    for q in range(quarters):
        where = mask & (quarter == q)
        out[f"iw_opd/weight_q{q + 1}"] = torch.where(where, weights, 0.0)
        out[f"iw_opd/tokens_q{q + 1}"] = where.to(weights.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# The loss table: each loss by name, a function of batch_loss's shared preparation

LossOut = tuple[Tensor, dict[str, Tensor]]


@dataclass
class LossContext:
    """batch_loss's preparation of one TrainBatch: everything a loss in `LOSSES` reads.

    The [B, T] tensors are 0 where `mask` is False.
      student_lp:   log p_S(target) at spec.temperature, with its gradient (under
                    spec.full_vocab detached: `full` carries the gradient there)
      behavior:     the behaviour policy's log p(target), detached; on dataset rows
                    (batch.on_policy False) the student's own, detached
      teacher_lp:   log p_T(target) at temperature 1, detached
      ce_logprobs:  log p_S(target) at temperature 1 with its gradient, built when called
                    (the hard-label terms)
      log_s, log_t: [B, T, k] (tail=False) or [B, T, k+1] student and teacher log-probs over
                    the teacher's top-k bins (`_topk_bins`), for entries with bins=True when
                    spec.full_vocab is False; else None
      full:         under spec.full_vocab, the divergence spec.kind names over the whole
                    vocabulary (logit_kd: its soft term, the forward KL), with its gradient
      student_hidden, projections: feature_kd's hidden states and projections (batch_loss's)
    """

    spec: LossSpec
    batch: TrainBatch
    mask: Tensor
    student_lp: Tensor
    behavior: Tensor
    teacher_lp: Tensor
    ce_logprobs: Callable[[], Tensor]
    log_s: Tensor | None = None
    log_t: Tensor | None = None
    full: Tensor | None = None
    student_hidden: list[Tensor] | None = None
    projections: nn.ModuleList | None = None

    def divergence(self, of_bins: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """The per-token divergence [B, T]: `full` under spec.full_vocab (prepared for
        spec.kind), else of_bins(log_s, log_t) over the top-k bins."""
        if self.full is not None:
            return self.full
        if self.log_s is None or self.log_t is None:
            raise ValueError(f"loss {self.spec.kind!r} reads the top-k bins but has none")
        return _per_token(of_bins(self.log_s, self.log_t), self.mask)


@dataclass(frozen=True)
class LossEntry:
    """One loss of `LOSSES`: fn(ctx) -> (per-token loss [B, T], the loss's own metrics)."""

    fn: Callable[[LossContext], LossOut]
    # reads the teacher's top-k bins (ctx.log_s, ctx.log_t): tail=True then needs temperature 1
    bins: bool
    # a divergence between the two distributions at every position: stale rows get the
    # truncated importance weight, and teacher.support may choose its bins' ids
    divergence: bool
    # has a whole-vocabulary form (teacher.support=full, `full_vocab_rows`)
    full_vocab: bool


LOSSES: dict[str, LossEntry] = {}


def register(
    name: str, *, bins: bool = False, divergence: bool = False, full_vocab: bool = False
) -> Callable[[Callable[[LossContext], LossOut]], Callable[[LossContext], LossOut]]:
    """Add fn to `LOSSES` under `name` (a divergence reads the bins)."""

    def add(fn: Callable[[LossContext], LossOut]) -> Callable[[LossContext], LossOut]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = LossEntry(fn, bins or divergence, divergence, full_vocab)
        return fn

    return add


@register("on_policy_pg")
def _on_policy_pg(c: LossContext) -> LossOut:
    """Reverse-KL policy gradient on the sampled token (`token_reverse_kl_pg`)."""
    loss = token_reverse_kl_pg(c.student_lp, c.behavior, c.teacher_lp, c.mask, c.spec.is_clip)
    ratio = torch.where(c.mask, (c.student_lp.detach() - c.behavior).exp(), 0.0)
    return loss, {"ratio": ratio}


@register("forward_kl", divergence=True, full_vocab=True)
def _forward_kl(c: LossContext) -> LossOut:
    """KL(p_T || p_S)."""
    return c.divergence(lambda log_s, log_t: _kl(log_t, log_s)), {}


@register("reverse_kl", divergence=True, full_vocab=True)
def _reverse_kl(c: LossContext) -> LossOut:
    """KL(p_S || p_T)."""
    return c.divergence(_kl), {}


@register("jsd", divergence=True, full_vocab=True)
def _jsd(c: LossContext) -> LossOut:
    """Generalized JSD(spec.beta), TRL's convention (`_generalized_jsd_lp`)."""
    return c.divergence(lambda log_s, log_t: _generalized_jsd_lp(log_s, log_t, c.spec.beta)), {}


@register("tvd", divergence=True)
def _tvd(c: LossContext) -> LossOut:
    """Total variation distance 0.5 * sum |p_S - p_T| (`tvd`)."""
    return c.divergence(_tvd_lp), {}


@register("skew_kl", divergence=True)
def _skew_kl(c: LossContext) -> LossOut:
    """DistiLLM's SKL: KL(p_T || skew * p_T + (1 - skew) * p_S) (`skew_kl`)."""
    return c.divergence(lambda log_s, log_t: _skew_kl_lp(log_s, log_t, c.spec.skew, False)), {}


@register("skew_reverse_kl", divergence=True)
def _skew_reverse_kl(c: LossContext) -> LossOut:
    """DistiLLM's SRKL: KL(p_S || skew * p_S + (1 - skew) * p_T) (`skew_kl`, reverse=True)."""
    return c.divergence(lambda log_s, log_t: _skew_kl_lp(log_s, log_t, c.spec.skew, True)), {}


@register("sft")
def _sft(c: LossContext) -> LossOut:
    """Cross-entropy on the targets."""
    return -c.student_lp, {}


@register("logit_kd", bins=True, full_vocab=True)
def _logit_kd(c: LossContext) -> LossOut:
    """Hinton: alpha * T^2 * KL(p_T || p_S) at temperature T + (1 - alpha) * CE at 1."""
    soft = c.divergence(lambda log_s, log_t: _kl(log_t, log_s)) * c.spec.temperature**2
    hard = -c.ce_logprobs()
    loss = c.spec.alpha * soft + (1.0 - c.spec.alpha) * hard
    return loss, {
        "soft_loss": _per_token(soft, c.mask).detach(),
        "hard_loss": _per_token(hard, c.mask).detach(),
    }


@register("feature_kd")
def _feature_kd(c: LossContext) -> LossOut:
    """CE + spec.feature_weight * the mean `feature_loss` over spec.feature_pairs."""
    if c.student_hidden is None or c.projections is None:
        raise ValueError("feature_kd needs the student's hidden states and the projections")
    teacher_hidden = c.batch.teacher_hidden
    if teacher_hidden.ndim != 4:
        raise ValueError("feature_kd needs teacher hidden states in the batch")
    features = torch.stack(
        [
            feature_loss(
                hidden, teacher_hidden[:, :, i], c.projections[i], c.mask, c.spec.feature_kind
            )
            for i, hidden in enumerate(c.student_hidden)
        ]
    ).mean(0)
    loss = -c.student_lp + c.spec.feature_weight * features
    return loss, {
        "token_loss": _per_token(-c.student_lp, c.mask).detach(),
        "feature_loss": features.detach(),
    }


# ---------------------------------------------------------------------------------------------
# The learner's entry point: prepare, the loss by name, finish


def batch_loss(
    student_logits: Tensor,
    batch: TrainBatch,
    spec: LossSpec,
    student_hidden: list[Tensor] | None = None,
    projections: nn.ModuleList | None = None,
    teacher_logits: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss of one TrainBatch, unreduced: `LOSSES[spec.kind]` between one shared
    preparation (`_prepare`) and one shared finish (`_finish`).

    student_logits [B, L-1, V], already aligned with targets = batch.input_ids[:, 1:].
    Returns (loss [B, L-1], metrics): loss is exactly 0 where batch.loss_mask is False; the
    learner sums it and divides by the global token count. Metrics are detached [B, L-1]
    tensors, 0 where masked:
      "reverse_kl":      behavior_lp - teacher_lp, the sampled-token reverse-KL estimate
      "student_logprob": log p_S(target) at `spec.temperature` (1 for sft)
      "ratio":           exp(student_lp - behavior_lp) (on_policy_pg only)
      "is_weight":       the divergences' stale-row importance weight (only when some row of
                         the batch is stale: `stale_importance_weight`)

    Kinds: "on_policy_pg" uses teacher/behavior log-probs of the sampled tokens
    (`token_reverse_kl_pg`); "forward_kl" / "reverse_kl" / "jsd" / "tvd" / "skew_kl" /
    "skew_reverse_kl" use the sparse teacher top-k (`topk_*`, spec.tail, spec.beta,
    spec.skew); "sft" is cross-entropy on the targets; "logit_kd" is Hinton's
    alpha * T^2 * KL(teacher_T || student_T) over the teacher's top-k bins plus
    (1 - alpha) * CE at temperature 1 (extra metrics "soft_loss" and "hard_loss", so a user can
    see the two terms' scales).

    "feature_kd" is CE on the targets plus spec.feature_weight times the mean over
    spec.feature_pairs of `feature_loss` between projections[i](student_hidden[i]) and
    batch.teacher_hidden[:, :, i] (student_hidden[i] is [B, L-1, Ds], aligned like the logits);
    metrics "token_loss" and "feature_loss" give the two terms' scales.

    batch.row_weight, when present, multiplies each row's loss (step_by_step's rationale task);
    batch.token_weight, when present, multiplies each token's loss (reasoning-step weights).
    batch.advantage, when present, adds spec.reward_weight times `sequence_reward_pg` of it
    to spec.distill_weight times the loss (metric "reward_loss": the reward term alone).
    Rows with batch.hard_target True (the on-policy modes' label task) take cross-entropy on
    their targets instead of the teacher signal; when the field is present the metrics add
    "label_loss" (their CE) and "label_tokens" (1 on their tokens), and "reverse_kl" is 0 on
    them, so a caller can turn both into means over their own tokens.

    spec.full_vocab (teacher.support=full): `teacher_logits` replace the batch's teacher
    signal: forward_kl / reverse_kl / jsd and logit_kd's soft term are taken over the whole
    vocabulary (`full_vocab_rows`, exact at any temperature), and the teacher's log-probs of
    the targets come from them too. Student and teacher logits are then either [B, L-1, V]
    like the student's above, or [N, V]: only the rows at batch.loss_mask's N positions
    (row-major), which is what the learner passes, having run its output layer only there.

    Rows with batch.on_policy False (dataset completions) carry no behaviour log-probs; for
    them the current student stands in as the behaviour policy (ratio 1), so the pg advantage
    is teacher_lp - student_lp and the "reverse_kl" metric uses the student too.
    """
    ctx = _prepare(student_logits, batch, spec, student_hidden, projections, teacher_logits)
    loss, metrics = LOSSES[spec.kind].fn(ctx)
    return _finish(ctx, loss, metrics)


def _prepare(
    student_logits: Tensor,
    batch: TrainBatch,
    spec: LossSpec,
    student_hidden: list[Tensor] | None,
    projections: nn.ModuleList | None,
    teacher_logits: Tensor | None,
) -> LossContext:
    """Shape checks, tempering, the behaviour fix-up for dataset rows, and the top-k bins or
    the full-vocabulary divergence: the `LossContext` every loss reads."""
    mask = batch.loss_mask
    targets = batch.input_ids[:, 1:]
    if spec.full_vocab != (teacher_logits is not None):
        raise ValueError(
            "full_vocab losses take the teacher's logits (teacher_logits=...), the others do not"
        )
    temperature = spec.temperature
    full = log_s = log_t = None
    if teacher_logits is not None:
        full, student_lp, teacher, ce_logprobs = _full_vocab_terms(
            student_logits, teacher_logits, batch, spec
        )
    else:
        if student_logits.shape[:2] != mask.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} are not aligned with the "
                f"batch's {tuple(mask.shape)} targets (expected [B, L-1, V])"
            )
        logits = _zero_masked(student_logits, mask)
        tempered = logits if temperature == 1.0 else _as_float(logits) / temperature
        lse = torch.logsumexp(_as_float(tempered), dim=-1)
        student_lp = token_logprobs(tempered, targets, mask, lse=lse)
        teacher = batch.teacher_logprobs.to(student_lp.dtype)

        def ce_logprobs() -> Tensor:
            # log p_S(target) at temperature 1, with its gradient: the hard-label terms
            return student_lp if temperature == 1.0 else token_logprobs(logits, targets, mask)

    behavior = batch.behavior_logprobs.to(student_lp.dtype)
    if batch.on_policy.numel() == mask.shape[0]:
        off = ~batch.on_policy.to(mask.device).unsqueeze(-1)
        behavior = torch.where(off, student_lp.detach(), behavior)

    if teacher_logits is None and LOSSES[spec.kind].bins:
        # tail=True forces temperature 1 (LossSpec checks), so the lse above is the right one.
        log_s, log_t = _topk_bins(
            logits,
            batch.teacher_topk_ids,
            batch.teacher_topk_logprobs,
            mask,
            spec.tail,
            temperature,
            student_lse=lse if spec.tail else None,
        )
    return LossContext(
        spec,
        batch,
        mask,
        student_lp,
        behavior,
        teacher,
        ce_logprobs,
        log_s,
        log_t,
        full,
        student_hidden,
        projections,
    )


def _full_vocab_terms(
    student_logits: Tensor, teacher_logits: Tensor, batch: TrainBatch, spec: LossSpec
) -> tuple[Tensor, Tensor, Tensor, Callable[[], Tensor]]:
    """batch_loss's terms under teacher.support=full, each [B, L-1] and 0 where masked: the
    divergence, the student's target log-prob at spec.temperature (detached), the teacher's at
    temperature 1 (detached), and a function giving the student's target log-prob at
    temperature 1 with its gradient (the hard-label terms, computed only when asked for)."""
    mask = batch.loss_mask
    n = int(mask.sum())
    targets = batch.input_ids[:, 1:][mask]
    if student_logits.dim() == 3 and teacher_logits.dim() == 3:
        if student_logits.shape[:2] != mask.shape or teacher_logits.shape[:2] != mask.shape:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} and teacher logits "
                f"{tuple(teacher_logits.shape)} are not aligned with the batch's "
                f"{tuple(mask.shape)} targets (expected [B, L-1, V])"
            )
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    if not (
        student_logits.dim() == teacher_logits.dim() == 2
        and student_logits.shape[0] == teacher_logits.shape[0] == n
    ):
        raise ValueError(
            f"full-vocabulary logits must be [B, L-1, V] or the [N, V] rows at the batch's "
            f"{n} loss positions; got student {tuple(student_logits.shape)}, teacher "
            f"{tuple(teacher_logits.shape)}"
        )
    # One tokenizer can come with differently padded vocab_size (Qwen2.5-0.5B 151936, 7B
    # 152064; the config checks both cover the tokenizer): compare over the shared rows.
    width = min(student_logits.shape[-1], teacher_logits.shape[-1])
    rows, student_lp, teacher_lp = full_vocab_rows(
        student_logits[:, :width],
        teacher_logits[:, :width],
        targets,
        spec.kind,  # logit_kd's soft term is the forward KL
        spec.beta,
        spec.temperature,
    )
    # The pass above saw only the shared rows at spec.temperature; where either side has more,
    # or the teacher's metric wants temperature 1, take the target log-probs over all of V.
    if width != student_logits.shape[-1]:
        student_lp = token_logprobs(_as_float(student_logits.detach()) / spec.temperature, targets)
    if width != teacher_logits.shape[-1] or spec.temperature != 1.0:
        teacher_lp = token_logprobs(teacher_logits.detach(), targets)

    def ce_logprobs() -> Tensor:
        return _scatter_rows(token_logprobs(student_logits, targets), mask)

    return (
        _scatter_rows(rows, mask),
        _scatter_rows(student_lp, mask),
        _scatter_rows(teacher_lp, mask),
        ce_logprobs,
    )


def _finish(
    ctx: LossContext, loss: Tensor, metrics: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The stale-row importance weight (divergences), the hard-target rows' CE, the
    reverse_kl and student_logprob metrics, the row and token weights, and the mask."""
    mask, batch, spec = ctx.mask, ctx.batch, ctx.spec
    if spec.position_weighting == "iw_opd":
        # The sampled-token loss weighs by its own advantage's size (TRL's definition); a
        # dense divergence by its own value at each position.
        if spec.kind == "on_policy_pg":
            discrepancy = ctx.teacher_lp - ctx.behavior
        else:
            discrepancy = loss.detach()
        rows = mask
        if batch.hard_target.numel() == mask.shape[0]:  # label-task rows take plain CE below
            rows = mask & ~batch.hard_target.to(mask.device).unsqueeze(-1)
        weights = position_weights(discrepancy, rows, spec.iw_opd_gamma, spec.iw_opd_epsilon)
        loss = loss * weights.to(loss.dtype)
        metrics.update(position_weight_metrics(weights.detach(), rows))
    if LOSSES[ctx.spec.kind].divergence and batch.stale.numel() == mask.shape[0]:
        # Rollouts from older weights (trainer.max_staleness >= 1): on_policy_pg has its ratio
        # in the loss already; the divergences get the truncated per-token weight.
        weight = stale_importance_weight(
            ctx.student_lp, ctx.behavior, batch.stale, mask, ctx.spec.is_clip or STALE_IS_CLIP
        )
        loss = loss * weight.to(loss.dtype)
        metrics["is_weight"] = _per_token(weight, mask)

    if ctx.spec.distill_weight != 1.0:
        loss = loss * ctx.spec.distill_weight
    if batch.advantage.numel() == mask.shape[0]:
        # The task reward's policy gradient (rows without a reward carry advantage 0).
        reward = sequence_reward_pg(
            ctx.student_lp, ctx.behavior, batch.advantage, mask, ctx.spec.is_clip
        )
        loss = loss + ctx.spec.reward_weight * reward
        metrics["reward_loss"] = reward.detach()

    distilled = mask
    if batch.hard_target.numel() == mask.shape[0]:
        hard = batch.hard_target.to(mask.device).unsqueeze(-1) & mask
        ce = -ctx.ce_logprobs()
        loss = torch.where(hard, ce, loss)
        distilled = mask & ~hard
        metrics["label_loss"] = _per_token(ce, hard).detach()
        metrics["label_tokens"] = hard.to(ctx.student_lp.dtype)
    metrics["reverse_kl"] = _per_token(ctx.behavior - ctx.teacher_lp, distilled).detach()
    metrics["student_logprob"] = ctx.student_lp.detach()
    if batch.row_weight.numel() == mask.shape[0]:
        loss = loss * batch.row_weight.to(loss.device, loss.dtype).unsqueeze(-1)
    if batch.token_weight.shape == mask.shape:
        loss = loss * batch.token_weight.to(loss.device, loss.dtype)
    return _per_token(loss, mask), metrics
