"""What the learners are built from: one frozen `LearnerSpec`, made once from the run config.

`LearnerGroup`, `LearnerWorker` and `DeepSpeedLearner` take the spec whole, and nothing here has
a default: every field comes from `LearnerSpec.from_config`, so rayd/config.py is the one place
defaults live. The optimizer section travels as the config's own `OptimConfig`: a new optimizer
setting is declared in config.py and read where it is used (deepspeed_backend.py), nothing more.

Importing this module does not import DeepSpeed (which must wait for `rayd.device`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig

from rayd.config import LoraConfig, OptimConfig, RunConfig
from rayd.losses import LossSpec
from rayd.rollout.spec import EngineSpec
from rayd.types import TrainBatch, length_buckets, padded_cells


@dataclass(frozen=True)
class LearnerSpec:
    """Every setting of the learner role. Group fields are read by `LearnerGroup` only; the rest
    by each rank (`LearnerWorker` -> `DeepSpeedLearner`)."""

    model_path: str  # the resolved student checkpoint
    loss: LossSpec
    # The group: ranks, their Ray resources, the deadline of every call, row ordering.
    num_learners: int
    cpus_per_learner: float
    gpus_per_learner: float
    call_timeout_s: float
    length_bucketing: bool
    # Each rank.
    zero_stage: int
    micro_batch_size: int
    grad_accum: int
    threads: int
    optim: OptimConfig  # learner.optim as validated (not mutated: treat it as frozen)
    gradient_checkpointing: bool
    offload_optimizer: bool
    offload_params: bool
    lora: LoraConfig | None  # learner.lora as validated (frozen, like optim)
    total_steps: int  # trainer.max_steps: where a linear lr schedule reaches 0
    dtype: str  # models.student.dtype
    seed: int  # trainer.seed
    # The teacher each rank holds (teacher.support=full, or the student's own for an EMA
    # teacher: models.teacher: self), else None
    teacher_path: str | None
    teacher_dtype: str
    # models.teacher: self: which of the student's weights teach (frozen, live, ema; the ranks
    # keep the EMA and publish it to teacher actors); None: another model teaches, or none.
    self_teacher: str | None
    ema_rate: float  # teacher.ema_rate
    # rollout.backend=learner: each rank samples its share of the rollouts with its live
    # weights, as a rollout engine of this spec would; None: rollout actors sample.
    rollout: EngineSpec | None
    # Merged last into the DeepSpeed config, key by key; None from the config (a test's knob).
    ds_overrides: dict[str, Any] | None

    @property
    def rows_per_step(self) -> int:
        """Rows of one optimizer step over the whole group."""
        return self.num_learners * self.micro_batch_size * self.grad_accum

    def shards(self, batch: TrainBatch) -> tuple[list[TrainBatch], float]:
        """A step's batch as the ranks train it: one shard per rank, in rank order, and the
        share of the positions they compute that is padding. The driver splits the batch it
        built so; a rank that built the batch itself (`LearnerWorker.roll_out_and_train`)
        takes its own shard of the same split."""
        if len(batch) != self.rows_per_step:
            raise ValueError(
                f"learner batch has {len(batch)} rows but num_learners x micro_batch_size x "
                f"grad_accum = {self.rows_per_step}: the driver must build batches of exactly "
                "that size"
            )
        splits = (self.num_learners, self.grad_accum)  # ranks x micro-batches
        lengths = batch.attention_mask.sum(dim=1).tolist()
        if self.length_bucketing:  # similar lengths per micro-batch: less padding computed
            order = length_buckets(lengths, *splits)
            batch = batch.take(order)
            lengths = [lengths[i] for i in order]
        pad_fraction = 1.0 - sum(lengths) / max(padded_cells(lengths, *splits), 1)
        return batch.split(self.num_learners), pad_fraction

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        student: str,
        teacher: str | None = None,
        features: Sequence[tuple[int, int]] = (),
    ) -> LearnerSpec:
        """`student`, `teacher`: resolved paths (`workers.check_models`); `teacher` is the first
        teacher, held by the learners when teacher.support=full and measured for feature_kd's
        projections; `features`: feature_kd's layer pairs (`workers.feature_pairs`)."""
        ln = cfg.learner
        loss = loss_spec(cfg, features, teacher)
        self_teacher = cfg.teacher.weights if cfg.models.self_taught else None
        # A copy of the teacher in every rank: to score (full vocabulary), or to keep the EMA
        # the teacher actors get; a live self-teacher is the rank's own model.
        holds_teacher = self_teacher != "live" and (loss.full_vocab or self_teacher == "ema")
        return cls(
            model_path=student,
            loss=loss,
            num_learners=ln.num_learners,
            cpus_per_learner=ln.cpus_per_learner,
            gpus_per_learner=ln.gpus_per_learner,
            call_timeout_s=cfg.trainer.call_timeout_s,
            length_bucketing=ln.length_bucketing,
            zero_stage=ln.zero_stage,
            micro_batch_size=ln.micro_batch_size,
            grad_accum=ln.grad_accum,
            threads=ln.threads,
            optim=ln.optim.model_copy(),
            gradient_checkpointing=ln.gradient_checkpointing,
            offload_optimizer=ln.offload_optimizer,
            offload_params=ln.offload_params,
            lora=ln.lora.model_copy() if ln.lora is not None else None,
            total_steps=cfg.trainer.max_steps,
            dtype=cfg.models.student.dtype,
            seed=cfg.trainer.seed,
            teacher_path=teacher if holds_teacher else None,
            teacher_dtype=cfg.models.teacher_list[0].dtype if holds_teacher else "auto",
            self_teacher=self_teacher,
            ema_rate=cfg.teacher.ema_rate,
            rollout=EngineSpec.rollout(cfg, student) if cfg.rollout.backend == "learner" else None,
            ds_overrides=None,
        )


def loss_spec(
    cfg: RunConfig, features: Sequence[tuple[int, int]] = (), teacher: str | None = None
) -> LossSpec:
    """The loss the learners compute, from the `algorithm:` section (and teacher.support);
    `teacher`'s hidden size sizes feature_kd's projections (read only when `features`)."""
    algo = cfg.algorithm
    return LossSpec(
        kind=algo.resolved_loss,
        beta=algo.beta,
        skew=algo.skew,
        temperature=algo.temperature,
        tail=algo.tail,
        is_clip=algo.is_clip,
        alpha=algo.alpha,
        feature_pairs=tuple(features),
        teacher_hidden_size=int(AutoConfig.from_pretrained(teacher).hidden_size) if features else 0,
        feature_kind=algo.feature_loss,
        feature_weight=algo.feature_weight,
        full_vocab=cfg.teacher.support == "full",
        distill_weight=algo.distill_weight,
        reward_weight=algo.reward_weight,
        position_weighting=algo.position_weighting,
        iw_opd_gamma=algo.iw_opd_gamma,
        iw_opd_epsilon=algo.iw_opd_epsilon,
    )
