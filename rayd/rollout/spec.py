"""What one engine actor is built from: a frozen `EngineSpec`, for rollout and teacher alike.

Rollout (`RolloutWorker`) and teacher (`TeacherWorker`) actors hold the same kind of engine
(vLLM, or transformers as `backend=hf`) with the same settings, so one spec serves both; the
teacher's vLLM engine is even built by the same `vllm_engine.build_llm`. The worker hands the
spec whole to its engine. Nothing here has a default: `EngineSpec.rollout` / `EngineSpec.teacher`
set every field from the run config, so rayd/config.py is the one place defaults live.

How many actors a pool has, their Ray resources and deadlines are the pool's business
(`rayd.rollout.group`, `rayd.teacher.group`), read from the same config sections.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from rayd.config import ConfigError, RunConfig, TeacherConfig

# server: teachers only (teacher.backend); learner: rollouts only, sampled inside the learner
# ranks (LearnerSpec.rollout), never an engine actor of its own
Backend = Literal["vllm", "hf", "server", "learner"]


@dataclass(frozen=True)
class ServerSpec:
    """A teacher served elsewhere (teacher.backend=server): where, how hard to try, and what its
    answers must be. The fields after max_concurrency have defaults (a spec built by hand, in a
    test); `EngineSpec.teacher` sets every one from the config."""

    urls: tuple[str, ...]  # base URLs of OpenAI-compatible `vllm serve` servers
    timeout_s: float  # deadline of one whole request: connect, send and the full answer
    retries: int  # retries of a request on a connection error, timeout or 5xx
    max_concurrency: int  # requests in flight at once per actor
    max_response_bytes: int = 64 << 20  # the largest answer body accepted
    served_model: str | None = None  # the name /v1/models must list (teacher.served_model)
    # The Bearer token (read from teacher.api_key_env on the driver): never in a repr, a line
    # or a file. It travels to the teacher actors inside this spec (Ray's object store).
    api_key: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None  # PEM CAs for https:// (None: the system's)
    # Token ids an answer may hold are in [0, vocab_size); None: the teacher's config.json
    # (model_path) is read, as the teacher actor's own vocabulary check does.
    vocab_size: int | None = None


def read_api_key(env_name: str | None) -> str | None:
    """The value of the environment variable `env_name` (teacher.api_key_env), or None when no
    variable is named; a missing or empty one is one ConfigError line (naming the variable,
    never a value)."""
    if env_name is None:
        return None
    value = os.environ.get(env_name, "").strip()
    if not value:
        raise ConfigError(
            f"config error: teacher.api_key_env: the environment variable {env_name} is not set "
            "(or empty) on the driver; export it with the teacher servers' API key"
        )
    return value


def response_limit_bytes(teacher: TeacherConfig) -> int:
    """teacher.max_response_mb in bytes; by default 1 MiB plus 256 bytes for each of the
    (top_k + 1) entries of the max_model_len positions a /v1/completions answer may list (an
    entry of vLLM's is about 60 bytes: id, log-prob, rank and decoded token)."""
    if teacher.max_response_mb is not None:
        return int(teacher.max_response_mb * (1 << 20))
    return (1 << 20) + 256 * (teacher.top_k + 1) * teacher.max_model_len


@dataclass(frozen=True)
class EngineSpec:
    model_path: str  # a resolved local checkpoint folder
    backend: Backend
    dtype: str  # "auto", "float32", "bfloat16", "float16"
    max_model_len: int  # prompt + completion tokens the engine accepts
    kv_cache_gib: float  # vLLM's KV-cache budget
    threads: int  # torch/OpenMP threads of the actor's process
    seed: int  # the engine's seed (a rollout pool gives worker i seed + i)
    # The widest top-k the engine returns per token (vLLM's max_logprobs, fixed at start):
    # the student's top-k ids of a rollout, the teacher's top-k log-probs of a score.
    max_logprobs: int
    # vLLM's tensor / pipeline parallel sizes: the engine spans their product of devices
    # (the pool gives it a placement group with one bundle per device).
    tensor_parallel_size: int
    pipeline_parallel_size: int
    # backend=server only (None otherwise): the servers the teacher actor sends requests to.
    server: ServerSpec | None

    @classmethod
    def from_section(
        cls, path: str, section: Any, *, dtype: str, seed: int, max_logprobs: int
    ) -> EngineSpec:
        """From a config section with the engine fields (`rollout:`, `teacher:`, `rayd
        generate`'s `engines:`): backend, max_model_len, kv_cache_gib, threads and the
        parallel sizes."""
        return cls(
            model_path=path,
            backend=section.backend,
            dtype=dtype,
            max_model_len=section.max_model_len,
            kv_cache_gib=section.kv_cache_gib,
            threads=section.threads,
            seed=seed,
            max_logprobs=max_logprobs,
            tensor_parallel_size=section.tensor_parallel_size,
            pipeline_parallel_size=section.pipeline_parallel_size,
            server=None,
        )

    @classmethod
    def rollout(cls, cfg: RunConfig, student: str) -> EngineSpec:
        """The student's rollout engine (worker 0's seed; see `for_worker`)."""
        return cls.from_section(
            student,
            cfg.rollout,
            dtype=cfg.models.student.dtype,
            seed=cfg.trainer.seed,
            max_logprobs=max(20, cfg.student_topk),
        )

    @classmethod
    def teacher(cls, cfg: RunConfig, teacher: str, index: int = 0) -> EngineSpec:
        """Teacher `index` of models.teacher(s), at the resolved path `teacher`. It only scores
        (nothing is sampled), so its seed changes no score."""
        t = cfg.teacher
        spec = cls.from_section(
            teacher,
            t,
            dtype=cfg.models.teacher_list[index].dtype,
            seed=cfg.trainer.seed,
            max_logprobs=max(20, t.top_k),
        )
        if t.backend != "server":
            return spec
        server = ServerSpec(
            urls=tuple(u.rstrip("/") for u in t.urls or ()),
            timeout_s=t.request_timeout_s,
            retries=t.request_retries,
            max_concurrency=t.max_concurrency,
            max_response_bytes=response_limit_bytes(t),
            served_model=t.served_model,
            api_key=read_api_key(t.api_key_env),
            ca_bundle=t.ca_bundle,
        )
        return replace(spec, server=server)

    @property
    def devices(self) -> int:
        """Devices (GPUs, or CPU bundles) one engine spans."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def for_worker(self, i: int) -> EngineSpec:
        """Worker `i` of a pool: its own seed, so the workers draw apart."""
        return replace(self, seed=self.seed + i)
