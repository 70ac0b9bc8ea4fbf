"""The 2026 on-policy methods end to end on a local Ray with the tiny test student (transformers
engines: they start in seconds), two DeepSpeed learners:

- SDFT: the student's own EMA, shown each prompt's gold completion, teaches from inside the
  learners (models.teacher=self, teacher.support=full: no teacher model, no teacher actor). A
  run stopped at step 2 and resumed trains steps 3-4 exactly as the unbroken run does: the EMA
  is in the checkpoint.
- SDPO: a student that gets many sums right (tiny:test-reasoner) and its EMA in teacher actors
  that get the learners' EMA every second version, shown a correct sample of the same prompt
  (privileged_context=feedback); samples without one leave the loss and are counted, and the
  signal before the first sync is the initial student's after those prompts.
- IW-OPD in one call per rank (the learners sample and hold the teacher): the position weights
  are logged, largest at the start of the completions.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rayd.workers as workers_module
from rayd.config import load_config
from rayd.driver import train
from rayd.zoo import resolve_model_path

from helpers import logged_samples, step_records
from reference_losses import full_vocab

KEYS = ("loss", "reverse_kl", "grad_norm", "completion_tokens")


def config(tmp_path, name, *extra):
    return load_config(
        None,
        [
            f"name={name}",
            f"output_dir={tmp_path}/{{name}}",
            "models.student.path=tiny:test-student",
            "rollout.backend=hf",
            "rollout.max_new_tokens=16",
            "rollout.max_model_len=48",
            "teacher.max_model_len=96",
            "learner.num_learners=2",
            "learner.micro_batch_size=4",
            "learner.optim.lr=1e-2",
            "algorithm.loss=reverse_kl",
            "trainer.prompts_per_step=8",
            "trainer.max_steps=4",
            "trainer.eval_every=0",
            "data.train_size=32",
            "data.eval_size=8",
            "logging.progress=false",
            "logging.tensorboard=false",
            *extra,
        ],
    )


SDFT = [
    "models.teacher=self",
    "teacher.weights=ema",
    "teacher.ema_rate=0.5",
    "teacher.support=full",
    "teacher.privileged_context=completion",
    "trainer.save_every=2",
]


def test_sdft_in_the_learners_resumes_its_ema_exactly(ray_local, tmp_path, monkeypatch):
    def no_teacher_actor(*args, **kwargs):
        raise AssertionError("a self-teacher in the learners started a teacher actor")

    monkeypatch.setattr(workers_module, "start_teachers", no_teacher_actor)
    whole = config(tmp_path, "whole", *SDFT, "logging.samples=tokens")
    summary = train(whole)
    steps = step_records(whole.run_dir)
    assert len(steps) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert "eval/reverse_kl" in summary["final"]  # to its privileged-context self
    # The learners' teacher scored every completion after its own prompt, the gold one shown:
    # step 1's loss is the exact reverse KL from the student on its prompt to the (still
    # initial) student after the teacher's, at every completion position.
    logged = logged_samples(whole.run_dir)
    for samples, _ in logged:
        for s in samples:
            assert s.teacher_prompt_ids and len(s.teacher_prompt_ids) > len(s.prompt_ids)
    initial = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("tiny:test-student", seed=whole.trainer.seed), dtype=torch.float64
    ).eval()
    total, tokens = 0.0, 0
    for s in logged[0][0]:
        t = len(s.completion_ids)
        with torch.no_grad():
            student = initial(input_ids=torch.tensor([s.prompt_ids + s.completion_ids])).logits
            teacher = initial(input_ids=torch.tensor([s.teacher_prompt + s.completion_ids])).logits
        student = student[:, len(s.prompt_ids) - 1 : -1]
        teacher = teacher[:, len(s.teacher_prompt) - 1 : -1]
        every = torch.ones(1, t, dtype=torch.bool)
        total += float(full_vocab("reverse_kl", student, teacher, every).sum())
        tokens += t
    assert steps[0]["loss"] == pytest.approx(total / tokens, rel=1e-4)
    assert (whole.run_dir / "checkpoints").is_dir()

    half = config(tmp_path, "resumed", *SDFT, "trainer.max_steps=2")
    train(half)
    resumed = config(tmp_path, "resumed", *SDFT)
    train(resumed)
    again = step_records(resumed.run_dir)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(steps, again, strict=True):
        assert {k: a[k] for k in KEYS} == {k: b[k] for k in KEYS}, a["step"]


def test_sdpo_feedback_in_teacher_actors_that_follow_the_ema(ray_local, tmp_path):
    cfg = config(
        tmp_path,
        "sdpo",
        "models.teacher=self",
        "teacher.weights=ema",
        "teacher.backend=hf",
        "teacher.sync_every=2",
        "teacher.privileged_context=feedback",
        "rollout.n=4",
        "trainer.prompts_per_step=2",
        # a student that gets many sums right: tiny:test-reasoner, trained on the task
        "models.student.path=tiny:test-reasoner",
        "data.task_options={digits: 2}",
        "rollout.max_new_tokens=28",  # room for a whole rationale and its answer
        "logging.samples=signal",
    )
    summary = train(cfg)
    steps = step_records(cfg.run_dir)
    assert len(steps) == 4
    # the eval shows each held-out sample a correct sibling too, and counts those without one
    # (before training: at this learning rate the student soon stops writing answers, see
    # docs/experiments/methods-2026.md)
    before = summary["initial"]
    assert 0 <= before["eval/unscored_fraction"] < 1 and "eval/reverse_kl" in before
    assert "eval/unscored_fraction" in summary["final"]
    fractions = [r["privileged/unscored_fraction"] for r in steps]
    assert all(0 <= f <= 1 for f in fractions)
    assert steps[-1]["faults/teacher"] == 0
    logged = logged_samples(cfg.run_dir)
    for (samples, scores), record in zip(logged, steps, strict=True):
        unscored = [s.unscored for s in samples]
        assert sum(unscored) / len(samples) == record["privileged/unscored_fraction"]
        for sample, score in zip(samples, scores, strict=True):
            # a sample with a correct sibling was scored after a prompt showing that sibling
            assert (score is None) == sample.unscored
            if not sample.unscored:
                assert len(sample.teacher_prompt_ids) > len(sample.prompt_ids)
    # Until the first sync (version 2) the teacher actors score with the initial student: the
    # signal of steps 1-2 is its log-probs after each prompt that shows a correct sibling.
    initial = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("tiny:test-reasoner", seed=cfg.trainer.seed), dtype=torch.float32
    ).eval()
    checked = 0
    for samples, scores in logged[:2]:
        for sample, score in zip(samples, scores, strict=True):
            if score is None:
                continue
            seq = sample.teacher_prompt + sample.completion_ids
            with torch.no_grad():
                logits = initial(input_ids=torch.tensor([seq])).logits[0, :-1]
            logp = logits.log_softmax(-1)[len(sample.teacher_prompt) - 1 :]
            targets = torch.tensor(sample.completion_ids)[:, None]
            torch.testing.assert_close(
                score.token_logprobs, logp.gather(-1, targets)[:, 0], atol=1e-4, rtol=0
            )
            torch.testing.assert_close(
                score.topk_logprobs, logp.gather(-1, score.topk_ids), atol=1e-4, rtol=0
            )
            checked += 1
    assert checked, "no sample of steps 1-2 had a correct sibling: the check saw nothing"


def test_iw_opd_in_one_call_per_rank_logs_where_the_weights_go(ray_local, tmp_path):
    cfg = config(
        tmp_path,
        "iw-opd",
        "models.teacher.path=tiny:test-teacher",
        "rollout.backend=learner",
        "teacher.support=full",
        "teacher.backend=hf",
        "algorithm.position_weighting=iw_opd",
        "algorithm.iw_opd_gamma=0.5",
        "trainer.max_steps=3",
    )
    train(cfg)
    steps = step_records(cfg.run_dir)
    assert len(steps) == 3
    for r in steps:
        assert 1.0 <= r["iw_opd/weight"] <= 1.5
        assert r["iw_opd/weight_q1"] >= r["iw_opd/weight_q4"]  # weights never rise
        assert r["iw_opd/weight_std"] > 0
    config_saved = json.dumps((cfg.run_dir / "config.yaml").read_text())
    assert "iw_opd" in config_saved
