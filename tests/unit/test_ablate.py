"""`rayd ablate` without training: the sweep file, cells and their ids, skip logic, the results.

Result files (summary.json, metrics.jsonl, status.json) are written here the way a finished or
failed cell leaves them; the end-to-end test (tests/e2e/test_ablate.py) runs real cells.
"""

import csv
import json
import re
import textwrap
from pathlib import Path

import pytest
import yaml

from rayd.commands import ablate
from rayd.commands.ablate import plots
from rayd.commands.ablate.report import (
    aggregate,
    format_stat,
    mean_std,
    paired_difference,
    t_quantile_975,
    write_markdown,
)
from rayd.commands.ablate.run import Outcome, outcome_from_files, plan_cell, prepare_cell_folder
from rayd.commands.ablate.sweep import (
    SweepError,
    cell_config,
    cell_dir,
    cell_id,
    cell_token,
    expand,
    load_sweep,
    yaml_value,
)
from rayd.config import save_config

from helpers import SWEEP_BASE


def write_sweep(tmp_path: Path, body: str, base: str = SWEEP_BASE) -> Path:
    (tmp_path / "base.yaml").write_text(base)
    path = tmp_path / "sweep.yaml"
    text = f"name: sw\nbase: base.yaml\noutput_dir: {tmp_path}/out/{{name}}\n"
    path.write_text(text + textwrap.dedent(body))
    return path


GRID = """\
overrides: {trainer.max_steps: 4}
axes:
  algorithm.loss: [reverse_kl, forward_kl]
  data.train_fraction: [0.25, 1.0]
  trainer.seed: [0, 1]
"""


def test_cells_are_the_product_in_axis_order_with_readable_ids(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GRID))
    cells = expand(sweep)
    assert [c.id for c in cells] == [
        "reverse_kl-train_fraction=0.25-seed=0",
        "reverse_kl-train_fraction=0.25-seed=1",
        "reverse_kl-train_fraction=1.0-seed=0",
        "reverse_kl-train_fraction=1.0-seed=1",
        "forward_kl-train_fraction=0.25-seed=0",
        "forward_kl-train_fraction=0.25-seed=1",
        "forward_kl-train_fraction=1.0-seed=0",
        "forward_kl-train_fraction=1.0-seed=1",
    ]
    assert [c.index for c in cells] == list(range(8))
    assert cells[5].values == {
        "algorithm.loss": "forward_kl",
        "data.train_fraction": 0.25,
        "trainer.seed": 1,
    }
    cfg = cell_config(sweep, cells[5])
    assert cfg.algorithm.loss == "forward_kl"
    assert cfg.data.train_fraction == 0.25
    assert cfg.trainer.seed == 1
    assert cfg.trainer.max_steps == 4  # the sweep's override over the base's 3
    assert cfg.name == "sw-forward_kl-train_fraction=0.25-seed=1"
    assert cfg.run_dir == tmp_path / "out/sw/cells/forward_kl-train_fraction=0.25-seed=1"


def test_ids_stay_when_an_axis_grows(tmp_path):
    before = {c.id: c.values for c in expand(load_sweep(write_sweep(tmp_path, GRID)))}
    grown = GRID.replace("trainer.seed: [0, 1]", "trainer.seed: [0, 1, 2]")
    after = {c.id: c.values for c in expand(load_sweep(write_sweep(tmp_path, grown)))}
    assert len(after) == 12
    assert all(after[i] == v for i, v in before.items())


def test_a_bundle_axis_sets_several_keys_and_axes_win_over_overrides(tmp_path):
    body = """\
    overrides: {trainer.max_steps: 4, data.rationales: true}
    axes:
      method:
        answers: {data.rationales: false, trainer.max_steps: 7}
        rationales: {}
        gkd: {algorithm.name: gkd, algorithm.lmbda: 0.5, algorithm.loss: null}
      trainer.seed: [3]
    labels: {method: Method, answers: Answers only, eval/accuracy: Accuracy, "3": three}
    """
    sweep = load_sweep(write_sweep(tmp_path, body))
    cells = expand(sweep)
    assert [c.id for c in cells] == ["answers-seed=3", "rationales-seed=3", "gkd-seed=3"]
    assert cells[0].axis_overrides == {
        "data.rationales": False,
        "trainer.max_steps": 7,
        "trainer.seed": 3,
    }
    answers, rationales, gkd = (cell_config(sweep, c) for c in cells)
    assert (answers.data.rationales, answers.trainer.max_steps) == (False, 7)
    assert (rationales.data.rationales, rationales.trainer.max_steps) == (True, 4)
    assert rationales.algorithm.loss == "reverse_kl"  # the base's, untouched by an empty bundle
    assert (gkd.algorithm.name, gkd.algorithm.lmbda, gkd.algorithm.loss) == ("gkd", 0.5, None)
    assert sweep.spec.label("answers") == "Answers only"
    assert sweep.spec.label("rationales") == "rationales"
    assert sweep.spec.label("eval/accuracy") == "Accuracy"


@pytest.mark.parametrize(
    ("axis", "value", "bundle", "token"),
    [
        ("algorithm.loss", "reverse_kl", False, "reverse_kl"),
        ("trainer.seed", 0, False, "seed=0"),
        ("learner.optim.lr", 1e-05, False, "lr=1e_05"),
        ("data.rationales", False, False, "rationales=false"),
        ("models.teacher", None, False, "teacher=null"),
        ("learner.optim.betas", [0.9, 0.95], False, "betas=_0.9_0.95"),
        ("data.source", "task:addition", False, "task_addition"),
        ("models.student.path", "/models/my student", False, "models_my_student"),
        ("method", "rationales on", True, "rationales_on"),
        ("method", ".hidden", True, "_hidden"),
    ],
)
def test_cell_id_parts_are_filesystem_safe(axis, value, bundle, token):
    assert cell_token(axis, value, bundle) == token


def test_long_cell_ids_are_cut_with_a_stable_hash():
    long = cell_id(["x" * 80, "y" * 80])
    assert len(long) == 111
    assert long == cell_id(["x" * 80, "y" * 80])
    assert long != cell_id(["x" * 80, "y" * 79 + "z"])


def test_values_that_give_the_same_id_are_a_sweep_error(tmp_path):
    body = "axes:\n  data.source: ['a b', 'a_b']\n"
    with pytest.raises(SweepError, match=r"axes\.data\.source: values 'a b' and 'a_b' give"):
        load_sweep(write_sweep(tmp_path, body))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("axes: {trainer.seed: [0]}\nseeds: [1]\n", "seeds: unknown key"),
        ("axes: {trainer.seed: [0]}\nconcurrency: 0\n", "concurrency: Input should be greater"),
        ("axes: {trainer.max_step: [1, 2]}\n", "axes.trainer.max_step: trainer.max_step is not"),
        (
            "axes: {m: {a: {trainer.seeed: 1}}}\n",
            "axes.m.a.trainer.seeed: trainer.seeed is not a config key",
        ),
        ("axes: {trainer.seed.x: [1]}\n", "trainer.seed is a value, not a section"),
        (
            "overrides: {trainer: {max_steps: 3}}\naxes: {trainer.seed: [0]}\n",
            "overrides.trainer: trainer is a section; set its keys one by one",
        ),
        ("axes: {name: [a, b]}\n", "axes.name: name is set by the sweep"),
        ("axes: {m: {a: {output_dir: x}}}\n", "output_dir is set by the sweep"),
        ("axes: {trainer.seed: []}\n", "axes.trainer.seed: the list of values is empty"),
        ("axes: {trainer.seed: 3}\n", "axes.trainer.seed: a list of values or a mapping"),
        ("axes: {m: {a: 3}}\n", "axes.m.a: a bundle is a mapping of dotted overrides"),
        ("axes: {}\n", "axes: at least one axis is needed"),
        (
            "axes: {trainer.seed: [0], m: {a: {trainer.seed: 1}}}\n",
            "axes.m: sets trainer.seed, which axis trainer.seed sets too",
        ),
        ("axes: {trainer.seed: [0]}\nlabels: {seeed: S}\n", "labels.seeed: not an axis"),
        ("axes: {trainer.seed: [0]}\nreport: {x_axis: lr}\n", "report.x_axis: 'lr' is not"),
        ("axes: {trainer.seed: [0]}\nreport: {x_axis: trainer.seed}\n", "other than the seed"),
        ("axes: {trainer.seed: [0]}\nreport: {metrc: x}\n", "report.metrc: unknown key"),
        (
            "axes: {trainer.seed: [0]}\nbaseline: {method: sft}\n",
            "baseline.method: not an axis of the sweep (axes: )",
        ),
        (
            "axes: {m: {a: {}, b: {}}, trainer.seed: [0]}\nbaseline: {m: c}\n",
            "baseline.m: 'c' is not one of its values (a, b)",
        ),
        (
            "axes: {data.train_fraction: [0.5, 1.0]}\nbaseline: {data.train_fraction: 1}\n",
            "baseline.data.train_fraction: '1' is not one of its values (0.5, 1.0)",
        ),
        (
            "axes: {m: {a: {}}, trainer.seed: [0]}\nbaseline: {trainer.seed: 0}\n",
            "baseline.trainer.seed: the seed axis pairs the cells; name a non-seed axis",
        ),
        ("axes: {m: {a: {}}}\nbaseline: {}\n", "baseline: name at least one axis"),
    ],
)
def test_a_bad_sweep_file_gives_one_line_naming_the_key(tmp_path, body, needle):
    path = write_sweep(tmp_path, body)
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    message = str(info.value)
    assert needle in message
    assert message.startswith(f"sweep error: {path}")
    assert len(message.splitlines()) == 1, message


def test_missing_base_and_bad_yaml(tmp_path):
    path = write_sweep(tmp_path, "axes: {trainer.seed: [0]}\n")
    path.write_text(path.read_text().replace("base.yaml", "nope.yaml"))
    with pytest.raises(SweepError, match=r"base: config file .*nope\.yaml' does not exist"):
        load_sweep(path)
    path.write_text("name: [unclosed\n")
    with pytest.raises(SweepError, match=r"line \d+: not valid YAML"):
        load_sweep(path)
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_main_reports_a_bad_sweep_with_exit_code_2(tmp_path, capsys):
    path = write_sweep(tmp_path, "axes: {trainer.max_step: [1]}\n")
    assert ablate.main([str(path)]) == 2
    assert "trainer.max_step is not a config key" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value",
    ["plain", "x: y", "", "true", "0.5", 0, 1e-05, -3, True, None, [0.9, 0.95], {"digits": 3}],
)
def test_override_values_survive_the_key_value_round_trip(value):
    from rayd.config import parse_overrides

    assert parse_overrides([f"k={yaml_value(value)}"]) == [("k", value)]


def test_a_cell_with_a_bad_config_is_invalid_and_the_others_are_not(tmp_path, capsys):
    path = write_sweep(tmp_path, "axes: {learner.zero_stage: [2, 4]}\n")
    sweep = load_sweep(path)
    good, bad = (plan_cell(sweep, c) for c in expand(sweep))
    assert good.action == "run"
    assert bad.action == "invalid"
    assert bad.reason == (
        "config error: learner.zero_stage: Input should be less than or equal to 3 (got 4)"
    )
    assert ablate.main([str(path), "--dry-run"]) == 1  # a dry run validates every cell
    out = capsys.readouterr().out
    assert "zero_stage=4  invalid" in out
    assert "cell zero_stage=4: config error: learner.zero_stage" in out


# --- skip logic -------------------------------------------------------------------------------


def finish_cell(sweep, cell, final=None, preempted=False, metrics=()):
    """Leave the files a run of `cell` leaves (what `rayd train` and the sweep write)."""
    folder = cell_dir(sweep, cell)
    save_config(cell_config(sweep, cell), folder / "cell.yaml")
    summary = {"steps": 4, "preempted": preempted, "initial": {}, "final": final or {}}
    (folder / "summary.json").write_text(json.dumps(summary))
    status = {"status": "done", "exit_code": 0, "wall_s": 12.5, "error": ""}
    (folder / "status.json").write_text(json.dumps(status))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_skip_resume_and_rerun_decisions(tmp_path):
    path = write_sweep(tmp_path, GRID)
    sweep = load_sweep(path)
    cells = expand(sweep)
    finish_cell(sweep, cells[0])
    finish_cell(sweep, cells[1], preempted=True)
    finish_cell(sweep, cells[2])
    (cell_dir(sweep, cells[2]) / "summary.json").unlink()
    failed = {"status": "failed", "exit_code": 1, "wall_s": 3.0, "error": "boom"}
    (cell_dir(sweep, cells[2]) / "status.json").write_text(json.dumps(failed))
    cell_dir(sweep, cells[3]).mkdir(parents=True)
    (cell_dir(sweep, cells[3]) / "metrics.jsonl").write_text("{}\n")  # not the sweep's

    plans = [plan_cell(sweep, c) for c in cells]
    assert [(p.action, p.reason) for p in plans[:5]] == [
        ("skip", "finished"),
        ("run", "preempted: resuming"),
        ("run", "its last attempt failed (exit code 1)"),
        ("rerun", "its folder holds files but no cell.yaml"),
        ("run", ""),
    ]

    # The same sweep with another shared override: the finished cell's config changed.
    path.write_text(path.read_text().replace("trainer.max_steps: 4", "trainer.max_steps: 6"))
    sweep = load_sweep(path)
    plan = plan_cell(sweep, expand(sweep)[0])
    assert plan.action == "rerun"
    assert plan.reason == "config changed: trainer.max_steps: 4 -> 6"


def test_a_changed_cell_is_moved_aside_before_it_runs_again(tmp_path):
    path = write_sweep(tmp_path, GRID)
    sweep = load_sweep(path)
    cell = expand(sweep)[0]
    finish_cell(sweep, cell, final={"eval/reverse_kl": 1.0})
    path.write_text(path.read_text().replace("trainer.max_steps: 4", "trainer.max_steps: 6"))
    sweep = load_sweep(path)
    plan = plan_cell(sweep, expand(sweep)[0])
    assert plan.action == "rerun"
    folder = prepare_cell_folder(sweep, plan)
    assert sorted(p.name for p in folder.iterdir()) == ["cell.yaml"]
    assert yaml.safe_load((folder / "cell.yaml").read_text())["trainer"]["max_steps"] == 6
    (stale,) = (sweep.out / "stale").iterdir()
    assert stale.name.startswith(cell.id + "-")
    assert json.loads((stale / "summary.json").read_text())["final"] == {"eval/reverse_kl": 1.0}


def test_a_resumed_cell_loses_its_old_summary_but_keeps_its_files(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GRID))
    cell = expand(sweep)[0]
    finish_cell(sweep, cell, preempted=True, metrics=[{"step": 1, "loss": 2.0}])
    folder = prepare_cell_folder(sweep, plan_cell(sweep, cell))
    assert not (folder / "summary.json").exists()
    assert (folder / "metrics.jsonl").read_text()  # the resumed run continues it
    assert not (sweep.out / "stale").exists()


# --- results ----------------------------------------------------------------------------------


def test_mean_and_sample_std():
    mean, std = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(0.1414213562)
    mean, std = mean_std([1.0, 2.0, 3.0, 6.0])
    assert (mean, std) == (pytest.approx(3.0), pytest.approx(2.1602468995))
    assert mean_std([4.0]) == (4.0, None)


def test_stat_formatting():
    assert format_stat("eval/accuracy", 0.5, 0.1414) == "50.0 ± 14.1 %"
    assert format_stat("eval/accuracy", 0.25, None) == "25.0 %"
    assert format_stat("eval/reverse_kl", 2.34567, 0.0123) == "2.346 ± 0.012"
    assert format_stat("eval/completion_len", 20.0, 0.0) == "20 ± 0"


def fake_results(tmp_path):
    """A finished 2 x 2 x 2 sweep (one cell failed): accuracy = loss bonus + fraction + seed."""
    path = write_sweep(tmp_path, GRID + "labels: {data.train_fraction: training data}\n")
    sweep = load_sweep(path)
    for cell in expand(sweep):
        v = cell.values
        if v == {"algorithm.loss": "forward_kl", "data.train_fraction": 1.0, "trainer.seed": 1}:
            folder = cell_dir(sweep, cell)
            save_config(cell_config(sweep, cell), folder / "cell.yaml")
            failed = {"status": "failed", "exit_code": 1, "wall_s": 3.0, "error": "a\nboom"}
            (folder / "status.json").write_text(json.dumps(failed))
            continue
        acc = (
            (0.2 if v["algorithm.loss"] == "reverse_kl" else 0.0)
            + 0.4 * v["data.train_fraction"]
            + 0.1 * v["trainer.seed"]
        )
        kl = 3.0 - acc
        curve = [{"step": 0, "time": 0.0, "eval/accuracy": 0.0, "eval/reverse_kl": 4.0}]
        curve += [{"step": s, "time": float(s), "loss": 3.0 / s} for s in (1, 2, 3, 4)]
        curve += [{"step": 4, "time": 5.0, "eval/accuracy": acc, "eval/reverse_kl": kl}]
        final = {"eval/accuracy": acc, "eval/reverse_kl": kl, "eval/completion_len": 20.0}
        finish_cell(sweep, cell, final=final, metrics=curve)
    return path, sweep


def test_aggregate_groups_over_seeds(tmp_path):
    _, sweep = fake_results(tmp_path)
    outcomes = [outcome_from_files(sweep, c) for c in expand(sweep)]
    assert [o.status for o in outcomes] == ["done"] * 7 + ["failed"]
    groups = aggregate(sweep, outcomes)
    assert [g.values for g in groups] == [
        {"algorithm.loss": "reverse_kl", "data.train_fraction": 0.25},
        {"algorithm.loss": "reverse_kl", "data.train_fraction": 1.0},
        {"algorithm.loss": "forward_kl", "data.train_fraction": 0.25},
        {"algorithm.loss": "forward_kl", "data.train_fraction": 1.0},
    ]
    mean, std, n = groups[0].stats["eval/accuracy"]
    assert (mean, std, n) == (pytest.approx(0.35), pytest.approx(0.0707106781), 2)
    mean, std, n = groups[3].stats["eval/accuracy"]  # its seed 1 failed
    assert (mean, std, n) == (pytest.approx(0.4), None, 1)
    assert groups[3].done == 1


def test_only_report_writes_csv_markdown_and_plots(tmp_path, capsys):
    path, sweep = fake_results(tmp_path)
    assert ablate.main([str(path), "--only-report"]) == 1  # one cell failed
    out = capsys.readouterr().out
    assert re.search(r"forward_kl-train_fraction=1.0-seed=1 +failed +1 +3 *\n", out)

    with (sweep.out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert list(rows[0]) == [
        "cell",
        "algorithm.loss",
        "data.train_fraction",
        "trainer.seed",
        "status",
        "exit_code",
        "steps",
        "eval/accuracy",
        "eval/completion_len",
        "eval/reverse_kl",
        "wall_s",
        "error",
    ]
    assert rows[1]["cell"] == "reverse_kl-train_fraction=0.25-seed=1"
    assert rows[1]["data.train_fraction"] == "0.25"
    assert float(rows[1]["eval/accuracy"]) == pytest.approx(0.4)
    assert rows[1]["status"] == "done"
    assert rows[7]["status"] == "failed"
    assert (rows[7]["exit_code"], rows[7]["error"], rows[7]["eval/accuracy"]) == ("1", "boom", "")

    md = (sweep.out / "results.md").read_text()
    assert "| algorithm.loss | training data | n | eval/accuracy |" in md
    assert "| reverse_kl | 0.25 | 2/2 | 35.0 ± 7.1 % | 20 ± 0 | 2.65 ± 0.071 | 12 |" in md
    assert "| forward_kl | 1.0 | 1/2 | 40.0 % | 20 | 2.6 | 12 |" in md
    # the main metric along the way, for comparisons at equal steps
    assert "| algorithm.loss | training data | step 0 | step 4 |" in md
    assert "| reverse_kl | 0.25 | 0.0 ± 0.0 % | 35.0 ± 7.1 % |" in md
    assert "| forward_kl | 1.0 | 0.0 % | 40.0 % |" in md
    assert "- `forward_kl-train_fraction=1.0-seed=1`: failed (exit code 1): boom" in md

    plots = sorted(p.name for p in (sweep.out / "plots").iterdir())
    assert plots == ["final_accuracy_vs_train_fraction.png", "learning_curves.png"]
    for name in plots:
        assert (sweep.out / "plots" / name).read_bytes()[:4] == b"\x89PNG"
        assert f"(plots/{name})" in md


# results.md of fake_results' sweep as the code before `baseline` wrote it (no plots).
RESULTS_MD_WITHOUT_BASELINE = """\
# Sweep `sw`

Base config `TMP/base.yaml`; 8 cells.
Every cell: `trainer.max_steps=4`.

Final held-out metrics, mean ± sample standard deviation over the seeds (trainer.seed); \
n = finished runs; wall s = a run's mean wall time, start-up included.

| algorithm.loss | training data | n | eval/accuracy | eval/completion_len | eval/reverse_kl \
| wall s |
|---|---|---|---|---|---|---|
| reverse_kl | 0.25 | 2/2 | 35.0 ± 7.1 % | 20 ± 0 | 2.65 ± 0.071 | 12 |
| reverse_kl | 1.0 | 2/2 | 65.0 ± 7.1 % | 20 ± 0 | 2.35 ± 0.071 | 12 |
| forward_kl | 0.25 | 2/2 | 15.0 ± 7.1 % | 20 ± 0 | 2.85 ± 0.071 | 12 |
| forward_kl | 1.0 | 1/2 | 40.0 % | 20 | 2.6 | 12 |

eval/accuracy at each evaluation step, mean ± std over seeds:

| algorithm.loss | training data | step 0 | step 4 |
|---|---|---|---|
| reverse_kl | 0.25 | 0.0 ± 0.0 % | 35.0 ± 7.1 % |
| reverse_kl | 1.0 | 0.0 ± 0.0 % | 65.0 ± 7.1 % |
| forward_kl | 0.25 | 0.0 ± 0.0 % | 15.0 ± 7.1 % |
| forward_kl | 1.0 | 0.0 % | 40.0 % |

Cells without results:

- `forward_kl-train_fraction=1.0-seed=1`: failed (exit code 1): boom
"""


def test_without_a_baseline_results_md_is_byte_for_byte_as_before(tmp_path):
    _, sweep = fake_results(tmp_path)
    outcomes = [outcome_from_files(sweep, c) for c in expand(sweep)]
    write_markdown(sweep, outcomes, tmp_path / "results.md", [])
    text = (tmp_path / "results.md").read_text().replace(str(tmp_path), "TMP")
    assert text == RESULTS_MD_WITHOUT_BASELINE


def test_t_quantiles_are_student_ts():
    # mpmath (pinned in the CPU lock, through sympy) as the oracle: t's CDF through the
    # regularised incomplete beta function, inverted by root finding.
    import mpmath

    def cdf(t, df):
        return 1 - mpmath.betainc(df / 2, 0.5, 0, df / (df + t * t), regularized=True) / 2

    for df in [*range(1, 31), 31, 40, 60, 120, 1000]:
        # cdf is even in t (t * t): the root may come out negative
        exact = abs(mpmath.findroot(lambda t, df=df: cdf(t, df) - 0.975, 2.0 if df > 2 else 6.0))
        assert t_quantile_975(df) == pytest.approx(float(exact), abs=1e-7), df
    with pytest.raises(ValueError, match="df >= 1"):
        t_quantile_975(0)


def test_paired_difference_by_hand():
    # d = (0.06, 0.02, 0.08): mean 0.16 / 3; s^2 = (0.0067^2 + 0.0333^2 + 0.0267^2) / 2
    # = 9.333e-4, s = 0.030551; half width = t(0.975, 2) * s / sqrt(3) = 4.302653 * 0.017638
    # = 0.075891.
    d = paired_difference({"0": 0.56, "1": 0.62, "2": 0.63}, {"0": 0.50, "1": 0.60, "2": 0.55})
    assert (d.pairs, d.unpaired) == (3, 0)
    assert d.mean == pytest.approx(0.0533333, abs=1e-6)
    assert d.interval == pytest.approx((0.0533333 - 0.075891, 0.0533333 + 0.075891), abs=1e-6)
    # Seed 9 has no partner, seed 5 none either: both left out; one pair has no interval.
    d = paired_difference({"0": 0.7, "9": 0.1}, {"0": 0.6, "5": 0.3})
    assert (d.mean, d.interval, d.pairs, d.unpaired) == (pytest.approx(0.1), None, 1, 2)
    d = paired_difference({"1": 0.5}, {"0": 0.4})
    assert (d.mean, d.interval, d.pairs, d.unpaired) == (None, None, 0, 2)


BASELINE_SWEEP = """\
axes:
  method: {base: {}, alt: {}, other: {}}
  trainer.seed: [0, 1, 2]
baseline: {method: base}
labels: {eval/reverse_kl: KL}
"""


def test_a_baseline_adds_paired_differences_with_t_intervals(tmp_path):
    path = write_sweep(tmp_path, BASELINE_SWEEP)
    sweep = load_sweep(path)
    accuracy = {"base": [0.50, 0.60, 0.55], "alt": [0.56, 0.62, 0.63], "other": [None, 0.70, 0.40]}
    kl = {"base": [2.0, 1.8, 1.9], "alt": [1.7, 1.6, 1.8], "other": [None, 1.0, 1.0]}
    for cell in expand(sweep):
        method, seed = cell.values["method"], cell.values["trainer.seed"]
        if accuracy[method][seed] is None:  # other's seed 0 failed: base's seed 0 is left out
            folder = cell_dir(sweep, cell)
            save_config(cell_config(sweep, cell), folder / "cell.yaml")
            failed = {"status": "failed", "exit_code": 1, "wall_s": 3.0, "error": "boom"}
            (folder / "status.json").write_text(json.dumps(failed))
            continue
        final = {"eval/accuracy": accuracy[method][seed], "eval/reverse_kl": kl[method][seed]}
        finish_cell(sweep, cell, final=final)
    outcomes = [outcome_from_files(sweep, c) for c in expand(sweep)]
    write_markdown(sweep, outcomes, tmp_path / "results.md", [])
    md = (tmp_path / "results.md").read_text()
    assert "Paired differences against the baseline (method = base): " in md
    assert "runs with the same trainer.seed pair up" in md
    # alt - base: accuracy as in test_paired_difference_by_hand; KL d = (-0.3, -0.2, -0.1):
    # mean -0.2, s = 0.1, half width 4.302653 * 0.1 / sqrt(3) = 0.248414.
    # other - base over seeds 1, 2: accuracy d = (0.10, -0.15): mean -0.025, s = 0.176777,
    # half width 12.706205 * 0.176777 / sqrt(2) = 1.588276; KL d = (-0.8, -0.9): mean -0.85,
    # s = 0.070711, half width 12.706205 * 0.05 = 0.635310.
    table = (
        "| method | pairs | left out | Δ eval/accuracy | Δ KL |\n"
        "|---|---|---|---|---|\n"
        "| alt | 3 | 0 | +5.3 [-2.3, +12.9] pp | -0.2 [-0.448, +0.0484] |\n"
        "| other | 2 | 1 | -2.5 [-161.3, +156.3] pp | -0.85 [-1.49, -0.215] |\n"
    )
    assert table in md
    # The mean ± std table before it is the same as without a baseline.
    assert "| alt | 3/3 | 60.3 ± 3.8 % | 1.7 ± 0.1 | 12 |\n" in md


def test_a_baseline_on_one_axis_pairs_within_the_others(tmp_path):
    # fake_results: accuracy = 0.2 (reverse_kl) + 0.4 * fraction + 0.1 * seed, so forward_kl
    # minus reverse_kl is -20 points at each fraction and seed.
    path, _ = fake_results(tmp_path)
    path.write_text(path.read_text() + "baseline: {algorithm.loss: reverse_kl}\n")
    sweep = load_sweep(path)
    outcomes = [outcome_from_files(sweep, c) for c in expand(sweep)]
    write_markdown(sweep, outcomes, tmp_path / "results.md", [])
    md = (tmp_path / "results.md").read_text()
    assert "baseline (algorithm.loss = reverse_kl; training data as in the row)" in md
    assert "| forward_kl | 0.25 | 2 | 0 | -20.0 [-20.0, -20.0] pp | +0 [+0, +0] | +0.2 " in md
    # forward_kl 1.0's seed 1 failed: one pair, reverse_kl 1.0's seed 1 left out
    assert "| forward_kl | 1.0 | 1 | 1 | -20.0 pp | +0 | +0.2 |\n" in md
    assert "| reverse_kl | 0.25 | 2 | 0" not in md  # the baselines have no row of their own


def test_a_bad_baseline_stops_the_sweep_before_any_cell(tmp_path, capsys):
    path = write_sweep(tmp_path, BASELINE_SWEEP.replace("{method: base}", "{method: sft}"))
    assert ablate.main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"sweep error: {path}: baseline.method: 'sft' is not one of its values " + (
        "(base, alt, other)"
    )
    assert not (tmp_path / "out").exists()


def test_report_falls_back_to_reverse_kl_without_accuracy(tmp_path):
    path = write_sweep(tmp_path, "axes: {trainer.seed: [0, 1]}\n")
    sweep = load_sweep(path)
    for i, cell in enumerate(expand(sweep)):
        curve = [{"step": 1, "time": 1.0, "loss": 1.0}, {"step": 1, "eval/reverse_kl": 2.0 + i}]
        finish_cell(sweep, cell, final={"eval/reverse_kl": 2.0 + i}, metrics=curve)
    assert ablate.main([str(path), "--only-report"]) == 0
    md = (sweep.out / "results.md").read_text()
    assert "| n | eval/reverse_kl | wall s |\n|---|---|---|\n| 2/2 | 2.5 ± 0.71 | 12 |\n" in md
    assert "| step 1 |\n|---|\n| 2.5 ± 0.71 |\n" in md
    assert (sweep.out / "plots" / "final_reverse_kl_vs_cells.png").is_file()


def test_outcome_of_an_unrun_cell_is_pending(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, GRID))
    outcome = outcome_from_files(sweep, expand(sweep)[0])
    assert (outcome.status, outcome.ok) == ("pending", False)
    assert Outcome(outcome.cell, "skipped").ok


SHIPPED_SWEEPS = Path(__file__).resolve().parents[2] / "configs" / "sweeps"


@pytest.mark.parametrize(
    ("name", "cells", "x_axis"),
    [
        ("step_by_step.yaml", 36, "data.train_fraction"),
        ("regimes_plateau.yaml", 15, "method"),
        ("methods_2026.yaml", 8, "method"),
    ],
)
def test_the_shipped_sweeps_are_valid(name, cells, x_axis):
    # Keeps configs/sweeps/ (the README's example, the published ablations) in step with the
    # config: every cell validates, without running or building anything.
    sweep = load_sweep(SHIPPED_SWEEPS / name)
    plans = [plan_cell(sweep, c) for c in expand(sweep)]
    assert len(plans) == cells
    assert all(p.action != "invalid" for p in plans), [p.reason for p in plans]
    assert plots.choose_x_axis(sweep) == x_axis
