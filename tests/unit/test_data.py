import pytest
import torch

from rayd.data.prompts import PromptSampler
from rayd.tasks import AdditionTask
from rayd.types import Sample, TeacherScore, collate


def test_collate_aligns_targets_with_completion_tokens():
    s = Sample(
        prompt_ids=[5, 6], completion_ids=[7, 8, 2], logprobs=[-0.1, -0.2, -0.3], prompt_index=0
    )
    short = Sample(prompt_ids=[5], completion_ids=[9], logprobs=[-0.5], prompt_index=1)
    k = 2
    scores = [
        TeacherScore(
            torch.tensor([-1.0, -2.0, -3.0]),
            torch.tensor([[7, 1], [8, 1], [2, 1]]),
            torch.tensor([[-1.0, -4.0], [-2.0, -4.0], [-3.0, -4.0]]),
        ),
        TeacherScore(torch.tensor([-0.7]), torch.tensor([[9, 3]]), torch.tensor([[-0.7, -2.0]])),
    ]
    b = collate([s, short], scores, pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 2], [5, 9, 0, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    # column j predicts input_ids[j + 1]: the completion starts at column len(prompt) - 1
    assert b.loss_mask.tolist() == [[False, True, True, True], [True, False, False, False]]
    assert b.teacher_logprobs[0, 1:].tolist() == [-1.0, -2.0, -3.0]
    assert b.behavior_logprobs[1, 0].item() == pytest.approx(-0.5)
    assert b.teacher_topk_ids[0, 1, 0].item() == b.input_ids[0, 2].item() == 7
    assert b.teacher_topk_ids.shape == (2, 4, k)
    assert b.num_tokens == 4
    halves = b.split(2)
    assert halves[1].input_ids.tolist() == [[5, 9]]  # padding-only columns trimmed
    assert halves[1].loss_mask.tolist() == [[True]]


def test_collate_rejects_length_mismatch():
    s = Sample(prompt_ids=[5], completion_ids=[7, 8], logprobs=[0.0, 0.0], prompt_index=0)
    bad = TeacherScore(torch.zeros(1), torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="teacher scored 1 tokens for a completion of 2"):
        collate([s], [bad], pad_id=0)


def test_sampler_sees_every_prompt_once_per_epoch_and_resumes_exactly():
    a = PromptSampler(10, seed=3)
    first = a.next(4) + a.next(4) + a.next(2)
    assert sorted(first) == list(range(10))
    b = PromptSampler(10, seed=3)
    b.next(7)
    state = b.state()
    rest = b.next(9)
    c = PromptSampler(10, seed=3)
    c.restore(state)
    assert c.next(9) == rest
    assert rest[:3] == first[7:]


def test_addition_task_splits_are_disjoint_and_verifiable():
    task = AdditionTask(digits=2, seed=0)
    train = {e.prompt for e in task.examples("train", 1500)}
    held = task.examples("eval", 100)
    assert not train & {e.prompt for e in held}
    ex = AdditionTask.make(47, 38)
    assert ex.completion == "7+8+0=15;4+3+1=8;A=85"
    assert task.is_correct(ex.completion, "85")
    assert not task.is_correct("7+8+0=15;A=84", "85")
    assert task.extract_answer("no answer") is None
