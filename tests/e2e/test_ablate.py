"""`rayd ablate` end to end: a 2 x 2 sweep of real training runs, its report, and a re-run.

Each cell is `python -m rayd train` in its own process, a Ray job on one local Ray that the
sweep starts (a Ray start-up per cell would cost more than a tiny cell's training; two local Ray
instances would each claim the machine's cores). The first sweep runs two cells at a time. The
cells use the transformers rollout and teacher backends and one learner: the sweep machinery is
the subject here, and a vLLM engine's start-up would double the test's time on 2 cores
(tests/e2e/test_onpolicy.py covers vLLM).

The second run of the same sweep must skip every cell: no new process, summaries untouched.
"""

import csv
import json
import re
from pathlib import Path

from rayd.commands import ablate

BASE = Path(__file__).parents[2] / "configs" / "demo" / "tiny.yaml"

SWEEP = """\
name: e2e
base: {base}
output_dir: {out}
concurrency: 2
overrides:
  trainer.max_steps: 4
  trainer.eval_every: 0
  data.eval_size: 8
  logging.progress: false
  logging.tensorboard: false
  rollout.backend: hf
  teacher.backend: hf
  learner.num_learners: 1
  learner.micro_batch_size: 16
  trainer.eval_sample_temperature: 1.0
baseline: {{algorithm.loss: reverse_kl}}
axes:
  algorithm.loss: [reverse_kl, forward_kl]
  trainer.seed: [0, 1]
labels: {{algorithm.loss: loss}}
"""

IDS = ["reverse_kl-seed=0", "reverse_kl-seed=1", "forward_kl-seed=0", "forward_kl-seed=1"]


def test_sweep_runs_reports_and_skips_finished_cells(tmp_path, capsys):
    out = tmp_path / "sweep"
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(base=BASE, out=out))

    assert ablate.main([str(path)]) == 0
    first = capsys.readouterr().out
    assert first.count(": started (log: ") == 4
    assert "cells join a local Ray at " in first

    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["cell"] for r in rows] == IDS
    assert [r["status"] for r in rows] == ["done"] * 4
    assert [r["steps"] for r in rows] == ["4"] * 4
    for r in rows:
        assert float(r["eval/reverse_kl"]) > 0
        assert 0 <= float(r["eval/accuracy"]) <= 1
        assert 0 <= float(r["eval/sampled_accuracy"]) <= 1  # the training-side sampled eval
        assert float(r["wall_s"]) > 0

    summaries = {}
    for cell in IDS:
        folder = out / "cells" / cell
        summaries[cell] = json.loads((folder / "summary.json").read_text())
        assert not summaries[cell]["preempted"]
        steps = [
            json.loads(line)
            for line in (folder / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line
        ]
        assert [s["step"] for s in steps] == [1, 2, 3, 4]
        assert json.loads((folder / "status.json").read_text())["exit_code"] == 0
        assert "rayd: student saved to" in (folder / "log.txt").read_text()
    # Cells that ran side by side on one cluster did not disturb each other: with the same
    # seed, both losses start from the same student and draw the same held-out samples.
    for seed in (0, 1):
        a, b = summaries[f"reverse_kl-seed={seed}"], summaries[f"forward_kl-seed={seed}"]
        assert a["initial"] == b["initial"]
    assert summaries["reverse_kl-seed=0"]["initial"] != summaries["reverse_kl-seed=1"]["initial"]

    md = (out / "results.md").read_text()
    columns = "eval/accuracy | eval/sampled_accuracy | eval/completion_len | eval/reverse_kl"
    assert f"| loss | n | {columns} |" in md
    percent = r"[\d.]+ (± [\d.]+ )?%"
    assert re.search(rf"\| reverse_kl \| 2/2 \| {percent} \| {percent} \| [\d.]+ ± [\d.]+ \|", md)
    assert re.search(r"\| forward_kl \| 2/2 \| ", md)
    # The baseline's paired table: forward_kl minus reverse_kl over the two shared seeds.
    assert "Paired differences against the baseline (loss = reverse_kl): " in md
    assert re.search(r"\| forward_kl \| 2 \| 0 \| [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] pp \|", md)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["final_accuracy_vs_loss.png", "learning_curves.png"]
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)

    # Again, one cell at a time: everything is finished, so nothing runs.
    mtimes = {c: (out / "cells" / c / "summary.json").stat().st_mtime_ns for c in IDS}
    logs = {c: (out / "cells" / c / "log.txt").stat().st_size for c in IDS}
    assert ablate.main([str(path), "--concurrency", "1"]) == 0
    second = capsys.readouterr().out
    assert "4 cells, 0 to run" in second
    assert "started" not in second
    for cell in IDS:
        assert f"cell {cell}: skipped (finished before)" in second
        assert re.search(rf"^{re.escape(cell)} +skipped +0 ", second, re.M)
        assert (out / "cells" / cell / "summary.json").stat().st_mtime_ns == mtimes[cell]
        assert (out / "cells" / cell / "log.txt").stat().st_size == logs[cell]
    with (out / "results.csv").open() as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["done"] * 4


def test_failed_cells_are_reported_and_the_rest_go_on(tmp_path, capsys):
    out = tmp_path / "sweep"
    path = tmp_path / "sweep.yaml"
    path.write_text(
        f"name: broken\nbase: {BASE}\noutput_dir: {out}\n"
        "overrides: {logging.progress: false}\n"
        "axes:\n"
        "  case:\n"
        "    missing_model: {models.student.path: /nonexistent/student}\n"
        "    bad_value: {learner.zero_stage: 4}\n"
    )
    assert ablate.main([str(path)]) == 1
    captured = capsys.readouterr()
    # One cell at a time still runs on one Ray the sweep starts, not a Ray start per cell.
    assert "cells join a local Ray at " in captured.out
    # The run's own one-line error (exit code 2, before any actor starts), from its log.
    assert "cell missing_model: failed" in captured.out
    assert "(exit code 2); last lines of its log.txt:" in captured.out
    assert "/nonexistent/student" in captured.out
    assert "cell bad_value: invalid config: config error: learner.zero_stage" in captured.out
    assert "2 of 2 cells failed: missing_model, bad_value" in captured.err

    with (out / "results.csv").open() as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert (rows["missing_model"]["status"], rows["missing_model"]["exit_code"]) == ("failed", "2")
    assert "/nonexistent/student" in rows["missing_model"]["error"]
    assert rows["bad_value"]["status"] == "invalid"
    assert "learner.zero_stage" in rows["bad_value"]["error"]
    md = (out / "results.md").read_text()
    assert "- `missing_model`: failed (exit code 2): " in md
    assert not (out / "cells" / "bad_value").exists()  # an invalid config never gets a folder
