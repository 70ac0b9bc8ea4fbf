"""What several test folders build the same way: an engine spec, and a run's outputs read back.

Importable from every test module as `helpers` (pytest puts tests/ on sys.path: it has no
__init__.py). Nothing here starts an actor or Ray; fixtures live in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rayd.cli import main as rayd_main
from rayd.rollout.spec import EngineSpec
from rayd.types import Sample, TeacherScore

# The end-to-end tests' base run: the tiny test pair on-policy (configs/demo/tiny.yaml says more)
TINY_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "tiny.yaml")


def engine_spec(path: str | Path, backend: str = "hf", **changes: Any) -> EngineSpec:
    """A one-device engine of the model at `path`, small enough for a 2-core machine: fp32,
    a 256-token window, a quarter GiB of KV cache, one thread, seed 0; `changes` override any
    field (max_model_len=64, tensor_parallel_size=2, server=ServerSpec(...), ...)."""
    spec = EngineSpec(
        model_path=str(path),
        backend=backend,  # type: ignore[arg-type]
        dtype="float32",
        max_model_len=256,
        kv_cache_gib=0.25,
        threads=1,
        seed=0,
        max_logprobs=20,
        tensor_parallel_size=1,
        pipeline_parallel_size=1,
        server=None,
    )
    return replace(spec, **changes)


def step_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The training steps' lines of a run's metrics.jsonl (not the evals')."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def logged_samples(
    run_dir: str | Path, steps: int | None = None
) -> list[tuple[list[Sample], list[TeacherScore | None]]]:
    """samples.jsonl of a run (logging.samples=signal) read back: per step, in order, the
    samples the learners trained on and each one's teacher signal (None where it had none).
    `steps`: the first that many steps only."""
    by_step: dict[int, tuple[list[Sample], list[TeacherScore | None]]] = {}
    for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        step, signal = record.pop("step"), record.pop("teacher", None)
        ids = record["student_topk_ids"]
        record["student_topk_ids"] = None if ids is None else torch.tensor(ids)
        samples, scores = by_step.setdefault(step, ([], []))
        samples.append(Sample(**record))
        scores.append(
            None
            if signal is None
            else TeacherScore(
                torch.tensor(signal["token_logprobs"]),
                torch.tensor(signal["topk_ids"], dtype=torch.long),
                torch.tensor(signal["topk_logprobs"]),
            )
        )
    ordered = [by_step[s] for s in sorted(by_step)]
    return ordered if steps is None else ordered[:steps]


def run_cli(argv: list[str]) -> int:
    """`rayd ARGV...` in this process: its exit code (argparse's SystemExit included)."""
    try:
        return rayd_main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with its sha256: the user's files, compared byte for byte."""
    return {
        str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def tiny_run_folder(tmp: Path) -> Path:
    """`tmp/run` as a finished run of the tiny pair leaves it: its config.yaml and student/."""
    from rayd.config import load_config, save_config
    from rayd.zoo import resolve_model_path

    run = tmp / "run"
    cfg = load_config(
        None, ["models.student.path=tiny:test-student", "models.teacher.path=tiny:test-teacher"]
    )
    save_config(cfg, run / "config.yaml")
    shutil.copytree(resolve_model_path("tiny:test-student"), run / "student")
    return run


# A sweep's base config for the ablate tests (its models are never loaded there).
SWEEP_BASE = """\
models:
  student: {path: s}
  teacher: {path: t}
algorithm: {name: on_policy, loss: reverse_kl}
trainer: {max_steps: 3}
"""
