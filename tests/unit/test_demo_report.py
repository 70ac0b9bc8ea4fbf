"""The demo's report compares like with like: the rows that continue from the same student say
so, with their steps and each run's own wall time."""

from rayd.commands.demo import METHODS, report_table


def test_continued_rows_share_their_start_steps_and_schedule() -> None:
    continued = {n: o for n, (o, parent) in METHODS.items() if parent == "warmup"}
    assert set(continued) == {"sft_continued", "on_policy"}
    schedule = [o for o in continued["on_policy"] if o.startswith(("learner.", "trainer."))]
    assert schedule == [
        o for o in continued["sft_continued"] if o.startswith(("learner.", "trainer."))
    ]
    assert "learner.optim.warmup_steps=10" in schedule  # a fresh optimizer warms up again


def test_report_table_says_where_each_row_starts_and_its_wall_time() -> None:
    def row(acc, steps=None, parent=None, seconds=None):
        e = {"accuracy": acc, "params": 140_000, "path": "p"}
        if steps:
            e |= {"steps": steps, "continues_from": parent, "seconds": seconds}
        return e

    report = {
        "teacher": {**row(0.95), "params": 810_000},
        "baseline": row(0.05, 450, None, 60.0),
        "students": {
            "sft": row(0.9, 1000, None, 200.0),
            "sft_continued": row(0.4, 450, "warmup", 70.0),
            "on_policy": row(0.5, 450, "warmup", 120.0),
        },
        "best": {
            "method": "sft",
            "accuracy": 0.9,
            "teacher_retention": 0.95,
            "over_baseline_points": 85,
        },
        "targets": {"met": True},
        "from_the_same_start": {
            "start": "warmup",
            "start_steps": 300,
            "rows": {
                "sft_continued": {"accuracy": 0.4, "seconds": 70.0},
                "on_policy": {"accuracy": 0.5, "seconds": 120.0},
            },
        },
    }
    table = report_table(report)
    assert (
        "| student: on_policy | 0.14M | 5.8x smaller | warmup (300 SFT steps) | 450 | 120 s "
        "| 50.0% |" in table
    )
    assert "| student: sft | 0.14M | 5.8x smaller | random | 1000 | 200 s | 90.0% |" in table
    assert "| teacher | 0.81M | - | - | - | - | 95.0% |" in table
    assert "sft_continued 40.0% in 70 s, on_policy 50.0% in 120 s" in table
