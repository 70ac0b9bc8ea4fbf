"""`rayd bench`: the runner's files and failure handling, and a real --quick run of the two
sections that need no Ray (the heavy ones are run by hand: `make bench`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from rayd.commands import bench

REPO = Path(__file__).resolve().parents[2]


def test_quick_run_writes_json_and_markdown(tmp_path: Path) -> None:
    # A subprocess: the learner section joins a torch.distributed group, which must not outlive
    # the run inside the test session.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    only = "teacher_signal,learner"
    proc = subprocess.run(
        [sys.executable, "-m", "rayd", "bench", "--quick", "--only", only, "--out", tmp_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True
    assert "--only teacher_signal,learner" in results["command"]
    assert results["machine"]["cores"] >= 1 and "torch" in results["machine"]
    assert results["timestamp"]
    signal = results["teacher_signal"]
    assert 0 < signal["topk_bytes_per_token"] < signal["full_bytes_per_token"]
    assert signal["computed_qwen_151936"]["full_bytes_per_token"] == 4 * 151936
    # More of the teacher's distribution, a loss closer to the exact one.
    rel = [signal["loss"]["forward_kl"][f"k{k}"]["rel_diff"] for k in (1, 64)]
    assert rel[1] < rel[0]
    learner = results["learner"]
    assert learner["zero2_over_torch"] > 0
    assert set(learner["tokens_per_s"]) == {"torch", "zero0", "zero2", "zero3"}
    md = (tmp_path / "results.md").read_text()
    assert "## teacher_signal" in md and "## learner" in md
    assert "**zero2_over_torch**" in md
    assert "rollout" not in results  # --only ran just the two


def test_failing_and_missing_sections_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = types.ModuleType("bench_test_broken")

    def fail(quick: bool, workdir: Path) -> dict:
        raise RuntimeError("engine fell over")

    broken.run = fail  # type: ignore[attr-defined]
    fine = types.ModuleType("bench_test_fine")
    fine.run = lambda quick, workdir: {  # type: ignore[attr-defined]
        "absolute": 3.0,
        "a_over_b": 1.5,
        "per": {"x": 1},
        "notes": "one note as a string",
    }
    monkeypatch.setitem(sys.modules, broken.__name__, broken)
    monkeypatch.setitem(sys.modules, fine.__name__, fine)
    monkeypatch.setitem(bench.SECTIONS, "broken", broken.__name__)
    monkeypatch.setitem(bench.SECTIONS, "fine", fine.__name__)
    monkeypatch.setitem(bench.SECTIONS, "absent", "rayd.commands.bench.no_such_section")

    code = bench.main(["--only", "broken,absent,fine", "--out", str(tmp_path)])

    assert code == 1  # one section failed; the others still ran
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["broken"]["error"] == "RuntimeError: engine fell over"
    assert "not part of this tree" in results["absent"]["skipped"]
    assert results["fine"]["a_over_b"] == 1.5 and results["fine"]["per"] == {"x": 1}
    assert results["quick"] is False
    md = (tmp_path / "results.md").read_text()
    assert "**failed**: RuntimeError: engine fell over" in md
    fine_table = md.split("## fine")[1]
    # Ratios first, then the absolute figures (nested keys flattened).
    assert fine_table.index("**a_over_b**") < fine_table.index("absolute")
    assert "| per.x | 1 |" in fine_table
    assert "\n- one note as a string\n" in fine_table  # a string note is one line


def test_unknown_section_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--only", "rollout,nope", "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_left_padded_prompts_end_in_the_same_column():
    from rayd.commands.bench import left_padded

    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
