"""The learner's full-vocabulary fast path: logits only at the loss positions, and the probe
that keeps it off models whose logits are not their output layer on the last hidden state."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rayd.learner.deepspeed_backend import DeepSpeedLearner

torch.set_num_threads(1)


class _Engine(torch.nn.Module):
    """DeepSpeed's engine as the learner calls it here: forward, .module, eval/train."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, **kwargs):  # type: ignore[no-untyped-def]
        return self.module(**kwargs)


class _SoftCapped(LlamaForCausalLM):
    """Logits squashed after the output layer, as Gemma 2's final_logit_softcapping does."""

    def forward(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().forward(*args, **kwargs)
        out.logits = torch.tanh(out.logits)
        return out


def _tiny(cls: type[LlamaForCausalLM] = LlamaForCausalLM, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    model = cls(config)
    with torch.no_grad():  # logits of a few units, so a soft cap is visible
        model.lm_head.weight.mul_(50.0)
    return model.eval()


def _learner(student: LlamaForCausalLM, teacher: LlamaForCausalLM) -> DeepSpeedLearner:
    learner = DeepSpeedLearner.__new__(DeepSpeedLearner)  # no process group, no DeepSpeed
    learner.engine = _Engine(student)
    learner.teacher = teacher
    learner.self_teacher = None  # another model teaches
    learner.torch_device = torch.device("cpu")
    return learner


def test_loss_rows_are_the_models_logits_at_the_loss_positions() -> None:
    learner = _learner(_tiny(seed=1), _tiny(seed=2))
    ids = torch.randint(0, 32, (3, 7), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    attention[2, 5:] = 0  # a right-padded row
    loss_mask = torch.zeros(3, 6, dtype=torch.bool)
    loss_mask[0, 2:], loss_mask[1, 4:], loss_mask[2, 1:4] = True, True, True
    student, teacher = learner._loss_rows(ids, attention, loss_mask)
    assert student.requires_grad and not teacher.requires_grad
    with torch.no_grad():
        want_s = learner.engine.module(input_ids=ids, attention_mask=attention).logits
        want_t = learner.teacher(input_ids=ids, attention_mask=attention).logits
    torch.testing.assert_close(student.detach(), want_s[:, :-1][loss_mask], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(teacher, want_t[:, :-1][loss_mask], rtol=1e-4, atol=1e-4)
    assert learner._rows_match_logits()


def test_probe_refuses_soft_capped_logits() -> None:
    assert not _learner(_tiny(_SoftCapped), _tiny())._rows_match_logits()
    assert not _learner(_tiny(), _tiny(_SoftCapped))._rows_match_logits()


def test_a_teacher_shown_its_own_prompts_gives_its_rows_at_the_same_completion_tokens() -> None:
    """Privileged context: the teacher reads (its prompt + the completion); its rows at the
    loss positions are its logits where it predicts the same completion tokens."""
    from rayd.learner.deepspeed_backend import _teacher_view
    from rayd.types import Sample, TeacherScore, training_batch

    learner = _learner(_tiny(seed=1), _tiny(seed=2))
    samples = [
        Sample([3, 4], [5, 6, 7], [-1.0] * 3, prompt_index=0, teacher_prompt_ids=[3, 4, 9, 9]),
        Sample([8], [5, 2], [-1.0] * 2, prompt_index=1, teacher_prompt_ids=[8, 11, 12, 13, 14]),
    ]
    empty = [TeacherScore.empty(len(s.completion_ids)) for s in samples]
    batch = training_batch(samples, empty, 0, 0, drop_truncated=False, teacher_inputs=True)
    view = _teacher_view(batch)
    student, teacher = learner._loss_rows(
        batch.input_ids, batch.attention_mask, batch.loss_mask, view
    )
    assert student.shape[0] == teacher.shape[0] == 5
    rows = []
    with torch.no_grad():
        for s in samples:
            logits = learner.teacher(input_ids=torch.tensor([s.teacher_prompt + s.completion_ids]))
            start = len(s.teacher_prompt) - 1
            rows.append(logits.logits[0, start : start + len(s.completion_ids)])
    torch.testing.assert_close(teacher, torch.cat(rows), rtol=1e-4, atol=1e-4)
