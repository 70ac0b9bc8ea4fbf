"""LearnerGroup on real Ray + real DeepSpeed over gloo, two ranks, a tiny Llama.

Each ZeRO stage gets one test that shares its groups across the checks (group start-up dominates
the run time): the first step's loss and gradient norm equal a single-process reference of the
global token mean, training lowers the loss, published weights reproduce the group's log-probs
in a fresh transformers model, NaN losses and NaN gradients skip the step without touching
weights or optimizer state, and a checkpoint restored in a new group continues exactly like
the original. With the ranks sampling and holding the teacher, a step made in one call to each
rank is the two-call step exactly.
The first run on a machine also JIT-compiles DeepSpeed's shm comm op (about a minute, cached).
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rayd.config import RunConfig
from rayd.learner.group import LearnerGroup
from rayd.learner.spec import LearnerSpec
from rayd.losses import LossSpec, batch_loss
from rayd.sampling import RolloutRequest
from rayd.types import Sample, TeacherScore, TrainBatch, collate, padded_cells
from rayd.weight_sync import deserialize_state_dict

pytestmark = pytest.mark.usefixtures("ray_local")
# Helpers below run inside the actors (`__ray_call__`); the actors cannot import this file.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SPEC = LossSpec("reverse_kl")
TIMEOUT_S = 180


def make_batch(student: Path, teacher: Path, rows: int, seed: int = 0) -> TrainBatch:
    """Random prompts/completions of very different lengths, scored by a second tiny model.

    Unequal token counts per row make a per-rank or per-micro-batch mean differ from the global
    token mean, which is what the normalisation checks need.
    """
    gen = torch.Generator().manual_seed(seed)
    student_model = AutoModelForCausalLM.from_pretrained(student).eval()
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    vocab = teacher_model.config.vocab_size
    samples, scores = [], []
    for i in range(rows):
        prompt = torch.randint(4, vocab, (3 + i % 3,), generator=gen).tolist()
        completion = torch.randint(4, vocab, (2 + (5 * i) % 11,), generator=gen).tolist()
        ids = torch.tensor([prompt + completion])
        cols = slice(len(prompt) - 1, len(prompt) + len(completion) - 1)
        target = torch.tensor(completion)
        with torch.no_grad():
            t_lp = teacher_model(ids).logits[0, cols].log_softmax(-1)
            s_lp = student_model(ids).logits[0, cols].log_softmax(-1)
        top = t_lp.topk(4, dim=-1)
        behaviour = s_lp.gather(-1, target[:, None])[:, 0]
        samples.append(Sample(prompt, completion, behaviour.tolist(), prompt_index=i))
        scores.append(TeacherScore(t_lp.gather(-1, target[:, None])[:, 0], top.indices, top.values))
    return collate(samples, scores, pad_id=0)


def poisoned(batch: TrainBatch, row: int) -> TrainBatch:
    """A copy with a NaN teacher log-prob at `row`'s first completion token."""
    topk = batch.teacher_topk_logprobs.clone()
    col = int(batch.loss_mask[row].nonzero()[0])
    topk[row, col, 0] = float("nan")
    return TrainBatch(**{**vars(batch), "teacher_topk_logprobs": topk})


def reference(student: Path, batch: TrainBatch) -> tuple[float, float]:
    """Loss and gradient norm of sum(per-token loss) / num_tokens in one process."""
    model = AutoModelForCausalLM.from_pretrained(student)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_token, _ = batch_loss(logits[:, :-1], batch, SPEC)
    loss = per_token.sum() / batch.num_tokens
    loss.backward()
    loss = loss.detach()
    norm = torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]).norm()
    return float(loss), float(norm)


def poison_gradients(learners: LearnerGroup, rank: int, on: bool) -> None:
    """Make one rank's lm_head gradient NaN from now on (on=True) or stop doing so.

    Reaches into the actor on purpose (`__ray_call__` runs a function on the live instance):
    no data yields a finite loss with a non-finite gradient, and the API should not offer it.
    """

    def toggle(worker: Any, on: bool) -> None:
        if on:
            weight = worker.learner.engine.module.lm_head.weight
            worker.nan_hook = weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        else:
            worker.nan_hook.remove()

    actor = learners._actors[rank]
    ray.get(actor.__ray_call__.remote(toggle, on), timeout=TIMEOUT_S)


def draw(worker: Any) -> float:
    """One number from the rank's torch RNG (moves it on)."""
    return float(torch.rand(()))


def param_sizes(worker: Any) -> tuple[int, int]:
    """(elements held as full tensors, elements in total) of a rank's module parameters."""
    params = list(worker.learner.engine.module.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return sum(p.numel() for p in params), full


def hf_logprobs(model: torch.nn.Module, batch: TrainBatch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    picked = logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    return torch.where(batch.attention_mask[:, 1:].bool(), picked, 0.0)


def weights(ref: ray.ObjectRef) -> dict[str, torch.Tensor]:
    return deserialize_state_dict(ray.get(ref, timeout=TIMEOUT_S))


def assert_same_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float
) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def group(
    student: Path,
    stage: int,
    num_learners: int,
    *,
    grad_accum: int = 2,
    warmup_steps: int = 0,
    total_steps: int = 100,
    schedule: str = "constant",
) -> LearnerGroup:
    """A group built as a run builds it (`LearnerSpec.from_config`: the config's defaults for
    every setting not given here), with this file's loss."""
    cfg = RunConfig.model_validate(
        {
            # The teacher is never loaded here (the batches carry its scores): any path will do.
            "models": {"student": {"path": str(student)}, "teacher": {"path": str(student)}},
            "learner": {
                "num_learners": num_learners,
                "zero_stage": stage,
                "micro_batch_size": 2,
                "grad_accum": grad_accum,
                "optim": {"lr": 1e-2, "warmup_steps": warmup_steps, "schedule": schedule},
            },
            "trainer": {
                "max_steps": total_steps,
                "prompts_per_step": num_learners * 2 * grad_accum,
                "call_timeout_s": TIMEOUT_S,
            },
        }
    )
    overrides = None
    if stage == 3:
        # By default parameters under 1e5 elements stay gathered after the first step
        # ("persistent"; measured: the whole tiny model): shard every one so the gathers run.
        overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    spec = LearnerSpec.from_config(cfg, str(student))
    return LearnerGroup(replace(spec, loss=SPEC, ds_overrides=overrides))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_learner_group(stage: int, student_path: Path, teacher_path: Path, tmp_path: Path) -> None:
    batch = make_batch(student_path, teacher_path, rows=8)  # 2 learners x 2 micro x 2 accum
    ref_loss, ref_norm = reference(student_path, batch)
    initial = AutoModelForCausalLM.from_pretrained(student_path).eval()
    ckpt = str(tmp_path / "ckpt")

    # Warmup then linear decay, so restoring the LR schedule is checked too.
    schedule: dict[str, Any] = dict(warmup_steps=2, total_steps=20, schedule="linear")
    with group(student_path, stage, num_learners=2, **schedule) as learners:
        with pytest.raises(ValueError, match="rows"):
            learners.train_step(batch.slice(0, 4))

        # The first update is the gradient of the GLOBAL token mean, however the batch is split.
        first = learners.train_step(batch)
        assert first["skipped"] == 0.0
        assert first["num_tokens"] == batch.num_tokens
        assert first["lr"] == pytest.approx(0.5e-2)  # warmup step 1 of 2
        assert first["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert first["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
        assert {"reverse_kl", "student_logprob"} <= first.keys()
        # ... and its rows were reordered by length (learner.length_bucketing) to cut padding.
        lengths = batch.attention_mask.sum(1).tolist()
        as_given = 1 - sum(lengths) / padded_cells(lengths, 2, 2)
        assert first["learner/pad_fraction"] < as_given

        losses = [first["loss"]] + [learners.train_step(batch)["loss"] for _ in range(4)]
        assert losses[-1] < 0.8 * losses[0], losses
        if stage == 3:  # still sharded after training (see `group`), so the gathers are real
            local, full = ray.get(learners._actors[1].__ray_call__.remote(param_sizes))
            assert local == 0 and full == sum(p.numel() for p in initial.parameters())

        # Published weights = the learners' weights, and training changed them.
        published = weights(learners.publish_weights())
        fresh = AutoModelForCausalLM.from_pretrained(student_path)
        assert published.keys() == fresh.state_dict().keys()
        fresh.load_state_dict(published, strict=True)
        group_lp = learners.logprobs(batch)
        torch.testing.assert_close(hf_logprobs(fresh.eval(), batch), group_lp, atol=1e-5, rtol=0)
        assert (hf_logprobs(initial, batch) - group_lp).abs().max() > 1e-3

        # Rank 1's RNG moved on (as dropout would move it): the checkpoint keeps where it is.
        ray.get(learners._actors[1].__ray_call__.remote(draw), timeout=TIMEOUT_S)
        learners.save_checkpoint(ckpt, "step5", {"step": 5})
        draw_after_save = ray.get(learners._actors[1].__ray_call__.remote(draw), timeout=TIMEOUT_S)

        # NaN on rank 1's second micro-batch (found by the no-grad pre-check) and on rank 0's
        # first (found before its backward): both skip on every rank, nothing changes.
        for row in (7, 0):
            metrics = learners.train_step(poisoned(batch, row))
            assert metrics["skipped"] == 1.0
            assert math.isnan(metrics["loss"])
        assert_same_weights(weights(learners.publish_weights()), published, atol=0)

        # A finite loss with a NaN gradient (on rank 1 only) is skipped as well: ZeRO drops
        # such a step inside step(), and at fp32 stage 0 the learner does it itself.
        poison_gradients(learners, rank=1, on=True)
        metrics = learners.train_step(batch)
        poison_gradients(learners, rank=1, on=False)
        assert metrics["skipped"] == 1.0 and math.isfinite(metrics["loss"])
        assert_same_weights(weights(learners.publish_weights()), published, atol=0)

        # Continuing here and continuing from the checkpoint must agree exactly: that covers
        # the optimizer moments, the LR schedule and DeepSpeed's micro-step count (all
        # untouched by the skips) and their restore.
        after = learners.train_step(batch)
        assert after["skipped"] == 0.0
        continued = weights(learners.publish_weights())

    with group(student_path, stage, num_learners=2, **schedule) as restored:
        assert restored.load_checkpoint(ckpt, "step5") == {"step": 5}
        # the draw after the restore is the one the original made after saving (a rank that
        # only re-seeded would repeat the first draw instead)
        got = ray.get(restored._actors[1].__ray_call__.remote(draw), timeout=TIMEOUT_S)
        assert got == draw_after_save
        assert_same_weights(weights(restored.publish_weights()), published, atol=0)
        resumed = restored.train_step(batch)
        assert resumed["lr"] == after["lr"] == pytest.approx(1e-2 * (20 - 5) / (20 - 2))
        assert resumed["loss"] == pytest.approx(after["loss"], rel=1e-6)
        assert_same_weights(weights(restored.publish_weights()), continued, atol=1e-6)
        with pytest.raises(Exception, match="no DeepSpeed checkpoint"):
            restored.load_checkpoint(ckpt, "no-such-tag")


@pytest.mark.parametrize("stage", [2, 3])
def test_split_invariance(stage: int, student_path: Path, teacher_path: Path) -> None:
    """1 learner x grad_accum 2 and 2 learners x grad_accum 1 make the same update."""
    batch = make_batch(student_path, teacher_path, rows=4, seed=1)
    ref_loss, ref_norm = reference(student_path, batch)
    results = []
    for num_learners, grad_accum in ((1, 2), (2, 1)):
        with group(student_path, stage, num_learners, grad_accum=grad_accum) as learners:
            metrics = learners.train_step(batch)
            results.append((metrics, weights(learners.publish_weights())))
    (m1, w1), (m2, w2) = results
    for metrics in (m1, m2):
        assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert metrics["grad_norm"] == pytest.approx(ref_norm, rel=1e-4)
    assert_same_weights(w1, w2, atol=1e-5)


def test_a_step_in_one_call_is_the_step_in_two(
    student_path: Path, teacher_path: Path, tmp_path: Path
) -> None:
    """rollout.backend=learner with the teacher inside: `roll_out_and_train` (one call to each
    rank) samples, builds and trains the very step the driver's two calls do (`generate` on
    the ranks, the driver's collate, `train_step`): same samples, metrics and weights. One
    prompt with 8 samples leaves one rank nothing to sample; it still trains its shard."""
    cfg = RunConfig.model_validate(
        {
            "models": {
                "student": {"path": str(student_path)},
                "teacher": {"path": str(teacher_path)},
            },
            "rollout": {"backend": "learner", "n": 8, "max_new_tokens": 6, "max_model_len": 32},
            "teacher": {"backend": "hf", "support": "full"},
            "algorithm": {"name": "on_policy", "loss": "reverse_kl"},
            "learner": {"num_learners": 2, "zero_stage": 2, "micro_batch_size": 2, "grad_accum": 2},
            "trainer": {"max_steps": 10, "prompts_per_step": 1, "call_timeout_s": TIMEOUT_S},
        }
    )
    request = RolloutRequest([[5, 9, 11, 4]], [3], [1234], cfg.rollout.sampling(), 0)
    spec = LearnerSpec.from_config(cfg, str(student_path), str(teacher_path))
    with LearnerGroup(spec) as learners:
        learners.save_checkpoint(str(tmp_path / "ckpt"), "start", {"step": 0})

        chunks = dict(
            learners.sampling_pool().map_chunks_as_completed(
                "generate",
                request.prompts,
                request.prompt_indices,
                request.seeds,
                sampling=request.sampling,
                expect_version=request.expect_version,
            )
        )
        apart = [s for key in sorted(chunks) for s in chunks[key]]
        batch = collate(apart, [TeacherScore.empty(len(s.completion_ids)) for s in apart], 0)
        two_calls = learners.train_step(batch)
        weights_two = weights(learners.publish_weights())

        learners.load_checkpoint(str(tmp_path / "ckpt"), "start")
        shares, one_call = learners.roll_out_and_train(request, pad_id=0, drop_truncated=False)
        assert sorted(len(share) for share in shares) == [0, 8]
        together = [s for share in shares for s in share]
        assert [(s.completion_ids, s.logprobs) for s in together] == [
            (s.completion_ids, s.logprobs) for s in apart
        ]
        assert one_call.pop("rollout_s") > 0
        assert one_call == two_calls
        assert_same_weights(weights(learners.publish_weights()), weights_two, atol=0)
