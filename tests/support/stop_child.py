"""A rayd command with its engine part replaced and one write held open, for tests/unit/
test_stops.py to signal at a known moment: `python stop_child.py COMMAND HELD MARKER ARGS...`.

COMMAND HELD: what is held (the file MARKER is touched, then the process sleeps inside it):
    generate shard    the second shard's temporary file, open (before its fsync)
    generate dataset  the dataset's temporary folder, written (inside save_to_disk)
    score dataset     the scored copy's temporary folder, written (inside save_to_disk)
    export card       the export's staging folder, with the weights in it (the card's example)
    ablate -          nothing: the cells are stand-ins for `rayd train` (below), MARKER unused
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

CELL = """\
import json, os, signal, subprocess, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
# A child of its own that ignores SIGTERM: only the process group's SIGKILL ends it.
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"])
def stop(*_):
    # A run that says it finished and then hangs: the sweep must kill it, and not trust it.
    (folder / "summary.json").write_text(json.dumps({"steps": 1, "preempted": False}))
signal.signal(signal.SIGTERM, stop)
(folder / "pids.json").write_text(json.dumps([os.getpid(), child.pid]))
while True:
    time.sleep(1)
"""


def hold(marker: Path) -> None:
    marker.touch()
    time.sleep(300)


def shard_text(questions, indices) -> str:
    """A shard as the teacher engines would write it: one correct sample per prompt."""
    rows = [
        {
            "sample_id": f"{j}-0",
            "prompt_index": j,
            "prompt": questions[j][0],
            "answer": questions[j][1],
            "completion": f"A={questions[j][1]}",
            "finish_reason": "stop",
            "tokens": 3,
        }
        for j in indices
    ]
    return "".join(json.dumps(r) + "\n" for r in rows)


def fake_shards(cfg, teacher_path, questions, shards, todo, shards_dir) -> None:
    from rayd.commands import generate as g

    for i in todo:
        g.write_atomic(g._shard_path(shards_dir, i), shard_text(questions, shards[i]))


def hold_in_save_to_disk(marker: Path) -> None:
    from datasets import Dataset

    real = Dataset.save_to_disk

    def save(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        hold(marker)

    Dataset.save_to_disk = save  # type: ignore[method-assign]


def main() -> int:
    command, held, marker_arg, *argv = sys.argv[1:]
    marker = Path(marker_arg)
    if command == "generate":
        from rayd.commands import generate as g

        g._write_shards = fake_shards  # type: ignore[assignment]
        if held == "shard":
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if os.readlink(f"/proc/self/fd/{fd}").endswith(".shard-00001.jsonl.tmp"):
                    hold(marker)
                real_fsync(fd)

            os.fsync = fsync
        else:
            hold_in_save_to_disk(marker)
        return g.main(argv)
    if command == "score":
        import torch

        from rayd.commands import score as s
        from rayd.types import TeacherScore

        def fake_scores(cfg, teacher_path, pairs, parts):
            k = cfg.teacher.top_k
            return {
                i: TeacherScore(
                    token_logprobs=torch.full((len(c),), -1.0),
                    topk_ids=torch.zeros((len(c), k), dtype=torch.long),
                    topk_logprobs=torch.full((len(c), k), -1.0),
                )
                for i, (_, c) in pairs.items()
            }

        s._score_pairs = fake_scores  # type: ignore[assignment]
        hold_in_save_to_disk(marker)
        return s.main(argv)
    if command == "export":
        from rayd.commands import export as e

        e.card_example = lambda folder, cfg: hold(marker)  # type: ignore[assignment,return-value]
        return e.main(argv)
    if command == "ablate":
        from rayd.commands import ablate
        from rayd.commands.ablate import run

        cell = Path(argv[0]).parent / "fake_cell.py"
        cell.write_text(CELL)
        run.cell_command = lambda folder: [sys.executable, str(cell), str(folder)]
        return ablate.main(argv)
    raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main())
