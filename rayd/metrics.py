"""Per-step metrics: JSON lines in the run folder, TensorBoard events, progress on the console
(a bar in a terminal, plain periodic lines in a log file: rayd/progress.py)."""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from rayd.config import ConfigError, LoggingConfig, RunConfig
from rayd.progress import Progress
from rayd.types import Sample, TeacherScore


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


def open_step_log(path: Path, start_step: int) -> TextIO:
    """A per-step JSON-lines log for appending. `start_step` > 0 resumes a run: records after
    that step (work the checkpoint does not hold, which will be redone) are dropped; a fresh
    start in a reused folder moves the old log aside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if start_step and path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by the crash that interrupted the run
            if record.get("step", 0) <= start_step:
                kept.append(line)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    elif path.exists():
        path.rename(path.with_name(f"{path.stem}-before-{int(time.time())}{path.suffix}"))
    return path.open("a")


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
        self._trackers = trackers
        self.path = run_dir / "metrics.jsonl"
        self._file = open_step_log(self.path, start_step)
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


def position_weight_means(metrics: dict[str, float], quarters: int = 4) -> None:
    """algorithm.position_weighting: the learner sums the weights, their squares and their
    token counts per quarter of each completion over the step (divided by all of its tokens);
    turned here into the weights' mean and spread over the weighted tokens and each quarter's
    mean (iw_opd/weight_q1: the first quarter of every completion)."""
    counts = [metrics.pop(f"iw_opd/tokens_q{q + 1}", None) for q in range(quarters)]
    if "iw_opd/weight" not in metrics or any(c is None for c in counts):
        return
    tokens = max(sum(counts), 1e-12)  # type: ignore[arg-type]
    mean = metrics["iw_opd/weight"] / tokens
    square = metrics.pop("iw_opd/weight_sq") / tokens
    metrics["iw_opd/weight"] = mean
    metrics["iw_opd/weight_std"] = max(square - mean * mean, 0.0) ** 0.5
    for q, count in enumerate(counts):
        key = f"iw_opd/weight_q{q + 1}"
        value = metrics.pop(key)
        if count:  # every completion shorter than four tokens leaves a quarter empty
            metrics[key] = value / count


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


class SamplesLog:
    """samples.jsonl in the run folder (logging.samples): one line per training sample of
    every step, as the learners got it; docs/usage.md gives the fields and their size.
    `level`: "tokens" (the sample: ids, text, behaviour log-probs, version, flags) or
    "signal" (also its teacher signal: token log-probs and the top-k ids and log-probs, or
    null where it has none: a label-task row, a teacher inside the learners, no teacher)."""

    def __init__(self, run_dir: Path, level: str, start_step: int = 0) -> None:
        if level not in ("tokens", "signal"):
            raise ValueError(f"samples log level {level!r}: expected 'tokens' or 'signal'")
        self.level = level
        self.path = run_dir / "samples.jsonl"
        self._file = open_step_log(self.path, start_step)

    def log(self, step: int, samples: list[Sample], scores: list[TeacherScore] | None) -> None:
        """`scores`: the samples' teacher signal, or None where the batch carries none (the
        teacher inside the learners, no teacher); a hard target's is never logged."""
        lines = []
        for i, sample in enumerate(samples):
            record: dict[str, Any] = {"step": step, **sample_record(sample)}
            if self.level == "signal":
                scored = scores is not None and sample.asks_teacher
                record["teacher"] = signal_record(scores[i]) if scored else None  # type: ignore[index]
            lines.append(json.dumps(record))
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def sample_record(sample: Sample) -> dict[str, Any]:
    """A sample as plain JSON values (`Sample` field names)."""
    ids = sample.student_topk_ids
    return {
        "prompt_index": sample.prompt_index,
        "prompt_ids": list(sample.prompt_ids),
        "completion_ids": list(sample.completion_ids),
        "text": sample.text,
        "logprobs": list(sample.logprobs),
        "finish_reason": sample.finish_reason,
        "weight_version": sample.weight_version,
        "on_policy": sample.on_policy,
        "hard_target": sample.hard_target,
        "weight": sample.weight,
        "student_topk_ids": None if ids is None else ids.tolist(),
        "teacher_prompt_ids": sample.teacher_prompt_ids,
        "unscored": sample.unscored,
    }


def signal_record(score: TeacherScore) -> dict[str, Any]:
    """A sample's teacher signal as plain JSON values (`TeacherScore` field names)."""
    return {
        "token_logprobs": score.token_logprobs.tolist(),
        "topk_ids": score.topk_ids.tolist(),
        "topk_logprobs": score.topk_logprobs.tolist(),
    }
