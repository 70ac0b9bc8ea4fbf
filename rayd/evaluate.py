"""Held-out evaluation with the live rollout and teacher actors.

Reverse KL(student || teacher) is estimated on the student's own samples, per token:
    mean_t [log p_student(x_t) - log p_teacher(x_t)],  x ~ student at temperature 1,
the quantity on-policy distillation minimises. A fixed seed makes successive evals comparable.
With several teachers the teacher is the one training distils from: the ensemble's exact
log sum_i w_i p_i(x_t), or under routing each prompt's own teacher; eval/teacher/<name>/
reverse_kl adds each teacher's alone (ensemble: on every sample; route: on its prompts).
Accuracy (greedy decoding + the task's verifier) is added when the prompts come from a task.
"""

from __future__ import annotations

from rayd.cluster import WorkerPool
from rayd.config import RunConfig
from rayd.data.prompts import Prompt
from rayd.tasks.base import Task
from rayd.teacher.group import LearnerTeacher, Teachers


def heldout_metrics(
    rollout: WorkerPool,
    teacher: Teachers | LearnerTeacher | None,
    prompts: list[Prompt],
    task: Task | None,
    cfg: RunConfig,
    version: int,
) -> dict[str, float]:
    ids, indices = [p.ids for p in prompts], [p.index for p in prompts]
    samples = rollout.map_chunks(
        "generate",
        ids,
        indices,
        n=1,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=cfg.rollout.max_new_tokens,
        seed=cfg.trainer.seed,
        expect_version=version,
    )
    tokens = sum(len(s.completion_ids) for s in samples)
    out = {"eval/completion_len": tokens / len(samples)}
    if teacher is not None:  # runs without a teacher (sft, step_by_step) report accuracy only
        routing = [prompts[s.prompt_index] for s in samples]
        pairs = [(s.prompt_ids, s.completion_ids) for s in samples]
        # Only the sampled tokens' log-probs are used: no exact pass over an ensemble's support.
        scored = teacher.score("score", pairs, prompts=routing, mix_support=False, top_k=1)
        gap = sum(
            sum(s.logprobs) - float(sc.token_logprobs.sum())
            for s, sc in zip(samples, scored.scores, strict=True)
        )
        out["eval/reverse_kl"] = gap / max(tokens, 1)
        out.update(teacher.metrics(samples, scored, "eval/teacher/"))
    if task is not None:
        greedy = rollout.map_chunks(
            "generate",
            ids,
            indices,
            n=1,
            temperature=0.0,
            top_p=1.0,
            max_new_tokens=cfg.rollout.max_new_tokens,
            expect_version=version,
        )
        correct = [
            task.is_correct(s.text, p.answer or "") for s, p in zip(greedy, prompts, strict=True)
        ]
        out["eval/accuracy"] = sum(correct) / len(correct)
    return out
