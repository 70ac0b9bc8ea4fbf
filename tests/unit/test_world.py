"""The portable world's shipped models (rayd/world.py, docs/experiments/world.md): the bytes are
the recorded ones, a changed byte is refused naming the file, and the models still score what the
world's page says, on this machine's kernels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rayd import world
from rayd.commands.bench.regimes import _load
from rayd.commands.bench.world import accuracy, first_error
from rayd.tasks import make_task
from rayd.zoo import resolve_model_path

# Greedy on the first 200 test prompts, against the counts the build recorded on its machine
# (python -m rayd.commands.bench.world measure gives the 2000-prompt figures). Another CPU's
# kernels may flip a near-tie: the student's count may move by a few prompts, the teacher's
# hardly at all.
CHECK_PROMPTS = 200


def test_shipped_files_match_the_manifest():
    record = world.manifest()
    for role in world.ROLES:
        folder = Path(world.shipped(role))
        assert world.digests(folder) == record[role]["files"]
        assert "model.safetensors" in record[role]["files"]
    assert resolve_model_path("tiny:world-teacher") == world.shipped("teacher")
    assert resolve_model_path("tiny:world-student", seed=3) == world.shipped("student")


def test_a_changed_byte_is_refused_naming_the_file(tmp_path, monkeypatch):
    copy = tmp_path / "addition"
    shutil.copytree(world.WORLD_DIR, copy)
    weights = copy / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(world, "WORLD_DIR", copy)
    monkeypatch.setattr(world, "MANIFEST", copy / "MANIFEST.json")
    world.shipped.cache_clear()
    try:
        assert world.shipped("teacher") == str(copy / "teacher")
        with pytest.raises(world.WorldError, match=r"student differs .* in model\.safetensors"):
            world.shipped("student")
        (copy / "MANIFEST.json").unlink()
        world.shipped.cache_clear()
        with pytest.raises(world.WorldError, match="manifest is missing"):
            world.shipped("teacher")
    finally:
        world.shipped.cache_clear()


def test_the_shipped_models_score_as_recorded():
    checks = json.loads(world.MANIFEST.read_text())["check"]
    assert checks["prompts"] == CHECK_PROMPTS
    test = make_task("addition", **world.TASK_OPTIONS).examples("test", CHECK_PROMPTS)
    for role, slack in (("teacher", 1), ("student", 4)):
        model, tokenizer = _load(world.shipped(role))
        acc, _ = accuracy(model, tokenizer, test)
        assert abs(round(acc * CHECK_PROMPTS) - checks[f"{role}_greedy_right"]) <= slack, role


def test_the_subtraction_teacher_scores_as_recorded():
    check = world.manifest()["subtraction-teacher"]["check"]
    task = make_task("subtraction", **world.TASK_OPTIONS)
    model, tokenizer = _load(world.shipped("subtraction-teacher"))
    acc, _ = accuracy(model, tokenizer, task.examples("test", check["prompts"]), task=task)
    assert abs(round(acc * check["prompts"]) - check["greedy_right"]) <= 1
    assert resolve_model_path("tiny:world-subtraction-teacher") == world.shipped(
        "subtraction-teacher"
    )


def test_first_error_names_the_kind_of_character_missed():
    gold = "7+8+0=15;4+3+1=8;A=85"
    assert first_error("7+9+0=16;", gold) == (2, "operand")
    assert first_error("7+8+1=16;", gold) == (4, "carry")
    assert first_error("7+8+0=16;", gold) == (7, "total")
    assert first_error("7+8+0=1;", gold) == (7, "total")
    assert first_error("7+8+0=15;4+3+1=8;A=86", gold) == (20, "answer")
    assert first_error("7+8+0=15;4+3+1=8+", gold) == (16, "format")
    assert first_error("7+8+0=15;", gold) == (9, "stopped")


def test_the_forgetting_table_pairs_cells_by_seed():
    from rayd.commands.bench.world import forgetting_table

    def row(new: float) -> dict[str, float]:
        return {"new_greedy": new, "new_temperature_1": 0.5, "old_greedy": 0.0,
                "old_temperature_1": 0.0}  # fmt: skip

    results = {f"s/cells/sft-seed={k}/student": row(0.6 + 0.01 * k) for k in range(3)}
    results |= {f"s/cells/opd-seed={k}/student": row(0.5 + 0.02 * k) for k in range(3)}
    table = forgetting_table(results, "sft").splitlines()
    assert table[2].startswith("| sft | 3 | 61.0 ± 1.0 |")
    # opd minus sft per seed: -10, -9, -8 -> mean -9, t(2) 4.303 x 1/sqrt(3)
    assert table[3].startswith("| opd | 3 | 52.0 ± 2.0; Δ -9.0 [-11.5, -6.5] |")
