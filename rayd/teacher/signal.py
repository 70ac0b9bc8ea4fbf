"""The teacher signal of a step's samples: asked of the teacher actors, or read from a stored
`rayd score` dataset, and lined up with the samples (hard targets and teacher-free modes get
empty scores)."""

from __future__ import annotations

from collections.abc import Sequence

from rayd.config import RunConfig
from rayd.data.prompts import Prompt
from rayd.teacher.group import Scored, Teachers
from rayd.teacher.stored import StoredSignal
from rayd.types import Sample, TeacherScore


def ask_teacher(
    cfg: RunConfig,
    teacher: Teachers,
    samples: list[Sample],
    features: Sequence[tuple[int, int]] = (),
    prompts: Sequence[Prompt] = (),
) -> Scored:
    """The teacher actors' signal on `samples` (none a hard target): with hidden states of the
    feature_kd layers; with several teachers their combination (`prompts`, indexed by the
    samples' prompt_index, pick routed teachers)."""
    t = cfg.teacher
    pairs = [(s.prompt_ids, s.completion_ids) for s in samples]
    routing = [prompts[s.prompt_index] for s in samples] if t.combine == "route" else []
    if t.support == "teacher_topk":
        extra = {"hidden_layers": [layer for _, layer in features]} if features else {}
        return teacher.score("score", pairs, prompts=routing, top_k=t.top_k, **extra)
    # The student's top-k came with its rollouts (config: every sample is on-policy); the
    # teacher's exact log-probs at them make the top-k losses compare over the student's
    # support.
    ids = [s.student_topk_ids for s in samples]
    if any(i is None for i in ids):
        raise RuntimeError(f"teacher.support={t.support}: a sample came without the student's ids")
    add = t.top_k if t.support == "union" else 0
    return teacher.score("score_ids", pairs, ids, prompts=routing, add_top_k=add)


def teacher_signal(
    cfg: RunConfig,
    teacher: Teachers | None,
    stored: StoredSignal | None,
    samples: list[Sample],
    scored: Scored | None,
) -> tuple[list[TeacherScore], dict[str, float]]:
    """Per sample, its teacher signal: read from a `rayd score` dataset, or what the teacher
    actors said (`scored`, on the samples that are not hard targets, in order); the label
    task's samples (cross-entropy on gold answers) and the teacher-free modes get empty
    scores. Also the per-teacher metrics (several teachers only)."""
    if stored is not None:
        return stored.scores([s.prompt_index for s in samples]), {}
    if teacher is None or scored is None:
        return [TeacherScore.empty(len(s.completion_ids)) for s in samples], {}
    asked = [s for s in samples if not s.hard_target]
    got, stats = scored.scores, teacher.metrics(asked, scored, "teacher/")
    if len(asked) == len(samples):
        return got, stats
    width = got[0].topk_ids.shape[1] if got else cfg.teacher.top_k
    it = iter(got)
    return [
        TeacherScore.empty(len(s.completion_ids), width) if s.hard_target else next(it)
        for s in samples
    ], stats
