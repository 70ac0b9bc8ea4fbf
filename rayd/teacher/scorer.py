"""The teacher-scoring interface and the checks every score passes before it leaves a worker.

A score covers the completion tokens of one (prompt_ids, completion_ids) pair: for each completion
token, the teacher's log-prob of that token given everything before it, and the teacher's top-k
(ids, log-probs), sorted descending. All at temperature 1: vLLM scores prompts at temperature 1
(its prompt log-probs never go through the sampler), and the transformers backend matches it. A
teacher temperature other than 1 is the loss's business, and with top-k only it is approximate
(renormalising needs the whole distribution), so it must not be applied silently here.

A failed or partial score is an error, never a zero signal: training would take zeros for the
teacher's log-probs, silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from rayd.types import TeacherScore

Pair = tuple[list[int], list[int]]  # (prompt_ids, completion_ids)


class TeacherSignalError(RuntimeError):
    """The teacher returned missing or non-finite values where a signal is required."""


class TeacherScorer(Protocol):
    def score(self, pairs: list[Pair], top_k: int) -> list[TeacherScore]: ...


def check_scores(pairs: list[Pair], scores: list[TeacherScore], top_k: int) -> None:
    """Shapes, dtypes and finiteness of every required position; one error listing the damage."""
    if len(scores) != len(pairs):
        raise TeacherSignalError(f"{len(scores)} teacher scores for {len(pairs)} pairs")
    bad_positions, total = 0, 0
    problems: list[str] = []
    for i, ((_, completion), score) in enumerate(zip(pairs, scores, strict=True)):
        t = len(completion)
        total += t
        shapes = (
            tuple(score.token_logprobs.shape),
            tuple(score.topk_ids.shape),
            tuple(score.topk_logprobs.shape),
        )
        if shapes != ((t,), (t, top_k), (t, top_k)):
            problems.append(f"pair {i}: shapes {shapes} for {t} tokens and top_k={top_k}")
            bad_positions += t
            continue
        if score.topk_ids.dtype != torch.long:
            problems.append(f"pair {i}: top-k ids of dtype {score.topk_ids.dtype}")
        finite = torch.isfinite(score.token_logprobs) & torch.isfinite(score.topk_logprobs).all(-1)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            bad_positions += bad
            problems.append(f"pair {i}: {bad} of {t} positions not finite")
        if score.hidden is not None and (
            score.hidden.shape[0] != t or not bool(torch.isfinite(score.hidden).all())
        ):
            problems.append(f"pair {i}: hidden states missing or not finite")
        if top_k > 1 and bool((score.topk_logprobs[:, 1:] > score.topk_logprobs[:, :-1]).any()):
            problems.append(f"pair {i}: top-k log-probs not sorted descending")
    if problems:
        raise TeacherSignalError(
            f"invalid teacher signal at {bad_positions}/{total} completion positions: "
            + "; ".join(problems[:5])
        )


def score_from_prompt_logprobs(
    index: int,
    prompt: list[int],
    completion: list[int],
    rows: Sequence[Mapping[int, float] | None] | None,
    top_k: int,
    *,
    source: str,
) -> TeacherScore:
    """A completion's score from vLLM's prompt log-probs of prompt + completion: `rows[t]` maps
    token ids to log-probs at prompt position t (the top k, plus the actual token at t when it
    is not among them). Shared by the in-Ray engine (vllm_scorer) and the served teacher
    (server_scorer), so both make the same score from the same numbers. `source` names who
    answered in the error."""
    t, p = len(completion), len(prompt)
    token_lp = torch.empty(t, dtype=torch.float32)
    topk_ids = torch.empty((t, top_k), dtype=torch.long)
    topk_lp = torch.empty((t, top_k), dtype=torch.float32)
    missing = []
    for j, token in enumerate(completion):
        row = rows[p + j] if rows is not None and p + j < len(rows) else None
        if row is None or token not in row:
            missing.append(j)
            continue
        token_lp[j] = row[token]
        # The actual token is an extra entry only when it is not among the top k.
        entries = [(tok, lp) for tok, lp in row.items() if not (tok == token and len(row) > top_k)]
        entries.sort(key=lambda e: -e[1])
        if len(entries) != top_k or not all(math.isfinite(lp) for _, lp in entries):
            missing.append(j)
            continue
        for col, (tok, lp) in enumerate(entries):
            topk_ids[j, col] = tok
            topk_lp[j, col] = lp
    if missing:
        raise TeacherSignalError(
            f"{source} returned no usable log-probs for {len(missing)}/{t} completion positions "
            f"of pair {index} (first missing position {missing[0]})"
        )
    return TeacherScore(token_logprobs=token_lp, topk_ids=topk_ids, topk_logprobs=topk_lp)
