"""What `rayd eval PATH` / `rayd export PATH` make of a path, and where eval's settings come from:
a run's config.yaml, RUN/student's run, a rayd export's rayd_export.json, flags over them. No
model is loaded (the folders hold a config.json only); tests/e2e/test_export.py evaluates real
ones."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from rayd.commands.eval import TargetError, _run_accuracy, describe, resolve_target, settle
from rayd.config import load_config, save_config

GOOD = [
    "models.student.path=tiny:test-student",
    "models.teacher.path=tiny:test-teacher",
    "rollout.max_new_tokens=16",
    "rollout.max_model_len=48",
    "learner.num_learners=1",
    "learner.micro_batch_size=4",
    "trainer.prompts_per_step=4",
    "trainer.seed=7",
    "data.task_options={digits: 3}",
    "data.eval_size=50",
    "data.chat_template=never",
]


def flags(**given):
    keys = ("task", "count", "split", "seed", "chat_template", "max_new_tokens", "backend")
    return SimpleNamespace(option=given.pop("option", []), **{k: given.get(k) for k in keys})


@pytest.fixture
def run(tmp_path) -> Path:
    run = tmp_path / "run"
    save_config(load_config(None, GOOD), run / "config.yaml")
    (run / "student").mkdir()
    (run / "student" / "config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"final": {"eval/accuracy": 0.75}}))
    return run


def test_a_run_and_its_student_give_the_runs_settings(run):
    for path in (run, run / "student"):
        target = resolve_target(path, "rayd eval: PATH")
        assert target.model == run / "student" and target.run == run
        settings, where = settle(target, flags())
        assert settings["task"] == "addition" and settings["options"] == {"digits": 3}
        assert settings["count"] == 50 and settings["seed"] == 7
        assert settings["chat_template"] == "never" and settings["max_new_tokens"] == 16
        assert settings["max_model_len"] == 48
        assert set(where.values()) == {f"run {run}"}
        assert _run_accuracy(target, settings) == 0.75  # the run's own prompts: comparable


def test_flags_override_one_setting_each_and_say_so(run):
    target = resolve_target(run, "rayd eval: PATH")
    settings, where = settle(target, flags(count=10, option=["eval_fraction=0.2"]))
    assert settings["count"] == 10 and where["count"] == "flag"
    assert settings["options"] == {"digits": 3, "eval_fraction": 0.2}
    assert where["options"] == f"run {run} + flag" and where["task"] == f"run {run}"
    line = describe(settings, where)
    assert line.startswith(f"rayd eval: from run {run}: task=addition")
    assert "from flags: count=10" in line
    assert _run_accuracy(target, settings) is None  # other prompts: not the run's number
    # Another task: the run's options belong to the run's task, not to it.
    settings, where = settle(target, flags(task="jsonl"))
    assert settings["options"] == {} and where["task"] == "flag"


def test_an_export_carries_the_runs_settings(run, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    record = {"eval": settle(resolve_target(run, "x"), flags())[0]}
    (export / "rayd_export.json").write_text(json.dumps(record))
    target = resolve_target(export, "rayd eval: PATH")
    assert target.run is None and target.origin == f"export {export}"
    settings, where = settle(target, flags())
    assert settings == record["eval"] and set(where.values()) == {f"export {export}"}


def test_what_is_not_a_run_or_a_model_says_so(run, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    with pytest.raises(TargetError, match=r"plain model folder .* give --task"):
        settle(resolve_target(plain, "rayd eval: PATH"), flags())
    assert settle(resolve_target(plain, "x"), flags(task="addition"))[1]["count"] == "default"
    with pytest.raises(TargetError, match="neither a run folder"):
        resolve_target(tmp_path, "rayd eval: PATH")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run / "config.yaml").read_text())
    assert resolve_target(unfinished, "x").model is None
    (unfinished / "config.yaml").write_text("models: {student: {path: x}}\ncolour: red\n")
    with pytest.raises(TargetError, match=r"config\.yaml no longer loads"):
        resolve_target(unfinished, "rayd eval: PATH")


def test_the_split_is_the_runs_eval_split_unless_a_flag_says(tmp_path):
    run = tmp_path / "run"
    save_config(load_config(None, [*GOOD, "data.eval_split=test"]), run / "config.yaml")
    (run / "student").mkdir()
    (run / "student" / "config.json").write_text("{}")
    target = resolve_target(run, "rayd eval: PATH")
    settings, where = settle(target, flags())
    assert settings["split"] == "test" and where["split"] == f"run {run}"
    assert "split=test" in describe(settings, where)
    settings, where = settle(target, flags(split="validation"))
    assert settings["split"] == "validation" and where["split"] == "flag"
    # A plain model folder (or an export that predates data.eval_split) says no split: "eval".
    plain = tmp_path / "model"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    settings, where = settle(resolve_target(plain, "x"), flags(task="addition"))
    assert settings["split"] == "eval" and where["split"] == "default"
