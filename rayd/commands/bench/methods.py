"""The 2026 on-policy methods' step time against plain on-policy distillation, in one run.

Every method trains configs/demo/tiny.yaml's setting (vLLM rollouts, two DeepSpeed learners,
dense top-k reverse KL) from one student that gets many of the task's sums right
(tiny:test-reasoner: SDPO needs correct samples to show), for the same steps, one after the
other in this process and on the same local Ray, and reports its median step time (steps 2..,
step 1's actors are cold) and that over plain OPD's:
- `opd`: the tiny config's teacher (tiny:test-teacher, a vLLM actor of the student's size);
- `iw_opd`: the same with algorithm.position_weighting=iw_opd (the weights cost a cumsum per
  row: the ratio should be about 1);
- `sdft`: no teacher model: models.teacher=self, the student's EMA in the learners
  (teacher.support=full) shown each prompt's gold completion (privileged_context=completion);
- `sdpo`: the same with privileged_context=feedback (a correct sample of the prompt among its
  rollout.n=2; a sample without one is left out), 8 prompts x 2 samples a step like the others'
  16 x 1.
The self-distillation rows differ from `opd` in more than the method: their teacher runs inside
the learners (a teacher forward per micro-batch, over the whole vocabulary, and an EMA update
per step), where `opd`'s is a vLLM actor that scores the rollouts.

A timing, not a quality comparison: every row trains at a learning rate (1e-4) small enough
that the student stays near its start, so the rows sample completions of about the same
lengths (at the tiny config's 1e-2 the SDPO row's student stops writing answers within two
steps, and a step of two-token completions times nothing). Two rounds, the rows alternating;
the figures are each row's median over the rounds, tokens per second beside seconds per step.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from rayd.commands.bench import TINY_CONFIG, step_records, step_seconds

SELF_TEACHER = [
    "models.teacher=self",
    "teacher.weights=ema",
    "teacher.support=full",
    "teacher.backend=hf",
]
METHODS: dict[str, list[str]] = {
    "opd": [],
    "iw_opd": ["algorithm.position_weighting=iw_opd"],
    "sdft": [*SELF_TEACHER, "teacher.privileged_context=completion"],
    "sdpo": [
        *SELF_TEACHER,
        "teacher.privileged_context=feedback",
        "rollout.n=2",
        "trainer.prompts_per_step=8",
    ],
}


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), include_dashboard=False)
    steps, rounds = (6, 1) if quick else (20, 2)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in METHODS}
    for r in range(rounds):
        for name, extra in METHODS.items():
            runs[name].append(_train(workdir, f"{name}-{r}", steps, extra))
    rows: dict[str, Any] = {}
    for name, each in runs.items():
        rows[name] = {
            "seconds_per_step": statistics.median(e["seconds_per_step"] for e in each),
            "tokens_per_s": statistics.median(e["tokens_per_s"] for e in each),
            "rounds": each,
        }
    base = rows["opd"]
    for row in rows.values():
        row["seconds_over_opd"] = row["seconds_per_step"] / base["seconds_per_step"]
        row["tokens_per_s_over_opd"] = row["tokens_per_s"] / base["tokens_per_s"]
    return {
        **rows,
        "steps": steps,
        "rounds": rounds,
        "notes": f"{TINY_CONFIG.name} from tiny:test-reasoner at lr 1e-4, {steps} steps each, "
        f"median step of steps 2..{steps}, {rounds} alternating round(s); sdft/sdpo: the "
        "student's EMA teaches inside the learners (no teacher model)",
    }


def _train(workdir: Path, name: str, steps: int, extra: list[str]) -> dict[str, Any]:
    from rayd.config import load_config
    from rayd.driver import train

    cfg = load_config(
        str(TINY_CONFIG),
        [
            f"name={name}",
            f"output_dir={workdir}/{{name}}",
            f"trainer.max_steps={steps}",
            "trainer.eval_every=0",
            "data.eval_size=8",
            "logging.progress=false",
            "logging.tensorboard=false",
            "models.student.path=tiny:test-reasoner",
            "learner.optim.lr=1e-4",
            *extra,
        ],
    )
    train(cfg)
    records = step_records(cfg.run_dir)[1:]
    seconds = [step_seconds(r) for r in records]
    return {
        "seconds_per_step": statistics.median(seconds),
        "tokens_per_s": sum(r["completion_tokens"] for r in records) / sum(seconds),
        "completion_len": statistics.fmean(r["completion_len/mean"] for r in records),
        "loss_first": records[0]["loss"],
        "loss_last": records[-1]["loss"],
        "unscored_fraction": records[-1].get("privileged/unscored_fraction"),
        "overrides": extra,
    }
