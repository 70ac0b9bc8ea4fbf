"""The task reward beside distillation (algorithm.reward_weight > 0): the verifier's score of
each on-policy sample and its advantage over a baseline. Pure functions of the step's samples;
the loss (rayd/losses.py `sequence_reward_pg`) turns an advantage into a policy gradient.

The baseline is the mean reward of the prompt's own samples when the rollout draws several per
prompt (rollout.n > 1: GRPO's group baseline, without dividing by the spread, which Dr. GRPO
showed biases towards short answers and easy prompts); with one sample per prompt it is the
mean over the step's on-policy samples (REINFORCE with a batch baseline). Either way a step
whose samples are all right, or all wrong, gives every advantage 0: the reward has nothing to
say there and distillation alone trains.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from rayd.data.prompts import PromptSet
from rayd.tasks.base import Task
from rayd.types import Sample


def rewards(samples: list[Sample], prompts: PromptSet, task: Task | None) -> list[float | None]:
    """1.0 when an on-policy sample's final answer is its prompt's answer, else 0.0; None for
    the rows that are not the student's samples (dataset completions, label-task rows)."""
    verifier = task or Task.default()
    out: list[float | None] = []
    for s in samples:
        if not s.on_policy or s.hard_target:
            out.append(None)
            continue
        answer = prompts.train[s.prompt_index].answer
        if answer is None:  # check_offline_data refuses such data before any actor starts
            raise ValueError(f"training prompt {s.prompt_index} has no answer to reward")
        out.append(1.0 if verifier.is_correct(s.text, answer) else 0.0)
    return out


def advantages(samples: list[Sample], scores: list[float | None], per_prompt: bool) -> torch.Tensor:
    """[B] float32: each rewarded row's reward minus its baseline, 0 on rows without a reward.
    per_prompt (rollout.n > 1): the baseline is the mean of the prompt's own samples; else
    the mean of every rewarded row of the step."""
    groups: dict[int, list[float]] = defaultdict(list)
    for s, r in zip(samples, scores, strict=True):
        if r is not None:
            groups[s.prompt_index].append(r)
    rewarded = [r for r in scores if r is not None]
    batch_mean = sum(rewarded) / len(rewarded) if rewarded else 0.0
    out = torch.zeros(len(samples))
    for i, (s, r) in enumerate(zip(samples, scores, strict=True)):
        if r is None:
            continue
        group = groups[s.prompt_index]
        baseline = sum(group) / len(group) if per_prompt else batch_mean
        out[i] = r - baseline
    return out
