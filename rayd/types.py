"""Typed containers that cross actor boundaries.

Conventions used everywhere in rayd:
- A *sample* is one prompt plus one completion, as token ids of the student tokenizer.
- Per-token teacher/student quantities cover the completion tokens only (T = len(completion)).
- In a padded `TrainBatch` every per-token tensor is aligned with the *targets*: column j holds the
  quantity for token `input_ids[:, j + 1]`, which the model predicts from `logits[:, j]`. So they
  all have L - 1 columns, and `loss_mask` marks which targets are completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Sample:
    """One rollout: a prompt and the completion the student (or a dataset) produced for it."""

    prompt_ids: list[int]
    completion_ids: list[int]
    # Log-prob of each completion token under the policy that sampled it (behaviour policy).
    # For off-policy completions (from a dataset) this is NaN-free zeros and `on_policy` is False.
    logprobs: list[float]
    prompt_index: int  # index into the prompt source, for exactly-once accounting
    finish_reason: str = "stop"  # "stop" | "length"
    weight_version: int = 0  # version of the student weights that produced it
    on_policy: bool = True
    text: str = ""
    weight: float = 1.0  # multiplies this sample's per-token loss (step_by_step's rationale task)
    # [T, k] int64: the k most likely tokens of the sampling distribution at each completion
    # position, when the driver asked for them (teacher.support=student_topk or union).
    student_topk_ids: torch.Tensor | None = None


@dataclass
class TeacherScore:
    """Teacher signal for the completion tokens of one sample."""

    token_logprobs: torch.Tensor  # [T] float32: log p_teacher(completion_t | prefix)
    # [T, k] int64: the support at each completion position: the teacher's top-k by default,
    # the student's top-k (or both) with teacher.support=student_topk (union)
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor  # [T, k] float32: the teacher's log-probs at them (descending)
    logits: torch.Tensor | None = None  # [T, V] float32, only when a mode asks for full logits

    @classmethod
    def empty(cls, length: int) -> TeacherScore:
        """No teacher signal (sft, step_by_step): zeros of the right shape for `collate`."""
        ids = torch.zeros((length, 1), dtype=torch.long)
        return cls(torch.zeros(length), ids, torch.zeros((length, 1)))


_PER_ROW = ("on_policy", "row_weight")


@dataclass
class TrainBatch:
    """A padded batch for the learner. Per-token tensors have L - 1 columns (see module doc)."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    loss_mask: torch.Tensor  # [B, L-1] bool: target is a completion token
    behavior_logprobs: torch.Tensor  # [B, L-1] float32 (0 where masked)
    teacher_logprobs: torch.Tensor  # [B, L-1] float32 (0 where masked)
    teacher_topk_ids: torch.Tensor  # [B, L-1, k] int64 (0 where masked)
    teacher_topk_logprobs: torch.Tensor  # [B, L-1, k] float32 (0 where masked)
    on_policy: torch.Tensor = field(default_factory=lambda: torch.ones(0, dtype=torch.bool))  # [B]
    row_weight: torch.Tensor = field(default_factory=lambda: torch.ones(0))  # [B] float32

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop), trimmed of columns that are padding in every remaining row."""
        rows = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)}
        length = int(rows["attention_mask"].sum(dim=1).max().clamp(min=2))
        for name, value in rows.items():
            if name in _PER_ROW:
                continue
            rows[name] = value[
                :, : length if name in ("input_ids", "attention_mask") else length - 1
            ]
        return TrainBatch(**rows)

    def split(self, parts: int) -> list[TrainBatch]:
        """`parts` consecutive equal slices (the caller guarantees divisibility)."""
        if len(self) % parts:
            raise ValueError(f"batch of {len(self)} rows does not split into {parts} equal parts")
        size = len(self) // parts
        return [self.slice(i * size, (i + 1) * size) for i in range(parts)]


def collate(samples: list[Sample], scores: list[TeacherScore], pad_id: int) -> TrainBatch:
    """Right-pad samples and their teacher scores into one TrainBatch."""
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} teacher scores")
    k = max((s.topk_ids.shape[1] for s in scores), default=1)
    length = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    b = len(samples)
    input_ids = torch.full((b, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, length), dtype=torch.long)
    loss_mask = torch.zeros((b, length - 1), dtype=torch.bool)
    behavior = torch.zeros((b, length - 1))
    teacher = torch.zeros((b, length - 1))
    topk_ids = torch.zeros((b, length - 1, k), dtype=torch.long)
    topk_lp = torch.zeros((b, length - 1, k))
    for i, (sample, score) in enumerate(zip(samples, scores, strict=True)):
        p, t = len(sample.prompt_ids), len(sample.completion_ids)
        if score.token_logprobs.shape[0] != t:
            raise ValueError(
                f"teacher scored {score.token_logprobs.shape[0]} tokens for a completion of {t}"
            )
        input_ids[i, : p + t] = torch.tensor(sample.prompt_ids + sample.completion_ids)
        attention_mask[i, : p + t] = 1
        # Target column j predicts input_ids[j + 1]: completion token 0 sits at column p - 1.
        cols = slice(p - 1, p - 1 + t)
        loss_mask[i, cols] = True
        behavior[i, cols] = torch.tensor(sample.logprobs, dtype=torch.float32)
        teacher[i, cols] = score.token_logprobs.float()
        if score.topk_ids.shape[1] != k:
            raise ValueError(f"teacher scores mix top-k widths {score.topk_ids.shape[1]} and {k}")
        topk_ids[i, cols] = score.topk_ids
        topk_lp[i, cols] = score.topk_logprobs.float()
    on_policy = torch.tensor([s.on_policy for s in samples], dtype=torch.bool)
    row_weight = torch.tensor([s.weight for s in samples], dtype=torch.float32)
    return TrainBatch(
        input_ids,
        attention_mask,
        loss_mask,
        behavior,
        teacher,
        topk_ids,
        topk_lp,
        on_policy,
        row_weight,
    )
