"""The demo's report shows each method in its own regime and compares like with like: the two
rows of on-policy's regime start from the same student with the same steps and schedule, and
every row says which regime it is in."""

from rayd.commands.demo import METHODS, WORLD_CONFIG, WORLD_METHODS, report_table
from rayd.config import load_config


def test_world_rows_differ_only_in_the_method() -> None:
    configs = {
        m: load_config(WORLD_CONFIG, [*overrides, "trainer.seed=0"]).model_dump(mode="json")
        for m, overrides in WORLD_METHODS.items()
    }
    sft, on_policy = configs["sft_continued"], configs["on_policy"]
    assert sft["models"]["student"] == on_policy["models"]["student"]  # the same start
    assert sft["learner"] == on_policy["learner"]  # the same learning rate and schedule
    assert sft["trainer"] == on_policy["trainer"]  # the same steps, seed and evals
    assert (sft["algorithm"]["name"], on_policy["algorithm"]["name"]) == ("sft", "on_policy")
    assert set(METHODS) == {"sft", "step_by_step"}  # SFT's regime starts from random


def test_report_table_says_each_rows_regime_and_start() -> None:
    def row(acc, steps=None, seconds=None):
        e = {"accuracy": acc, "params": 140_000, "path": "p"}
        if steps:
            e |= {"steps": steps, "seconds": seconds}
        return e

    def world_row(acc, sampled, steps=None, seconds=None):
        return {"accuracy": acc, "sampled_accuracy": sampled, "steps": steps, "seconds": seconds}

    report = {
        "teacher": {**row(0.95), "params": 810_000},
        "baseline": row(0.05, 1000, 60.0),
        "students": {"sft": row(0.9, 1000, 200.0), "step_by_step": row(0.01, 1000, 150.0)},
        "best": {
            "method": "sft",
            "accuracy": 0.9,
            "teacher_retention": 0.95,
            "over_baseline_points": 85,
        },
        "targets": {"met": True},
        "world": {
            "task": {"digits": 3, "split": "test", "eval_prompts": 2000, "sample_temperature": 1},
            "teacher": {"accuracy": 1.0},
            "rows": {
                "start": world_row(0.734, 0.7345),
                "sft_continued": world_row(0.736, 0.74, 200, 38.0),
                "on_policy": world_row(0.739, 0.738, 200, 100.0),
            },
            "on_policy_minus_sft_continued_points": 0.3,
        },
    }
    table = report_table(report)
    sft = "| student: sft | SFT's | 0.14M | 5.8x smaller | random | 1000 | 200 s | 90.0% |"
    assert sft in table
    assert "| teacher | SFT's | 0.81M | - | - | - | - | 95.0% |" in table
    assert "| greedy | T=1 |" in table
    assert (
        "| student: on_policy | on-policy's | the start student | 200 | 100 s | 73.9% | 73.8% |"
        in table
    )
    start = "| world start student | on-policy's | its SFT plateau | - | - | 73.4% | 73.5% |"
    assert start in table
    assert "+0.3 points greedy (2000 test prompts of 3-digit addition, one seed)" in table
