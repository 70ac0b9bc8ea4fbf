"""Per-step metrics: JSON lines in the run folder, TensorBoard events, progress on the console
(a bar in a terminal, plain periodic lines in a log file: rayd/progress.py)."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rayd.config import ConfigError, LoggingConfig, RunConfig
from rayd.progress import Progress
from rayd.types import Sample


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


def start_trackers(run_dir: Path, cfg: RunConfig) -> Trackers | None:
    """The enabled trackers' runs, or None. A missing package, or a tracker that cannot start
    (not logged in, no network in online mode), stops the run with one line before any actor
    starts."""
    import importlib.util

    if cfg.logging.wandb is None:
        return None
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "config error: logging.wandb is set but the wandb package is not installed "
            "(pip install 'rayd[tracking]', or remove logging.wandb)"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trackers(run_dir, cfg)


@contextmanager
def _starting(key: str):
    """A tracker that cannot start (not logged in, server unreachable, bad URI): one line."""
    try:
        yield
    except Exception as exc:  # each library has its own error types for this
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"config error: logging.{key}: the tracker did not start ({reason[:200]})"
        ) from None


class Trackers:
    """A Weights & Biases run mirroring metrics.jsonl. Its id is kept in the run folder, so a
    resumed rayd run logs into the same W&B run."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir = run_dir
        self._wandb: Any = None
        params = cfg.model_dump(mode="json")
        if cfg.logging.wandb is not None:
            with _starting("wandb"):
                self._start_wandb(cfg, params)

    def _start_wandb(self, cfg: RunConfig, params: dict[str, Any]) -> None:
        import wandb

        log = cfg.logging
        assert log.wandb is not None
        self._wandb = wandb.init(
            project=log.wandb.project,
            entity=log.wandb.entity,
            mode=log.wandb.mode,
            tags=log.wandb.tags,
            name=cfg.name,
            id=self._run_id("wandb"),
            resume="allow",
            dir=str(self.run_dir),
            config=params,
        )
        # Steps follow rayd's counter, which goes back after a resume from a checkpoint:
        # W&B drops a step lower than one it has seen unless steps are a metric of their own.
        self._wandb.define_metric("trainer/step")
        self._wandb.define_metric("*", step_metric="trainer/step")

    @property
    def wandb_run(self) -> Any:
        """The live W&B run (None when W&B is off): its config and summary, for checks."""
        return self._wandb

    def _run_id(self, name: str) -> str:
        """The tracker run of this rayd run: made once, kept in the run folder for resumes."""
        saved = self.run_dir / f"{name}_run_id"
        if not saved.is_file():
            saved.write_text(uuid.uuid4().hex[:12])
        return saved.read_text().strip()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        if self._wandb is not None:
            self._wandb.log({"trainer/step": step, **numbers})

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()


class MetricsLogger:
    """`start_step` > 0 resumes a run: records after that step (work the checkpoint does not
    hold, which will be redone) are dropped from metrics.jsonl and TensorBoard."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        total_steps: int,
        start_step: int = 0,
        trackers: Trackers | None = None,
    ):
        run_dir.mkdir(parents=True, exist_ok=True)
        self._trackers = trackers
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
        self._bar = Progress(
            f"training {run_dir.name}",
            total_steps,
            initial=start_step,
            enabled=cfg.progress,
            unit="step",
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
        if self._trackers is not None:
            self._trackers.log(step, metrics)
        shown = {k: metrics[k] for k in ("loss", "reverse_kl", "eval/reverse_kl") if k in metrics}
        if "tokens_per_s" in metrics:
            shown["tok/s"] = metrics["tokens_per_s"]
        if shown:  # before the update: a plain line printed by it shows this step's numbers
            self._bar.set_postfix({k: float(v) for k, v in shown.items()})
        if advance:
            self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._trackers is not None:
            self._trackers.close()


def per_own_tokens(metrics: dict[str, float]) -> None:
    """The learner divides every metric by all of the step's tokens. With a label task, its CE
    and the distilled rows' reverse KL are turned into means over their own tokens."""
    share = metrics.pop("label_tokens", None)
    if share is None:
        return
    metrics["label_token_fraction"] = share
    metrics["label_loss"] /= max(share, 1e-12)
    if "reverse_kl" in metrics:
        metrics["reverse_kl"] /= max(1.0 - share, 1e-12)


def step_metrics(
    samples: list[Sample], tokens: int, seconds: dict[str, float], step_time: float, version: int
) -> dict[str, float]:
    """A step's throughput and shape: time and tokens/s per stage, completion lengths, the share
    cut at max_new_tokens, the weight version trained."""
    out: dict[str, float] = {f"time/{k}": v for k, v in seconds.items()}
    for stage, secs in seconds.items():
        out[f"tokens_per_s/{stage}"] = tokens / max(secs, 1e-9)
    out["tokens_per_s"] = tokens / max(step_time, 1e-9)
    out["completion_tokens"] = tokens
    out["completion_len/mean"] = tokens / max(len(samples), 1)
    out["truncated_fraction"] = sum(s.finish_reason == "length" for s in samples) / len(samples)
    out["weight_version"] = version
    return out
