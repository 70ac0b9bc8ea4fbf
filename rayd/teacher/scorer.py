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
