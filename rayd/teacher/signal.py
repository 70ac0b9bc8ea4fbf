"""The teacher signal of a step's samples, from the one place a run takes it (`TeacherSource`,
chosen once at set-up): asked of the teacher actors, read from a stored `rayd score` dataset,
computed by the learners themselves, or none. Lined up with the samples: hard targets and
teacher-free modes get empty scores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

from rayd.config import TeacherConfig
from rayd.data.prompts import Prompt
from rayd.teacher.group import LearnerTeacher, Scored, Teachers
from rayd.teacher.stored import StoredSignal
from rayd.types import Sample, TeacherScore

# actors: teacher actors score each rollout chunk as it arrives (the driver's thread waits);
# stored: a `rayd score` dataset holds it (logit_kd), no teacher model is loaded;
# learners: each learner rank holds the teacher (teacher.support=full), the batch carries none;
# none: the mode trains without a teacher (sft, step_by_step).
TeacherSource = Literal["actors", "stored", "learners", "none"]


def teacher_source(needs_teacher: bool, support: str, stored: bool) -> TeacherSource:
    """Where a run's teacher signal comes from: `needs_teacher` (algorithm.needs_teacher),
    `support` (teacher.support), `stored` (whether the dataset carries a `rayd score` signal)."""
    if not needs_teacher:
        return "none"
    if stored:
        return "stored"
    return "learners" if support == "full" else "actors"


def ask_teacher(
    section: TeacherConfig,
    teacher: Teachers,
    samples: list[Sample],
    features: Sequence[tuple[int, int]] = (),
    prompts: Sequence[Prompt] = (),
) -> Scored:
    """The teacher actors' signal on `samples` (each `asks_teacher`), each completion scored
    after the teacher's prompt (`Sample.teacher_prompt`: privileged context shown or not): with
    hidden states of the feature_kd layers; with several teachers their combination (`prompts`,
    indexed by the samples' prompt_index, pick routed teachers)."""
    pairs = [(s.teacher_prompt, s.completion_ids) for s in samples]
    routing = [prompts[s.prompt_index] for s in samples] if section.combine == "route" else []
    if section.support == "teacher_topk":
        extra = {"hidden_layers": [layer for _, layer in features]} if features else {}
        return teacher.score("score", pairs, prompts=routing, top_k=section.top_k, **extra)
    # The student's top-k came with its rollouts (config: every sample is on-policy); the
    # teacher's exact log-probs at them make the top-k losses compare over the student's
    # support.
    ids = [s.student_topk_ids for s in samples]
    if any(i is None for i in ids):
        raise RuntimeError(
            f"teacher.support={section.support}: a sample came without the student's ids"
        )
    add = section.top_k if section.support == "union" else 0
    return teacher.score("score_ids", pairs, ids, prompts=routing, add_top_k=add)


class TeacherSignal:
    """A run's teacher signal, from its one `source`.

    `handle` is what the held-out eval scores with (the actors, or the learners' teacher) and
    whose faults are counted; None with a stored signal or no teacher."""

    def __init__(
        self,
        source: TeacherSource,
        section: TeacherConfig,
        handle: Teachers | LearnerTeacher | None,
        stored: StoredSignal | None,
        features: Sequence[tuple[int, int]],
        prompts: Sequence[Prompt],
    ) -> None:
        if (source == "stored") != (stored is not None):
            raise ValueError(f"teacher source {source!r} with stored signal {stored is not None}")
        if (source in ("actors", "learners")) != (handle is not None):
            raise ValueError(f"teacher source {source!r} with handle {handle!r}")
        self.source, self.section, self.handle, self.stored = source, section, handle, stored
        self.features, self.prompts = features, prompts

    @property
    def scorer(self) -> Callable[[list[Sample]], Scored] | None:
        """What a `TeacherStream` calls with each arriving chunk: the actors' scoring, or None
        when no actor scores (stored signal, in the learners, no teacher)."""
        if self.source != "actors":
            return None
        return partial(
            ask_teacher,
            self.section,
            self.handle,
            features=self.features,
            prompts=self.prompts,
        )

    @property
    def has_stage(self) -> bool:
        """Whether the step has a teacher stage of its own to time (actors score, or the
        stored signal is read); in the learners it is part of the learner step."""
        return self.source in ("actors", "stored")

    @property
    def has_signal(self) -> bool:
        """Whether the step's metrics compare the student with a teacher (reverse_kl)."""
        return self.source != "none"

    @property
    def faults(self) -> int:
        return self.handle.faults if self.handle is not None else 0

    def signal(
        self, samples: list[Sample], scored: Scored | None
    ) -> tuple[list[TeacherScore], dict[str, float]]:
        """Per sample, its teacher signal: read from the stored dataset, or what the actors
        said (`scored`, on the samples that are not hard targets, in order); the label task's
        samples (cross-entropy on gold answers), the learners' teacher and the teacher-free
        modes get empty scores. Also the per-teacher metrics (several teachers only)."""
        if self.stored is not None:
            return self.stored.scores([s.prompt_index for s in samples]), {}
        if self.source != "actors" or scored is None:
            return [TeacherScore.empty(len(s.completion_ids)) for s in samples], {}
        assert isinstance(self.handle, Teachers)
        asked = [s for s in samples if s.asks_teacher]
        got, stats = scored.scores, self.handle.metrics(asked, scored, "teacher/")
        if len(asked) == len(samples):
            return got, stats
        width = got[0].topk_ids.shape[1] if got else self.section.top_k
        it = iter(got)
        return [
            next(it) if s.asks_teacher else TeacherScore.empty(len(s.completion_ids), width)
            for s in samples
        ], stats
