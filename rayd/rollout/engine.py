"""The interface every rollout backend implements.

Token ids in, token ids out: the worker owns the tokenizer, length checks and `Sample` bookkeeping,
so a backend only has to sample, report the log-probs of what it sampled, and take new weights.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from rayd.sampling import Sampling


class Completion(NamedTuple):
    """One sampled continuation of one prompt."""

    token_ids: list[int]  # includes the eos token when finish_reason == "stop"
    # Log-prob of each sampled token under the distribution it was drawn from: after temperature,
    # top-p and the min-tokens eos mask (see vllm_engine.py for why this choice).
    logprobs: list[float]
    finish_reason: str  # "stop" (eos) | "length" (max_new_tokens reached)
    # [len(token_ids), k] int64 when `return_topk=k` was asked: the k most likely tokens of the
    # same distribution at each step, i.e. the student's support (teacher.support=student_topk).
    topk_ids: torch.Tensor | None = None


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        """Per prompt, `sampling.n` completions of at least one token each (with their top-k
        ids when `sampling.return_topk` > 0). `seeds`: one per prompt, or None to continue the
        engine's stream."""
        ...

    def load_weights(self, blob: bytes) -> None:
        """Replace the weights with a `rayd.weight_sync.serialize_state_dict` blob. (A vLLM
        engine can also join a weight stream: `join_weight_stream`, `receive_weights`,
        `leave_weight_stream`, used with sync.method=stream.)"""
        ...

    def logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced log p(seq[t] | seq[:t]) for t >= 1, at temperature 1: [len(seq) - 1]."""
        ...
