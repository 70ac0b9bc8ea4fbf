"""The task reward beside distillation (rayd/reward.py): the verifier's score of each sample and
its advantage over the prompt's or the step's mean."""

import torch

from rayd.data.prompts import Prompt, PromptSet
from rayd.reward import advantages, rewards
from rayd.tasks import AdditionTask
from rayd.types import Sample


def _prompts() -> PromptSet:
    train = [Prompt(0, [1], None, "85", None, None), Prompt(1, [2], None, "12", None, None)]
    return PromptSet(train=train, eval=[], task=AdditionTask(digits=2))


def _sample(index: int, text: str, on_policy: bool = True, hard: bool = False) -> Sample:
    return Sample([1], [2], [0.0], index, text=text, on_policy=on_policy, hard_target=hard)


def test_rewards_verify_answers_and_skip_rows_that_are_not_the_students() -> None:
    samples = [
        _sample(0, "7+8+0=15;4+3+1=8;A=85"),
        _sample(0, "7+8+0=15;4+3+1=8;A=86"),
        _sample(1, "no answer at all"),
        _sample(1, "A=12", on_policy=False),  # a dataset completion (gkd)
        _sample(1, "A=12", hard=True),  # the label task
    ]
    assert rewards(samples, _prompts(), _prompts().task) == [1.0, 0.0, 0.0, None, None]


def test_advantages_per_prompt_and_per_step() -> None:
    samples = [_sample(0, ""), _sample(0, ""), _sample(1, ""), _sample(1, ""), _sample(1, "")]
    scores = [1.0, 0.0, 1.0, 1.0, None]
    # rollout.n > 1: each prompt's own mean (prompt 1's two rewarded rows are both right).
    torch.testing.assert_close(
        advantages(samples, scores, per_prompt=True), torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0])
    )
    # One sample per prompt: the step's mean, 0.75.
    torch.testing.assert_close(
        advantages(samples, scores, per_prompt=False),
        torch.tensor([0.25, -0.75, 0.25, 0.25, 0.0]),
    )
    # All right: nothing to learn from the reward.
    assert advantages(samples[:2], [1.0, 1.0], per_prompt=False).eq(0).all()
