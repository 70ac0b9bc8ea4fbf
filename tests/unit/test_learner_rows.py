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
