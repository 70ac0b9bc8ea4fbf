"""Per-step metrics: JSON lines in the run folder, TensorBoard events, a console progress bar."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rayd.config import LoggingConfig


class StageTimer:
    """Wall time of named stages within one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class MetricsLogger:
    """`start_step` > 0 resumes a run: records after that step (work the checkpoint does not
    hold, which will be redone) are dropped from metrics.jsonl and TensorBoard."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, total_steps: int, start_step: int = 0):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if start_step and self.path.exists():
            self._truncate_after(start_step)
        elif self.path.exists():  # a fresh start in a reused folder: keep the old log aside
            self.path.rename(run_dir / f"metrics-before-{int(time.time())}.jsonl")
        self._file = self.path.open("a")
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not cfg.progress,
            desc="rayd",
            unit="step",
            dynamic_ncols=True,
        )

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash that interrupted the run
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict[str, Any], advance: bool = True) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)
        if advance:
            self._bar.update(1)
        shown = {k: metrics[k] for k in ("loss", "reverse_kl", "eval/reverse_kl") if k in metrics}
        if "tokens_per_s" in metrics:
            shown["tok/s"] = metrics["tokens_per_s"]
        if shown:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
