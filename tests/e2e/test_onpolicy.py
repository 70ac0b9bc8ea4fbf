"""The core loop end to end on a local Ray: vLLM rollouts, a vLLM teacher, two DeepSpeed learners.

The student starts random; the teacher was briefly trained on the addition task, so the two
distributions are far apart at step 0. On-policy distillation (student samples, reverse KL over the
teacher's top-k at every completion token) must at least halve the held-out reverse
KL(student || teacher) within the test's steps, at ZeRO-2 with the synchronous loop and at ZeRO-3
with the pipelined one (trainer.max_staleness=1: rollouts one weight version behind, importance
weighted), which costs no extra run; and with the learners sampling from their own weights
(rollout.backend=learner: no rollout engine, no weight sync).

The sampled-token policy-gradient loss (algorithm.loss=on_policy_pg) is covered by the loss and
learner tests; on this 1-layer student it plateaus near half the initial KL within 120 steps
(measured 4.89 -> 2.2-2.8), too close to the line for a test that must not flake.
"""

import json

import pytest

from rayd.config import load_config
from rayd.driver import train

from helpers import TINY_CONFIG

# Shared with the README's command for the figures: 120 steps, dense reverse KL, 2 learners.


@pytest.mark.parametrize(
    ("zero_stage", "max_staleness", "rollout_backend"),
    [(2, 0, "vllm"), (3, 1, "vllm"), (2, 0, "learner")],
)
def test_on_policy_distillation_halves_heldout_reverse_kl(
    ray_local, tmp_path, zero_stage, max_staleness, rollout_backend
):
    cfg = load_config(
        TINY_CONFIG,
        [
            f"name=e2e-zero{zero_stage}-{rollout_backend}",
            f"output_dir={tmp_path}/{{name}}",
            f"learner.zero_stage={zero_stage}",
            f"trainer.max_staleness={max_staleness}",
            f"rollout.backend={rollout_backend}",
            "logging.progress=false",
        ],
    )
    summary = train(cfg)
    before = summary["initial"]["eval/reverse_kl"]
    after = summary["final"]["eval/reverse_kl"]
    assert before > 0.5, f"teacher and random student should disagree, reverse KL {before}"
    assert after <= 0.5 * before, f"reverse KL fell only from {before:.3f} to {after:.3f}"

    run = tmp_path / cfg.name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert cfg.trainer.max_steps == 120
    assert [r["step"] for r in steps] == list(range(1, 121))
    # (The pipelined loop's last step syncs no weights: no rollouts follow it.)
    for key in ("reverse_kl", "tokens_per_s/rollout", "time/teacher", "time/learner", "time/sync"):
        assert key in steps[-2], key
    assert steps[-1]["weight_version"] == 120
    assert steps[-1]["staleness/max"] == max_staleness
    assert (run / "config.yaml").is_file()
    assert (run / "student" / "config.json").is_file()
    assert list((run / "tensorboard").iterdir())
