"""What the pipelined loop (trainer.max_staleness >= 1) keeps between steps, and the teacher
scoring that runs beside the rollouts.

- `TeacherStream`: the teacher scores each rollout worker's chunk as soon as it arrives, on one
  background thread, while the driver waits for the other chunks; results are put back in chunk
  order, so nothing depends on which worker finished first.
- `Draw` -> `Pending` -> `Prepared` -> `Trained`: one step's prompts, its rollouts (the teacher
  still scoring), its teacher signal, its learner step. Pipelined, the next step's rollouts run
  on a thread of their own while the teacher scores this step's and the learners train on it.
- `Prepared`: one step's samples and teacher signal, made before its learner step starts (the
  previous step's learner step runs meanwhile). Its samples go into a checkpoint's driver state
  (`to_state` / `from_state`): they came from weights the checkpoint does not hold.
- `check_staleness` / `staleness_metrics`: every on-policy sample is at most max_staleness
  weight versions behind the learner that trains it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from rayd.data.prompts import Prompt
from rayd.metrics import StageTimer
from rayd.teacher.group import Scored
from rayd.types import Sample, TeacherScore


class TeacherStream:
    """Chunks of samples in, their teacher signal out, scored while more chunks arrive.

    `score` is called with the chunk's samples the teacher scores (not the hard targets) on
    `thread`, a one-worker executor the run's streams share: the teacher pools are only ever
    touched by that thread while a stream is open (their fault counts and restore state need
    no locks), and one step's calls run before the next step's. Without a teacher
    (`score=None`) the stream only keeps the chunks in order.
    """

    def __init__(
        self, score: Callable[[list[Sample]], Scored] | None, thread: ThreadPoolExecutor
    ) -> None:
        self._score = score
        self._thread = thread
        self._chunks: dict[int, list[Sample]] = {}
        self._futures: dict[int, Future[Scored]] = {}

    def add(self, key: int, samples: list[Sample]) -> None:
        """Chunk `key` (the order `finish` returns chunks in) starts scoring now."""
        self._chunks[key] = samples
        scored = [s for s in samples if s.asks_teacher]
        if self._score is not None and scored:
            self._futures[key] = self._thread.submit(self._score, scored)

    @contextmanager
    def cancel_on_error(self) -> Iterator[None]:
        """If the rollouts fail, wait for the teacher calls already made before the error goes
        on (the caller will shut the actors down) and start no more."""
        try:
            yield
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Drops the calls not started and waits for the running one (the shared thread goes
        on)."""
        # A cancelled call counts as done for `wait` only once the thread has dequeued it.
        wait_futures([f for f in self._futures.values() if not f.cancel()])

    def finish(self) -> tuple[list[list[Sample]], Scored | None]:
        """The chunks in key order, and the teacher's signal on their scored samples in the
        same order (None without a teacher). Every call is waited for before an error is
        raised: no teacher call may go on behind the driver's back."""
        chunks = [self._chunks[k] for k in sorted(self._chunks)]
        if self._score is None:
            return chunks, None
        try:
            wait_futures(list(self._futures.values()))
            parts = [self._futures[k].result() for k in sorted(self._futures)]
        finally:
            self.close()
        return chunks, Scored.concat(parts)


@dataclass
class Draw:
    """One step's prompts, drawn on the driver's thread: the indices the sampler gave, the
    prompts the student rolls out, and the samples that need no rollout."""

    step: int
    prompt_indices: list[int]
    on_policy: list[Prompt]
    extra: list[Sample]


@dataclass
class Pending:
    """One step's rollouts, in; the teacher may still be scoring them on its stream."""

    step: int
    stream: TeacherStream
    prompt_indices: list[int]
    timer: StageTimer = field(default_factory=StageTimer)


@dataclass
class Prepared:
    """One step's training data, ready for its learner step."""

    step: int
    chunks: list[list[Sample]]  # as the teacher scored them (one per rollout worker, then extras)
    prompt_indices: list[int] = field(default_factory=list)  # the sampler's draw for this step
    scores: list[TeacherScore] = field(default_factory=list)
    teacher_stats: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # rollout / teacher / sync times

    @property
    def samples(self) -> list[Sample]:
        return [s for chunk in self.chunks for s in chunk]

    def to_state(self) -> dict[str, Any]:
        """JSON for a checkpoint's driver state: the samples only (the teacher signal is
        recomputed from them on resume; it is large and deterministic)."""
        return {
            "step": self.step,
            "chunks": [[_sample_state(s) for s in c] for c in self.chunks],
            "prompt_indices": self.prompt_indices,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Prepared:
        chunks = [[_sample_from_state(s) for s in c] for c in state["chunks"]]
        return cls(step=state["step"], chunks=chunks, prompt_indices=state["prompt_indices"])


@dataclass
class Trained:
    """One step done: what it trained on, the learners' metrics, and the driver's own
    statistics of the batch (the task reward, step weighting)."""

    work: Prepared
    metrics: dict[str, Any]
    stats: dict[str, float]


def _sample_state(sample: Sample) -> dict[str, Any]:
    out = asdict(sample)
    ids = sample.student_topk_ids
    out["student_topk_ids"] = None if ids is None else ids.tolist()
    return out


def _sample_from_state(state: dict[str, Any]) -> Sample:
    ids = state["student_topk_ids"]
    tensor = None if ids is None else torch.tensor(ids, dtype=torch.long)
    return Sample(**{**state, "student_topk_ids": tensor})


def check_staleness(samples: list[Sample], version: int, max_staleness: int) -> None:
    """Every on-policy sample comes from weights at most `max_staleness` versions behind the
    learner's `version` (and never from the future)."""
    versions = {s.weight_version for s in samples if s.on_policy}
    bad = {v for v in versions if not 0 <= version - v <= max_staleness}
    if bad:
        raise RuntimeError(
            f"rollouts from weight versions {sorted(bad)} for a learner at version {version}; "
            f"trainer.max_staleness={max_staleness} allows {version - max_staleness}..{version}"
        )


def staleness_metrics(samples: list[Sample], version: int) -> dict[str, float]:
    """How many versions the on-policy samples lag the learner that trains them."""
    lags = [version - s.weight_version for s in samples if s.on_policy]
    if not lags:
        return {"staleness/mean": 0.0, "staleness/max": 0.0}
    return {"staleness/mean": sum(lags) / len(lags), "staleness/max": float(max(lags))}
