"""The rayd-vs-TRL benchmark compares like with like: one settings object builds both configs."""

import dataclasses

import pytest

from rayd.commands.bench.trl import (
    FULL,
    QUICK,
    SMOLLM2,
    ordered_train_prompts,
    rayd_config,
    summarize,
    time_to_reach,
    trl_config_kwargs,
)


@pytest.mark.parametrize("settings", [QUICK, FULL, SMOLLM2], ids=["quick", "full", "smollm2"])
def test_trl_and_rayd_configs_share_loss_batch_steps_and_optimizer(settings, tmp_path):
    trl = pytest.importorskip("trl")  # the `bench` extra
    s = dataclasses.replace(settings, beta=0.3)  # not TRL's default, so a dropped value shows
    cfg = rayd_config(s, tmp_path / "rayd")
    args = trl.DistillationConfig(**trl_config_kwargs(s, tmp_path / "trl"))

    # the loss: generalized JSD with the same beta (both: 0 = forward KL, 1 = reverse KL),
    # every completion sampled by the student (TRL's trainer is on-policy only)
    assert (cfg.algorithm.name, cfg.algorithm.resolved_loss, cfg.algorithm.lmbda) == (
        "on_policy",
        "jsd",
        1.0,
    )
    assert args.beta == cfg.algorithm.beta == 0.3
    assert args.temperature == cfg.algorithm.temperature == cfg.rollout.temperature
    assert (args.top_p, args.top_k) == (cfg.rollout.top_p, 0)
    assert args.max_completion_length == cfg.rollout.max_new_tokens
    # the batch: prompts per optimizer step, one completion each
    assert cfg.rollout.n == 1
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == (
        cfg.trainer.prompts_per_step
    )
    assert args.max_steps == cfg.trainer.max_steps
    assert args.seed == cfg.trainer.seed
    # the optimizer: AdamW, no warmup, constant learning rate, same clipping
    optim = cfg.learner.optim
    assert args.learning_rate == optim.lr
    assert (args.adam_beta1, args.adam_beta2) == optim.betas
    assert (args.adam_epsilon, args.weight_decay, args.max_grad_norm) == (
        optim.eps,
        optim.weight_decay,
        optim.grad_clip,
    )
    assert (args.warmup_steps, optim.warmup_steps) == (0, 0)
    assert args.lr_scheduler_type == "constant" and optim.schedule == "constant"
    assert not args.bf16 and not args.fp16 and not args.gradient_checkpointing
    # rayd's own choices for the pair (its actors), not shared with TRL
    assert cfg.teacher.backend == s.teacher_backend
    assert cfg.rollout.threads == cfg.teacher.threads == s.actor_threads
    # snapshots for the shared evaluator at the same steps
    assert cfg.trainer.save_every == s.eval_every
    assert cfg.trainer.keep_checkpoints * s.eval_every == s.steps


def test_trl_reads_the_prompts_rayd_trains_on_in_the_same_order(tmp_path):
    from transformers import AutoTokenizer

    from rayd.data.prompts import PromptSampler, load_prompts
    from rayd.zoo import resolve_model_path

    s = dataclasses.replace(QUICK, steps=2, eval_every=1)
    cfg = rayd_config(s, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(s.student))
    prompts = load_prompts(cfg.data, tokenizer, 64, cfg.trainer.seed)
    sampler = PromptSampler(len(prompts.train), cfg.trainer.seed)
    rayd_ids = [prompts.train[i].ids for i in sampler.next(s.steps * s.prompts_per_step)]
    texts = ordered_train_prompts(s)
    assert [tokenizer(t, add_special_tokens=False).input_ids for t in texts] == rayd_ids


def test_time_to_reach_interpolates_between_evaluations():
    points = [(0.0, 4.0), (10.0, 3.0), (20.0, 1.0)]
    assert time_to_reach(points, 2.0) == pytest.approx(15.0)
    assert time_to_reach(points, 4.0) == 0.0
    assert time_to_reach(points, 0.5) is None


def test_each_teacher_top_k_is_a_rayd_run_compared_with_trl(tmp_path):
    s = dataclasses.replace(QUICK, top_k=(8, 64))
    assert rayd_config(s, tmp_path).teacher.top_k == 8  # the headline run
    assert rayd_config(s, tmp_path, 64).teacher.top_k == 64
    union = dataclasses.replace(SMOLLM2, support="union")  # an hf teacher: exact at any id
    assert rayd_config(union, tmp_path).teacher.support == "union"
    with pytest.raises(ValueError, match="top_k"):
        dataclasses.replace(QUICK, top_k=(8, 8))

    def run(seconds_per_step):
        n = s.steps
        return {
            "step_seconds": [seconds_per_step] * n,
            "step_tokens": [100] * n,
            "stage_seconds": {},
            "startup_s": 0.0,
            "process_s": 0.0,
        }

    runs = {"trl_1_threads": run(1.0), "rayd": run(2.0), "rayd_top64": run(2.0)}
    # TRL ends at KL 1; rayd top-8 at 2 (TRL passes 2 at step 5), top-64 at 1 (step 10)
    curves = {
        "trl_1_threads": [(0, 4.0), (5, 2.0), (10, 1.0)],
        "rayd": [(0, 4.0), (5, 3.0), (10, 2.0)],
        "rayd_top64": [(0, 4.0), (5, 2.5), (10, 1.0)],
    }
    result = summarize(s, runs, {"initial": 4.0, "curves": curves})
    assert result["tokens_per_s_ratio"] == pytest.approx(0.5)
    assert result["time_to_kl_ratio"] == pytest.approx(20.0 / 5.0)
    by_k = result["teacher_top_k"]
    assert by_k["8"]["time_to_kl_ratio"] == pytest.approx(4.0)
    assert by_k["64"] == {
        "tokens_per_s_ratio": pytest.approx(0.5),
        "time_to_kl_ratio": pytest.approx(2.0),
        "target_kl": 1.0,
        "final_kl": 1.0,
    }


def test_rounds_report_the_median_of_each_ratio_and_every_round(tmp_path, monkeypatch):
    from rayd.commands.bench import trl

    made = iter(
        [  # tokens/s, time to KL, with start-up; step times and start-ups
            (0.9, 0.6, 1.4, 0.050, 0.045, 13.0, 9.0),
            (1.2, 0.8, 1.2, 0.040, 0.048, 12.0, 8.0),
            (1.0, 0.5, 1.6, 0.045, 0.045, 14.0, 9.5),
        ]
    )

    def compare_once(s, workdir):
        rate, ttkl, startup, rayd_step, trl_step, rayd_up, trl_up = next(made)
        return {
            "tokens_per_s_ratio": rate,
            "time_to_kl_ratio": ttkl,
            "time_to_kl_ratio_with_startup": startup,
            "rayd": {"seconds_per_step": rayd_step, "startup_s": rayd_up},
            "trl": {"seconds_per_step": trl_step, "startup_s": trl_up},
            "workdir": workdir.name,
        }

    monkeypatch.setattr(trl, "compare_once", compare_once)
    result = trl.compare(dataclasses.replace(QUICK, rounds=3), tmp_path)
    assert result["tokens_per_s_ratio"] == 1.0
    assert result["time_to_kl_ratio"] == 0.6
    assert result["time_to_kl_ratio_with_startup"] == 1.4
    assert result["workdir"] == "round-3"  # the rest: the round with the median tokens/s ratio
    assert [r["tokens_per_s_ratio"] for r in result["rounds"]] == [0.9, 1.2, 1.0]
    assert [r["rayd_startup_s"] for r in result["rounds"]] == [13.0, 12.0, 14.0]
    assert (tmp_path / "trl-bench.json").is_file()
    with pytest.raises(ValueError, match="rounds"):
        dataclasses.replace(QUICK, rounds=0)
