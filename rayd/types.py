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
from typing import Any

import numpy as np
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
    # Cross-entropy on the completion instead of the teacher signal: the on-policy modes' label
    # task (gold answers); the teacher does not score such a sample.
    hard_target: bool = False
    # [T, k] int64: the k most likely tokens of the sampling distribution at each completion
    # position, when the driver asked for them (teacher.support=student_topk or union).
    student_topk_ids: torch.Tensor | None = None
    # The prompt the teacher scores the completion after, when it differs from the student's
    # (teacher.privileged_context); None: prompt_ids.
    teacher_prompt_ids: list[int] | None = None
    # No teacher signal for this sample (privileged_context=feedback without a correct sample
    # of its prompt to show): the teacher is not asked, and the row leaves the loss.
    unscored: bool = False

    @property
    def teacher_prompt(self) -> list[int]:
        """What the teacher scores the completion after."""
        return self.prompt_ids if self.teacher_prompt_ids is None else self.teacher_prompt_ids

    @property
    def asks_teacher(self) -> bool:
        """Whether the teacher scores this sample (a label-task row or an unscored one: no)."""
        return not (self.hard_target or self.unscored)


@dataclass
class TeacherScore:
    """Teacher signal for the completion tokens of one sample."""

    token_logprobs: torch.Tensor  # [T] float32: log p_teacher(completion_t | prefix)
    # [T, k] int64: the support at each completion position: the teacher's top-k by default,
    # the student's top-k (or both) with teacher.support=student_topk (union)
    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor  # [T, k] float32: the teacher's log-probs at them (descending)
    logits: torch.Tensor | None = None  # [T, V] float32, only when a mode asks for full logits
    # [T, n, D] float32: the teacher's hidden states at the positions that predict each
    # completion token, for the n layers feature_kd aligns (None otherwise)
    hidden: torch.Tensor | None = None

    @classmethod
    def empty(cls, length: int, k: int = 1) -> TeacherScore:
        """No teacher signal (sft, step_by_step, label-task samples): zeros of the right shape
        for `collate`; `k` matches the top-k width of the batch's scored samples."""
        ids = torch.zeros((length, k), dtype=torch.long)
        return cls(torch.zeros(length), ids, torch.zeros((length, k)))


_PER_ROW = ("on_policy", "row_weight", "hard_target", "stale", "advantage", "teacher_offset")
# The teacher's own input (privileged context): columns of its own length
_TEACHER_INPUT = ("teacher_input_ids", "teacher_attention_mask")


def _to_array(tensor: torch.Tensor) -> np.ndarray | torch.Tensor:
    """A CPU tensor of a dtype numpy has as an array; anything else (bf16, a GPU) as it is."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 or tensor.requires_grad:
        return tensor
    return tensor.numpy()


def _batch_from_arrays(arrays: dict[str, Any]) -> TrainBatch:
    # An array Ray hands over out of band is read-only: the learner gets its own copy then.
    return TrainBatch(
        **{
            name: torch.from_numpy(a if a.flags.writeable else a.copy())
            if isinstance(a, np.ndarray)
            else a
            for name, a in arrays.items()
        }
    )


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
    hard_target: torch.Tensor = field(  # [B] bool: cross-entropy row (see Sample.hard_target)
        default_factory=lambda: torch.zeros(0, dtype=torch.bool)
    )
    # [B, L-1] float32, or empty: multiplies the per-token loss (reasoning-step weights, which
    # the driver sets after collate; see rayd/steps.py).
    token_weight: torch.Tensor = field(default_factory=lambda: torch.ones(0))
    # [B, L-1, n, D] float32 teacher hidden states (feature_kd); empty in every other mode
    teacher_hidden: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    # [B] bool: an on-policy row sampled by weights older than the learner's (trainer.
    # max_staleness >= 1); the top-k losses weight its tokens by a truncated importance ratio.
    # Empty when no row is stale.
    stale: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    # [B] float32, or empty: each row's task-reward advantage (algorithm.reward_weight > 0;
    # the driver sets it after collate, rayd/reward.py), 0 on rows without a reward.
    advantage: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    # A teacher in the learners shown privileged context scores each completion after its own
    # prompt: [B, Lt] int64 ids and mask of (teacher prompt + completion), and [B] int64 where
    # the completion starts there relative to the student's row (teacher prompt length -
    # prompt length), so target column j of the student is column j + offset of the teacher.
    # Empty otherwise.
    teacher_input_ids: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    teacher_attention_mask: torch.Tensor = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    teacher_offset: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickled as numpy arrays, which Ray passes out of band; a torch tensor goes through
        torch.save, which tripled a tiny step's batch's round trip
        (docs/experiments/performance.md)."""
        return _batch_from_arrays, (
            {f.name: _to_array(getattr(self, f.name)) for f in fields(self)},
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def slice(self, start: int, stop: int) -> TrainBatch:
        """Rows [start, stop), trimmed of columns that are padding in every remaining row."""
        rows = {f.name: getattr(self, f.name)[start:stop] for f in fields(self)}
        length = int(rows["attention_mask"].sum(dim=1).max().clamp(min=2))
        for name, value in rows.items():
            if name in _PER_ROW or name in _TEACHER_INPUT or value.dim() < 2:
                continue  # per row, the teacher's own columns, or an absent optional field
            rows[name] = value[
                :, : length if name in ("input_ids", "attention_mask") else length - 1
            ]
        if rows["teacher_attention_mask"].dim() == 2:
            own = int(rows["teacher_attention_mask"].sum(dim=1).max().clamp(min=2))
            for name in _TEACHER_INPUT:
                rows[name] = rows[name][:, :own]
        return TrainBatch(**rows)

    def take(self, rows: list[int]) -> TrainBatch:
        """These rows, in this order (columns untouched)."""
        index = torch.tensor(rows, dtype=torch.long)
        return TrainBatch(
            **{
                f.name: value if value.numel() == 0 else value[index]
                for f in fields(self)
                for value in [getattr(self, f.name)]
            }
        )

    def split(self, parts: int) -> list[TrainBatch]:
        """`parts` consecutive equal slices (the caller guarantees divisibility)."""
        if len(self) % parts:
            raise ValueError(f"batch of {len(self)} rows does not split into {parts} equal parts")
        size = len(self) // parts
        return [self.slice(i * size, (i + 1) * size) for i in range(parts)]


def collate(
    samples: list[Sample],
    scores: list[TeacherScore],
    pad_id: int,
    learner_version: int | None = None,
) -> TrainBatch:
    """Right-pad samples and their teacher scores into one TrainBatch. `learner_version`: the
    version of the weights the batch will train; on-policy rows sampled by an older one are
    marked stale."""
    if len(samples) != len(scores):
        raise ValueError(f"{len(samples)} samples but {len(scores)} teacher scores")
    k = max((s.topk_ids.shape[1] for s in scores), default=1)
    for sample, score in zip(samples, scores, strict=True):
        if not sample.prompt_ids:
            raise ValueError(f"sample of prompt {sample.prompt_index} has an empty prompt")
        if len(sample.logprobs) != len(sample.completion_ids):
            raise ValueError(
                f"sample of prompt {sample.prompt_index} has {len(sample.logprobs)} log-probs "
                f"for a completion of {len(sample.completion_ids)}"
            )
        if score.token_logprobs.shape[0] != len(sample.completion_ids):
            raise ValueError(
                f"teacher scored {score.token_logprobs.shape[0]} tokens for a completion of "
                f"{len(sample.completion_ids)}"
            )
        if score.topk_ids.shape[1] != k:
            raise ValueError(f"teacher scores mix top-k widths {score.topk_ids.shape[1]} and {k}")
    prompt_len = torch.tensor([len(s.prompt_ids) for s in samples])
    completion_len = torch.tensor([len(s.completion_ids) for s in samples])
    length = int((prompt_len + completion_len).max())
    b = len(samples)
    # Whole-batch tensor ops rather than a few per row: row by row, collating was a third of
    # the driver's time between two learner calls (docs/experiments/performance.md).
    input_ids = torch.tensor(
        [
            s.prompt_ids
            + s.completion_ids
            + [pad_id] * (length - len(s.prompt_ids) - len(s.completion_ids))
            for s in samples
        ],
        dtype=torch.long,
    )
    attention_mask = (torch.arange(length) < (prompt_len + completion_len)[:, None]).long()
    # Target column j predicts input_ids[j + 1]: completion token 0 sits at column p - 1.
    first = (prompt_len - 1)[:, None]
    columns = torch.arange(length - 1)
    loss_mask = (columns >= first) & (columns < first + completion_len[:, None])
    # A boolean mask selects row by row, each row's columns in order: the completions'
    # per-token values, concatenated in sample order, land where they belong.
    behavior = torch.zeros((b, length - 1))
    behavior[loss_mask] = torch.tensor(
        [lp for s in samples for lp in s.logprobs], dtype=torch.float32
    )
    teacher = torch.zeros((b, length - 1))
    teacher[loss_mask] = torch.cat([s.token_logprobs.float() for s in scores])
    topk_ids = torch.zeros((b, length - 1, k), dtype=torch.long)
    topk_ids[loss_mask] = torch.cat([s.topk_ids for s in scores])
    topk_lp = torch.zeros((b, length - 1, k))
    topk_lp[loss_mask] = torch.cat([s.topk_logprobs.float() for s in scores])
    on_policy = torch.tensor([s.on_policy for s in samples], dtype=torch.bool)
    row_weight = torch.tensor([s.weight for s in samples], dtype=torch.float32)
    # Left empty unless some row needs it: every micro-batch of a step then reports the same
    # metric names (the learner all-reduces them by name across ranks).
    hard_target = torch.tensor([s.hard_target for s in samples], dtype=torch.bool)
    if not hard_target.any():
        hard_target = hard_target[:0]
    hidden = _collate_hidden(samples, scores, length)
    stale = torch.tensor(
        [
            s.on_policy and learner_version is not None and s.weight_version < learner_version
            for s in samples
        ],
        dtype=torch.bool,
    )
    if not stale.any():  # as hard_target: every micro-batch then has the same fields
        stale = stale[:0]
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
        hard_target=hard_target,
        teacher_hidden=hidden,
        stale=stale,
    )


def training_batch(
    samples: list[Sample],
    scores: list[TeacherScore],
    pad_id: int,
    learner_version: int,
    drop_truncated: bool,
    teacher_inputs: bool = False,
) -> TrainBatch:
    """A step's samples and their teacher signal as the learners train them, wherever the
    batch is built (the driver, or each learner rank of a one-call step): `collate`, then the
    rows without a teacher signal (`Sample.unscored`) and, with rollout.truncated=drop
    (`drop_truncated`), completions cut at max_new_tokens leave the loss and its token count.
    Their rows stay: the learners expect a fixed row count. `teacher_inputs`: the learners
    hold the teacher, which scores some completions after prompts of its own (privileged
    context): the batch carries them (`TrainBatch.teacher_input_ids`)."""
    batch = collate(samples, scores, pad_id, learner_version=learner_version)
    for row, sample in enumerate(samples):
        cut = drop_truncated and sample.on_policy and sample.finish_reason == "length"
        if sample.unscored or cut:
            batch.loss_mask[row] = False
    if teacher_inputs and any(s.teacher_prompt_ids is not None for s in samples):
        rows = [s.teacher_prompt + s.completion_ids for s in samples]
        width = max(map(len, rows))
        batch.teacher_input_ids = torch.tensor(
            [row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long
        )
        lengths = torch.tensor([len(row) for row in rows])
        batch.teacher_attention_mask = (torch.arange(width) < lengths[:, None]).long()
        batch.teacher_offset = torch.tensor(
            [len(s.teacher_prompt) - len(s.prompt_ids) for s in samples], dtype=torch.long
        )
    return batch


def _collate_hidden(samples: list[Sample], scores: list[TeacherScore], length: int) -> torch.Tensor:
    """Teacher hidden states at the target columns, [B, L-1, n, D]; empty when none were sent."""
    present = [s.hidden is not None for s in scores]
    if not any(present):
        return torch.zeros(0)
    if not all(present):
        raise ValueError("teacher hidden states for some samples of a batch but not others")
    n, d = scores[0].hidden.shape[1:]  # type: ignore[union-attr]
    out = torch.zeros((len(samples), length - 1, n, d))
    for i, (sample, score) in enumerate(zip(samples, scores, strict=True)):
        p, t = len(sample.prompt_ids), len(sample.completion_ids)
        out[i, p - 1 : p - 1 + t] = score.hidden.float()  # type: ignore[union-attr]
    return out


def length_buckets(lengths: list[int], ranks: int, micro_batches: int) -> list[int]:
    """A row order that gives every micro-batch rows of similar length and every rank a similar
    share of tokens, for a batch split into `ranks` consecutive shards of `micro_batches`
    consecutive micro-batches (TrainBatch.split, which trims each micro-batch's padding).

    Rows sorted longest first are cut into ranks x micro_batches groups; round r of groups goes
    to the ranks in snake order (0..R-1, then R-1..0), so no rank always gets the longest group.
    Only the order changes: the loss is a sum over tokens divided by the global token count.
    """
    groups = ranks * micro_batches
    if len(lengths) % groups:
        raise ValueError(f"{len(lengths)} rows do not split into {ranks} x {micro_batches} parts")
    size = len(lengths) // groups
    by_length = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    shards: list[list[int]] = [[] for _ in range(ranks)]
    for g in range(groups):
        round_, pos = divmod(g, ranks)
        rank = pos if round_ % 2 == 0 else ranks - 1 - pos
        shards[rank].extend(by_length[g * size : (g + 1) * size])
    return [row for shard in shards for row in shard]


def padded_cells(lengths: list[int], ranks: int, micro_batches: int) -> int:
    """Token positions the learners compute when the batch, in this row order, is split into
    ranks x micro_batches consecutive micro-batches each trimmed to its longest row."""
    groups = ranks * micro_batches
    size = len(lengths) // groups
    return sum(max(lengths[g * size : (g + 1) * size]) * size for g in range(groups))
