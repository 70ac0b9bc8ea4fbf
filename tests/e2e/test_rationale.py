"""On-policy rationale distillation end to end: divergence step weighting, the label task and
the task reward.

A few real on-policy steps on a local Ray (rollout, teacher and a DeepSpeed learner actor): the
student writes its own completions (two per prompt), the teacher scores them, the driver splits
them into reasoning steps and weights the steps by where the student diverges, every prompt
also gets a label-task sample (prefix + prompt -> gold answer, cross-entropy), and the verifier
rewards the completions with the right answer (a policy gradient beside distillation, reward
scaled 2x). The student is tiny:test-reasoner, which gets some 2-digit sums right: a random
one never would, and every advantage would be 0. The transformers
rollout and teacher backends keep it short on 2 cores (tests/e2e/test_onpolicy.py covers
vLLM); the weights themselves are checked exactly in tests/unit/test_steps.py.
"""

import json
import math

from rayd.config import load_config
from rayd.driver import train

from helpers import TINY_CONFIG

STEP_KEYS = (
    "steps/count",
    "steps/reverse_kl_first",
    "steps/reverse_kl_last",
    "steps/reverse_kl_worst",
    "steps/worst_position",
    "steps/max_share",
)


def test_step_weighting_label_task_and_task_reward(ray_local, tmp_path):
    cfg = load_config(
        TINY_CONFIG,
        [
            "name=e2e-rationale",
            f"output_dir={tmp_path}/{{name}}",
            "rollout.backend=hf",
            "teacher.backend=hf",
            "learner.num_learners=1",
            "models.student.path=tiny:test-reasoner",
            "rollout.n=2",
            "learner.micro_batch_size=24",
            "trainer.prompts_per_step=8",  # 16 rollouts + 8 label-task samples
            "trainer.max_steps=4",
            "trainer.eval_every=0",
            "data.eval_size=8",
            "algorithm.step_weighting=divergence",
            "algorithm.step_temperature=0.5",
            "algorithm.label_weight=0.5",
            "algorithm.reward_weight=2.0",
            "logging.progress=false",
            "logging.tensorboard=false",
        ],
    )
    summary = train(cfg)
    assert not summary["preempted"]
    assert math.isfinite(summary["final"]["eval/reverse_kl"])

    run = tmp_path / cfg.name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["skipped"] == 0
        for key in ("loss", "reverse_kl", "label_loss", *STEP_KEYS):
            assert math.isfinite(r[key]), (key, r[key])
        assert r["steps/count"] >= 1
        assert 1 / r["steps/count"] - 1e-6 <= r["steps/max_share"] <= 1 + 1e-6
        assert 0 <= r["steps/worst_position"] <= 1
        assert r["steps/reverse_kl_worst"] >= r["steps/reverse_kl_first"] - 1e-6
        # The label task: CE on "A=<answer>" + EOS, a share of the step's tokens.
        assert 0 < r["label_token_fraction"] < 1
        assert r["label_loss"] > 0
        assert "label_tokens" not in r  # turned into the fraction by the driver
        # The reward: the share of the step's rollouts with the right answer.
        assert 0 <= r["reward"] <= 1 and math.isfinite(r["reward_loss"])
    # Some prompt's two samples disagreed: its advantages, and the reward term, are not 0.
    assert any(0 < r["reward"] < 1 and r["reward_loss"] != 0 for r in steps)
    assert (run / "student" / "config.json").is_file()
