"""The student's memory levers (learner.gradient_checkpointing, offload_optimizer, offload_params,
lora) on real Ray + real DeepSpeed over gloo, two ranks, a tiny Llama.

Each lever must leave the mathematics alone: the first update equals one AdamW step of a
single-process reference (gradient clipping included) on the same batch, wherever that step
does not hang on a gradient's last digits (`assert_same_adam_step`), published weights
reproduce the group's own log-probs in a fresh transformers model, and a checkpoint restored in
a new group continues exactly like the original. A LoRA student's reference is peft in this
process, started from the group's own initial adapters; what it publishes is the merged model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from peft import PeftModel, get_peft_model
from test_learner import TIMEOUT_S, assert_same_weights, hf_logprobs, make_batch, weights
from transformers import AutoModelForCausalLM

from rayd.config import LoraConfig, RunConfig
from rayd.learner.group import LearnerGroup
from rayd.learner.lora import merged_state, peft_config, save_adapter
from rayd.learner.spec import LearnerSpec
from rayd.losses import batch_loss
from rayd.types import TrainBatch
from rayd.weight_sync import deserialize_state_dict

pytestmark = pytest.mark.usefixtures("ray_local")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LR, CLIP, EPS = 1e-2, 1.0, 1e-8
LORA = {"r": 4, "alpha": 8.0}


def lever_group(student: Path, stage: int, levers: dict[str, Any]) -> LearnerGroup:
    """Two ranks x micro-batch 2 x grad_accum 2, reverse KL, constant lr, as a run builds it."""
    cfg = RunConfig.model_validate(
        {
            "models": {"student": {"path": str(student)}, "teacher": {"path": str(student)}},
            "algorithm": {"name": "on_policy", "loss": "reverse_kl"},
            "learner": {
                "num_learners": 2,
                "zero_stage": stage,
                "micro_batch_size": 2,
                "grad_accum": 2,
                "optim": {"lr": LR, "grad_clip": CLIP},
                **levers,
            },
            "trainer": {"max_steps": 100, "prompts_per_step": 8, "call_timeout_s": TIMEOUT_S},
        }
    )
    return LearnerGroup(LearnerSpec.from_config(cfg, str(student)))


def reference_step(model: torch.nn.Module, batch: TrainBatch, spec: Any) -> tuple[float, float]:
    """One AdamW step (DeepSpeed's settings) on sum(per-token loss) / num_tokens; (loss, norm).
    The gradients stay in the parameters' .grad (`assert_same_adam_step` reads them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.0)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_token, _ = batch_loss(logits[:, :-1], batch, spec)
    loss = per_token.sum() / batch.num_tokens
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP))
    optimizer.step()
    return float(loss.detach()), norm


def assert_same_adam_step(got: dict[str, torch.Tensor], reference: torch.nn.Module) -> None:
    """`got` holds the weights of the reference's first AdamW step (`reference_step`) within
    1e-5, except where the reference's gradient is within a hundred of Adam's eps of zero.

    A first step moves a weight by lr * g / (|g| + eps). Where |g| is near eps its size hangs on
    the gradient's last digits, which a gradient summed in another order moves: on an AMD EPYC
    (Zen 4) 1 weight in 4096, with g = 1.7e-8, stepped 1.3e-5 apart from the reference, though
    loss and gradient norm agreed to 1e-7. Those weights only have to stay within one step."""
    for name, param in reference.named_parameters():
        grad = param.grad
        assert grad is not None, name
        steady = grad.abs() > 100 * EPS
        gap = (got[name] - param.detach()).abs()
        assert gap[steady].max() <= 1e-5, f"{name}: {gap[steady].max():.2e} apart"
        assert gap.max() <= LR, f"{name}: more than a step apart ({gap.max():.2e})"


def trainable(worker: Any) -> int:
    """Elements the rank's optimizer trains (whole sizes, also under ZeRO-3)."""
    module = worker.learner.engine.module
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if p.requires_grad)


def in_force(worker: Any) -> dict[str, bool]:
    """Which levers the rank's model and DeepSpeed engine actually run with."""
    engine = worker.learner.engine
    return {
        "gradient_checkpointing": bool(engine.module.is_gradient_checkpointing),
        "offload_optimizer": engine.zero_offload_optimizer() is not None
        and str(engine.zero_offload_optimizer().device) in ("cpu", "OffloadDeviceEnum.cpu"),
        "offload_params": engine.zero_offload_param() is not None
        and str(engine.zero_offload_param().device) in ("cpu", "OffloadDeviceEnum.cpu"),
    }


def assert_in_force(learners: LearnerGroup, levers: dict[str, Any]) -> None:
    for actor in learners._actors:
        got = ray.get(actor.__ray_call__.remote(in_force), timeout=TIMEOUT_S)
        assert got == {name: bool(levers.get(name, False)) for name in got}, got


def exact_resume(
    learners: LearnerGroup, student: Path, stage: int, levers: dict, tmp: Path
) -> None:
    """Save, step; a new group restored from the save takes the same step to the same weights."""
    batch = make_batch(student, student, rows=8, seed=3)
    learners.save_checkpoint(str(tmp), "ckpt", {"step": 1})
    after = learners.train_step(batch)
    continued = weights(learners.publish_weights())
    with lever_group(student, stage, levers) as restored:
        assert restored.load_checkpoint(str(tmp), "ckpt") == {"step": 1}
        resumed = restored.train_step(batch)
        assert resumed["loss"] == pytest.approx(after["loss"], rel=1e-6)
        assert_same_weights(weights(restored.publish_weights()), continued, atol=1e-6)


@pytest.mark.parametrize(
    ("stage", "levers"),
    [
        (2, {"gradient_checkpointing": True}),
        (2, {"offload_optimizer": True}),
        (3, {"offload_optimizer": True, "offload_params": True, "gradient_checkpointing": True}),
    ],
    ids=["checkpointing-z2", "offload-optimizer-z2", "offload-all-checkpointing-z3"],
)
def test_full_weight_levers_keep_the_update(
    stage: int, levers: dict, student_path: Path, teacher_path: Path, tmp_path: Path
) -> None:
    batch = make_batch(student_path, teacher_path, rows=8)
    model = AutoModelForCausalLM.from_pretrained(student_path)
    spec = LearnerSpec.from_config(
        RunConfig.model_validate(
            {
                "models": {"student": {"path": "s"}, "teacher": {"path": "t"}},
                "algorithm": {"loss": "reverse_kl"},
            }
        ),
        str(student_path),
    ).loss
    ref_loss, ref_norm = reference_step(model, batch, spec)
    with lever_group(student_path, stage, levers) as learners:
        assert_in_force(learners, levers)
        first = learners.train_step(batch)
        assert first["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert first["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
        published = weights(learners.publish_weights())
        assert published.keys() == model.state_dict().keys()
        assert_same_adam_step(published, model)
        fresh = AutoModelForCausalLM.from_pretrained(student_path)
        fresh.load_state_dict(published, strict=True)
        group_lp = learners.logprobs(batch)
        torch.testing.assert_close(hf_logprobs(fresh.eval(), batch), group_lp, atol=1e-5, rtol=0)
        exact_resume(learners, student_path, stage, levers, tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("stage", "levers"),
    [(2, {"lora": LORA}), (3, {"lora": LORA, "gradient_checkpointing": True})],
    ids=["lora-z2", "lora-checkpointing-z3"],
)
def test_lora_student(
    stage: int, levers: dict, student_path: Path, teacher_path: Path, tmp_path: Path
) -> None:
    lora = LoraConfig(**LORA)
    batch = make_batch(student_path, teacher_path, rows=8)
    spec = LearnerSpec.from_config(
        RunConfig.model_validate(
            {
                "models": {"student": {"path": "s"}, "teacher": {"path": "t"}},
                "algorithm": {"loss": "reverse_kl"},
            }
        ),
        str(student_path),
    ).loss
    with lever_group(student_path, stage, levers) as learners:
        assert_in_force(learners, levers)
        # The reference: peft in this process, from the group's own initial adapters.
        initial = deserialize_state_dict(learners.adapter_blob())
        save_adapter(tmp_path / "initial", initial, lora, str(student_path))
        base = AutoModelForCausalLM.from_pretrained(student_path)
        reference = PeftModel.from_pretrained(base, tmp_path / "initial", is_trainable=True)
        expected = get_peft_model(
            AutoModelForCausalLM.from_pretrained(student_path), peft_config(lora)
        )
        count = ray.get(learners._actors[1].__ray_call__.remote(trainable), timeout=TIMEOUT_S)
        assert count == expected.get_nb_trainable_parameters()[0] > 0
        ref_loss, ref_norm = reference_step(reference, batch, spec)

        first = learners.train_step(batch)
        assert first["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert first["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
        # Published: the plain model's keys, adapters merged, equal to peft's own merge.
        published = weights(learners.publish_weights())
        merged = reference.merge_and_unload().state_dict()
        assert_same_weights(published, merged, atol=1e-5)
        fresh = AutoModelForCausalLM.from_pretrained(student_path)
        fresh.load_state_dict(published, strict=True)
        group_lp = learners.logprobs(batch)
        torch.testing.assert_close(hf_logprobs(fresh.eval(), batch), group_lp, atol=1e-5, rtol=0)
        # Only adapted layers moved; the embeddings and norms are the base model's exactly.
        original = AutoModelForCausalLM.from_pretrained(student_path).state_dict()
        assert torch.equal(
            published["model.embed_tokens.weight"], original["model.embed_tokens.weight"]
        )
        assert not torch.equal(
            published["model.layers.0.self_attn.q_proj.weight"],
            original["model.layers.0.self_attn.q_proj.weight"],
        )
        # The adapter on its own, merged by rayd's function from a saved peft folder, agrees.
        adapters = deserialize_state_dict(learners.adapter_blob())
        save_adapter(tmp_path / "trained", adapters, lora, str(student_path))
        loaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(student_path), tmp_path / "trained"
        )
        assert_same_weights(published, loaded.merge_and_unload().state_dict(), atol=1e-6)
        assert_same_weights(merged_state(_peft_keys(loaded), lora), published, atol=1e-6)
        exact_resume(learners, student_path, stage, levers, tmp_path / "ckpt")


def _peft_keys(model: PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}
