"""The samples a step trains on that need no rollout, and the data checks the offline modes need.

- `dataset_sample`: a prompt's dataset completion (the offline modes, GKD's off-policy share).
- `step_by_step_samples`: Distilling Step-by-Step's answer and rationale tasks.
- `label_sample`: the label task beside on-policy rationale distillation (gold answers, CE).
- `split_by_lambda`: GKD's mixing of on-policy prompts and dataset completions.
"""

from __future__ import annotations

import random
from typing import Any

from rayd.config import AlgorithmConfig
from rayd.data.prompts import Prompt
from rayd.tasks.base import Task
from rayd.types import Sample


def split_by_lambda(prompts: list[Prompt], lmbda: float, rng: random.Random):
    """GKD mixing: a prompt goes on-policy with probability lambda, else to its dataset answer."""
    if lmbda >= 1.0:
        return prompts, []
    on, off = [], []
    for p in prompts:
        (on if rng.random() < lmbda or p.completion_ids is None else off).append(p)
    return on, off


def step_by_step_samples(
    prompt: Prompt, algo: AlgorithmConfig, tokenizer: Any, task: Task | None, version: int
) -> list[Sample]:
    """Distilling Step-by-Step's two tasks for one prompt: the plain prompt -> the answer, and
    rationale_prefix + prompt -> the rationale (weighted by rationale_weight). The answer task
    keeps the plain prompt, so evaluation and serving need no task prefix."""
    assert prompt.answer is not None and prompt.rationale is not None
    answer_text = (task or Task.default()).answer_text(prompt.answer)
    prefix = tokenizer(algo.rationale_prefix, add_special_tokens=False).input_ids
    return [
        target_sample(prompt, prompt.ids, answer_text, tokenizer, version, 1.0),
        target_sample(
            prompt, prefix + prompt.ids, prompt.rationale, tokenizer, version, algo.rationale_weight
        ),
    ]


def label_sample(
    prompt: Prompt, algo: AlgorithmConfig, tokenizer: Any, task: Task | None, version: int
) -> Sample:
    """The label task beside on-policy rationale distillation: label_prefix + prompt -> the gold
    answer, cross-entropy weighted label_weight. On the plain prompt the student writes its
    rationale, so the label task needs a prefix of its own (the reverse of step_by_step)."""
    assert prompt.answer is not None
    answer_text = (task or Task.default()).answer_text(prompt.answer)
    prefix = tokenizer(algo.label_prefix, add_special_tokens=False).input_ids
    sample = target_sample(
        prompt, prefix + prompt.ids, answer_text, tokenizer, version, algo.label_weight
    )
    sample.hard_target = True
    return sample


def target_sample(
    prompt: Prompt, ids: list[int], target: str, tokenizer: Any, version: int, weight: float
) -> Sample:
    """A dataset sample: `ids` -> `target` + EOS, trained with weight `weight`."""
    completion = [*tokenizer(target, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    return Sample(
        prompt_ids=list(ids),
        completion_ids=completion,
        logprobs=[0.0] * len(completion),
        prompt_index=prompt.index,
        weight_version=version,
        on_policy=False,
        weight=weight,
    )


def dataset_sample(prompt: Prompt, version: int) -> Sample:
    """A prompt's dataset completion, off-policy (no behaviour log-probs)."""
    assert prompt.completion_ids is not None
    return Sample(
        prompt_ids=prompt.ids,
        completion_ids=list(prompt.completion_ids),
        logprobs=[0.0] * len(prompt.completion_ids),
        prompt_index=prompt.index,
        weight_version=version,
        on_policy=False,
    )
