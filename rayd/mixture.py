"""Several teachers' signals as one: the probability-space mixture and the routing rule.

Pure torch and Python, no Ray: the driver (rayd/teacher/group.py) gathers the scores, this module
combines them, and the unit tests check it on hand-made distributions.

Ensemble (You et al. 2017, "Learning from Multiple Teacher Networks": the student learns the
teachers' averaged output distribution):
    p_ens(x) = sum_i w_i p_i(x),   w normalised to sum to 1,
at every completion position. The sampled token's log-prob is exact: every teacher returns it.
The top-k losses compare the two models over a support of token ids plus a tail bin
(`rayd/losses.py: _topk_bins`); here the support is the union of the teachers' supports, and
p_ens at an id needs every teacher's p_i there:
- a teacher whose support holds the id contributes its exact log-prob;
- a teacher whose support does not (vLLM: only its own top-k is known) contributes its tail
  mass spread evenly over the ids outside its support, (1 - sum_support p_i) / (V - k_i). That
  keeps each teacher a sub-distribution over the union, so the ensemble's tail bin stays >= 0,
  but the value is an estimate: the true p_i there lies anywhere in [0, min(p_i(k-th), tail)].
The transformers backend avoids the estimate: the driver has every teacher score the union's
ids exactly (`score_ids`) before mixing, and then no id is missing from any teacher.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from rayd.losses import _repeated_ids, _tail_log_mass
from rayd.types import TeacherScore


def normalised(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to 1; every weight must be > 0 (the config enforces it)."""
    if not weights or any(not w > 0 for w in weights):
        raise ValueError(f"teacher weights must be > 0, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def mix_logprobs(logprobs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """log sum_i w_i exp(logprobs[i]) elementwise, in log space; w normalised. [...] each."""
    w = normalised(weights)
    stacked = torch.stack([lp.float() + math.log(wi) for lp, wi in zip(logprobs, w, strict=True)])
    return torch.logsumexp(stacked, dim=0)


def union_support(topk_ids: Sequence[Tensor]) -> Tensor:
    """The teachers' supports side by side, [T, sum_i k_i]; an id two teachers share appears
    twice (a repeated id is an empty bin for the losses, and `mix_topk` drops the copy)."""
    return torch.cat([ids.long() for ids in topk_ids], dim=-1)


def mix_topk(
    topk_ids: Sequence[Tensor],
    topk_logprobs: Sequence[Tensor],
    weights: Sequence[float],
    vocab_size: int,
    support: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The ensemble's log-probs over a support, by default the union of the teachers'.

    topk_ids[i], topk_logprobs[i]: teacher i's support [T, k_i] and its log-probs there (any
    order; a repeated id is counted once). vocab_size: V, the shared vocabulary the ids come from.
    support: the ids to mix at, [T, M] (default `union_support(topk_ids)`, M = sum_i k_i; the
    caller passes the one support when every teacher scored the same ids, which keeps M = k).
    Returns (ids, log-probs), both [T, M], sorted by the ensemble log-prob, descending. The
    distinct ids come first; when a position has fewer than M distinct ids, the rest of the row
    repeats its last (least likely) entry, which the top-k losses read as empty bins, so
    1 - sum over the distinct ids is the ensemble's tail mass.
    An id missing from teacher i's support gets (1 - sum_support p_i) / (V - k_i) from it (see
    the module doc); with every teacher scored on the whole support nothing is estimated.
    """
    if not (len(topk_ids) == len(topk_logprobs) == len(weights)) or not topk_ids:
        raise ValueError("one support, one set of log-probs and one weight per teacher")
    w = normalised(weights)
    union = union_support(topk_ids) if support is None else support.long()  # [T, M]
    parts = []
    for ids, lps, wi in zip(topk_ids, topk_logprobs, w, strict=True):
        if ids.shape != lps.shape or ids.shape[:-1] != union.shape[:-1]:
            raise ValueError(
                f"teacher support {tuple(ids.shape)} and log-probs {tuple(lps.shape)} do not "
                f"match the other teachers' positions {tuple(union.shape[:-1])}"
            )
        lps = lps.float()
        # Teacher i's log-prob at each union id: its own value where its support has the id.
        match = union.unsqueeze(-1) == ids.long().unsqueeze(-2)  # [T, M, k_i]
        known = match.any(-1)
        exact = torch.where(match, lps.unsqueeze(-2), -math.inf).amax(-1)
        # Elsewhere its tail, spread evenly over the ids it did not report.
        distinct = ~_repeated_ids(ids.long())
        own = torch.where(distinct, lps, -math.inf)
        outside = vocab_size - distinct.sum(-1, keepdim=True)  # [T, 1]
        spread = torch.where(
            outside > 0,
            _tail_log_mass(own) - outside.clamp(min=1).float().log(),
            torch.full_like(outside, -math.inf, dtype=lps.dtype),
        )
        parts.append(torch.where(known, exact, spread) + math.log(wi))
    mixed = torch.logsumexp(torch.stack(parts), dim=0)  # [T, M]
    # Keep one copy of each id; copies sort to the end and take the last distinct entry.
    repeat = _repeated_ids(union)
    values, order = mixed.masked_fill(repeat, -math.inf).sort(dim=-1, descending=True, stable=True)
    ids = union.gather(-1, order)
    last = (~repeat).sum(-1, keepdim=True) - 1  # index of the last distinct entry after sorting
    pad = torch.arange(ids.shape[-1], device=ids.device) > last
    ids = torch.where(pad, ids.gather(-1, last), ids)
    values = torch.where(pad, values.gather(-1, last), values)
    return ids, values


def mix_scores(
    scores: Sequence[TeacherScore],
    weights: Sequence[float],
    vocab_size: int,
    support: Tensor | None = None,
) -> TeacherScore:
    """One sample's ensemble signal from each teacher's score of it: the sampled token's
    log-prob log sum_i w_i p_i (exact) and `mix_topk` over `support` (default: the union of
    their supports)."""
    if any(s.logits is not None or s.hidden is not None for s in scores):
        raise ValueError("full logits and hidden states come from one teacher, not an ensemble")
    ids, lps = mix_topk(
        [s.topk_ids for s in scores],
        [s.topk_logprobs for s in scores],
        weights,
        vocab_size,
        support,
    )
    return TeacherScore(
        token_logprobs=mix_logprobs([s.token_logprobs for s in scores], weights),
        topk_ids=ids,
        topk_logprobs=lps,
    )


def hash_route(index: int, weights: Sequence[float]) -> int:
    """The teacher of prompt `index` under the hash rule: a fixed pseudo-random draw with the
    normalised weights as probabilities. The same prompt always goes to the same teacher (every
    epoch, after a resume, on any machine), and over many prompts the shares approach the
    weights."""
    digest = hashlib.sha256(f"rayd-route:{index}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for i, w in enumerate(normalised(weights)):
        edge += w
        if u < edge:
            return i
    return len(weights) - 1  # u just below 1 and rounding in the running sum
