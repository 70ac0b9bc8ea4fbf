"""Starting a run's actors from its checked inputs (`rayd.preflight.Preflight`), and exporting
the trained student from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rayd.cluster import WorkerPool, get
from rayd.config import RunConfig
from rayd.learner.group import LearnerGroup
from rayd.learner.lora import ADAPTER_DIR, save_adapter
from rayd.learner.spec import LearnerSpec
from rayd.preflight import Preflight
from rayd.rollout.group import start_rollout
from rayd.rollout.spec import EngineSpec
from rayd.teacher.group import LearnerTeacher, Teachers, start_teachers
from rayd.weight_sync import deserialize_state_dict, load_whole_state_dict


def start_workers(
    cfg: RunConfig, checked: Preflight
) -> tuple[WorkerPool, Teachers | LearnerTeacher | None, LearnerGroup]:
    """(rollout pool, teacher handle or None, learner group), each from its role's spec
    (`EngineSpec`, `LearnerSpec`) and waited for. The teacher is what `checked.teacher` says:
    a pool of actors per teacher; the learners, which hold the first teacher (a
    `LearnerTeacher` over them); or nothing (a stored signal, no teacher).
    rollout.backend=learner starts no rollout actor: the pool is the learner ranks, which
    sample with their own weights."""
    student, teachers = checked.student_path, checked.teacher_paths
    rollout: WorkerPool | None = None
    if cfg.rollout.backend != "learner":
        rollout = start_rollout(cfg.rollout, cfg.trainer, EngineSpec.rollout(cfg, student))
    group: Teachers | LearnerTeacher | None = None
    learners: LearnerGroup | None = None
    try:
        if checked.teacher == "actors":
            specs = [EngineSpec.teacher(cfg, path, i) for i, path in enumerate(teachers)]
            group = start_teachers(
                specs,
                cfg.models.teacher_list,
                cfg.teacher,
                cfg.trainer,
                vocab_size=len(checked.tokenizer),  # the shared tokenizer's: the tail estimate
            )
        first_teacher = teachers[0] if teachers else None
        learners = LearnerGroup(
            LearnerSpec.from_config(cfg, student, first_teacher, checked.features)
        )
        if checked.teacher == "learners":
            group = LearnerTeacher(learners)
        if rollout is None:  # rollout.backend=learner: the ranks sample
            rollout = learners.sampling_pool()
        # Engines load in parallel; wait for all of them here so start-up errors surface at once.
        rollout.call_all("ready")
        if group is not None:
            group.ready()
    except BaseException:
        # A failed start must not leave engines holding CPUs/GPUs (a restart would need them).
        if rollout is not None:
            rollout.shutdown()
        if group is not None:
            group.shutdown()
        if learners is not None:
            learners.shutdown()
        raise
    return rollout, group, learners


def export_student(learners: LearnerGroup, student_path: str, tokenizer: Any, out: Path) -> None:
    """The trained student as a Hugging Face checkpoint (weights gathered from the learners)."""
    blob = get(learners.publish_weights(), 600, "learners.publish_weights")
    config = AutoConfig.from_pretrained(student_path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    misfit = load_whole_state_dict(model, deserialize_state_dict(blob))
    if misfit:
        raise RuntimeError(f"exported weights do not fit the student: {misfit}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if learners.spec.lora is not None:
        # The merged weights above serve everything; the adapter is kept for those who
        # deploy adapters (vLLM LoRA serving, peft), `rayd export --adapter` copies it.
        adapters = deserialize_state_dict(learners.adapter_blob())
        save_adapter(out / ADAPTER_DIR, adapters, learners.spec.lora, student_path)
