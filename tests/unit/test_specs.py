"""The role specs carry every setting of their config sections, and hold no defaults of their own:
config.py is the one place defaults live (a new learner or optimizer setting that the spec
missed fails here)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from rayd.config import LearnerConfig, OptimConfig, RunConfig
from rayd.learner.spec import LearnerSpec
from rayd.rollout.spec import EngineSpec

LEARNER = {
    "num_learners": 3,
    "zero_stage": 3,
    "micro_batch_size": 2,
    "grad_accum": 4,
    "cpus_per_learner": 0.25,
    "gpus_per_learner": 1.0,
    "threads": 2,
    "length_bucketing": False,
    "gradient_checkpointing": True,
    "offload_optimizer": True,
    "offload_params": True,
    "lora": {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": ["q_proj"]},
    "optim": {
        "lr": 2e-4,
        "weight_decay": 0.1,
        "betas": (0.8, 0.9),
        "eps": 1e-6,
        "grad_clip": 0.5,
        "warmup_steps": 3,
        "schedule": "linear",
    },
}


def config(**sections: dict) -> RunConfig:
    return RunConfig.model_validate(
        {
            "models": {
                "student": {"path": "/student", "dtype": "bfloat16"},
                "teacher": {"path": "/teacher", "dtype": "float16"},
            },
            "rollout": {"backend": "hf", "max_model_len": 96, "kv_cache_gib": 0.5, "threads": 3},
            "teacher": {"backend": "hf", "max_model_len": 80, "kv_cache_gib": 0.75, "top_k": 32},
            "learner": LEARNER,
            "trainer": {"max_steps": 50, "prompts_per_step": 24, "seed": 7, "call_timeout_s": 99},
            **sections,
        }
    )


@pytest.fixture
def cfg() -> RunConfig:
    return config()


def test_the_test_config_moves_every_learner_setting_off_its_default(cfg: RunConfig) -> None:
    """Otherwise a spec that restated a default could pass the test below by accident."""
    for section, model in ((cfg.learner, LearnerConfig), (cfg.learner.optim, OptimConfig)):
        for name, field in model.model_fields.items():
            if name != "optim":
                default = field.get_default(call_default_factory=True)
                assert getattr(section, name) != default, name


def test_learner_spec_carries_every_learner_and_optimizer_setting(cfg: RunConfig) -> None:
    spec = LearnerSpec.from_config(cfg, "/student-resolved")
    for name in LearnerConfig.model_fields:
        assert getattr(spec, name) == getattr(cfg.learner, name), name
    for name in OptimConfig.model_fields:
        assert getattr(spec.optim, name) == getattr(cfg.learner.optim, name), name
    assert spec.optim is not cfg.learner.optim  # a copy: the spec does not share the config's
    # ... and what the learners take from other sections.
    assert spec.model_path == "/student-resolved"
    assert (spec.total_steps, spec.seed, spec.call_timeout_s) == (50, 7, 99)
    assert spec.dtype == "bfloat16"
    assert spec.teacher_path is None and spec.ds_overrides is None  # teacher.support != full
    assert spec.loss.kind == cfg.algorithm.resolved_loss
    assert spec.rows_per_step == 24


def test_the_learner_holds_the_teacher_only_for_full_support() -> None:
    full = config(
        teacher={"backend": "hf", "support": "full"}, algorithm={"loss": "jsd", "skew": 0.3}
    )
    spec = LearnerSpec.from_config(full, "/s", "/t")
    assert (spec.loss.kind, spec.loss.skew) == ("jsd", 0.3)
    assert (spec.teacher_path, spec.teacher_dtype, spec.loss.full_vocab) == ("/t", "float16", True)


@pytest.mark.parametrize("spec_cls", [LearnerSpec, EngineSpec])
def test_specs_are_frozen_and_have_no_defaults(spec_cls: type) -> None:
    for field in dataclasses.fields(spec_cls):
        assert field.default is dataclasses.MISSING, field.name
        assert field.default_factory is dataclasses.MISSING, field.name
    assert spec_cls.__dataclass_params__.frozen


def test_engine_specs_take_their_sections(cfg: RunConfig) -> None:
    rollout = EngineSpec.rollout(cfg, "/s")
    teacher = EngineSpec.teacher(cfg, "/t")
    for spec, section in ((rollout, cfg.rollout), (teacher, cfg.teacher)):
        for name in ("backend", "max_model_len", "kv_cache_gib", "threads"):
            assert getattr(spec, name) == getattr(section, name), name
        assert spec.seed == 7
    assert (rollout.model_path, rollout.dtype, rollout.max_logprobs) == ("/s", "bfloat16", 20)
    assert (teacher.model_path, teacher.dtype, teacher.max_logprobs) == ("/t", "float16", 32)
    assert [rollout.for_worker(i).seed for i in range(3)] == [7, 8, 9]


def test_engine_specs_take_the_parallel_sizes() -> None:
    cfg = config(
        rollout={"backend": "vllm", "tensor_parallel_size": 2, "pipeline_parallel_size": 3},
        teacher={"backend": "vllm", "tensor_parallel_size": 4},
    )
    rollout, teacher = EngineSpec.rollout(cfg, "/s"), EngineSpec.teacher(cfg, "/t")
    assert (rollout.tensor_parallel_size, rollout.pipeline_parallel_size, rollout.devices) == (
        2,
        3,
        6,
    )
    assert (teacher.tensor_parallel_size, teacher.pipeline_parallel_size, teacher.devices) == (
        4,
        1,
        4,
    )


def test_specs_travel_to_actors(cfg: RunConfig) -> None:
    """Ray pickles a spec into every actor's constructor."""
    for spec in (LearnerSpec.from_config(cfg, "/s"), EngineSpec.rollout(cfg, "/s")):
        assert pickle.loads(pickle.dumps(spec)) == spec
