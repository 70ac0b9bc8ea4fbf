"""How a step's completions are drawn: the sampling settings, the seeds, the request.

Plain values with no torch in them, so the config, the driver, the learners and every engine
share them (and a bad setting fails where it is built, before any engine sees it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn: the one value every sampling call takes (rollouts, the
    held-out eval, `rayd generate`, the benches), as vLLM's `SamplingParams` is for vLLM.
    `return_topk=k`: each sample also carries the sampling distribution's k most likely ids at
    every completion position (`Sample.student_topk_ids`)."""

    n: int
    temperature: float  # 0 = greedy
    top_p: float
    max_new_tokens: int
    return_topk: int = 0

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(
                f"need n >= 1 and max_new_tokens >= 1, got {self.n} and {self.max_new_tokens}"
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        if self.return_topk < 0:
            raise ValueError(f"need return_topk >= 0, got {self.return_topk}")

    @classmethod
    def greedy(cls, max_new_tokens: int) -> Sampling:
        """One completion per prompt, the most likely token at every step (accuracy evals)."""
        return cls(n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens)

    @classmethod
    def plain(cls, max_new_tokens: int, temperature: float = 1.0) -> Sampling:
        """One completion per prompt from the model's own distribution at `temperature`."""
        return cls(n=1, temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens)


@dataclass(frozen=True)
class RolloutRequest:
    """One step's sampling request, the same whoever samples (rollout engines, or the learner
    ranks themselves): the prompts, their dataset indices, one seed per prompt computed over
    the whole batch (`prompt_seeds`), how to sample, and the weight version that must serve."""

    prompts: list[list[int]]
    prompt_indices: list[int]
    seeds: list[int]
    sampling: Sampling
    expect_version: int

    def __len__(self) -> int:
        return len(self.prompts)

    def part(self, lo: int, hi: int) -> RolloutRequest:
        """Prompts [lo, hi) with their own seeds: a worker's share of the batch."""
        return RolloutRequest(
            self.prompts[lo:hi],
            self.prompt_indices[lo:hi],
            self.seeds[lo:hi],
            self.sampling,
            self.expect_version,
        )


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: a resumed run draws the same rollouts as an unbroken one."""
    return random.Random(f"{seed}:rollout:{step}").getrandbits(31)


def prompt_seeds(seed: int, prompt_indices: list[int]) -> list[int]:
    """One sampling seed per prompt, from a call's seed and the prompt's dataset index (and,
    for a prompt listed twice, its occurrence), so a seed depends neither on where the prompt
    sits in its worker's slice nor on how many workers share the batch. Computed over a whole
    batch (as the training driver does), the copies of a prompt drawn twice get different
    seeds whichever workers they land on. 30 bits: vLLM's child j of an n-sample request
    uses seed + j."""
    seen: dict[int, int] = {}
    seeds = []
    for index in prompt_indices:
        k = seen[index] = seen.get(index, -1) + 1
        seeds.append(random.Random(f"{seed}:{index}:{k}").getrandbits(30))
    return seeds
