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

from dataclasses import dataclass, replace
from typing import Any, Literal

from rayd.config import RunConfig

# server: teachers only (teacher.backend); learner: rollouts only, sampled inside the learner
# ranks (LearnerSpec.rollout), never an engine actor of its own
Backend = Literal["vllm", "hf", "server", "learner"]


@dataclass(frozen=True)
class ServerSpec:
    """A teacher served elsewhere (teacher.backend=server): where, and how hard to try."""

    urls: tuple[str, ...]  # base URLs of OpenAI-compatible `vllm serve` servers
    timeout_s: float  # deadline of one request
    retries: int  # retries of a request on a connection error, timeout or 5xx
    max_concurrency: int  # requests in flight at once per actor


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
        )
        return replace(spec, server=server)

    @property
    def devices(self) -> int:
        """Devices (GPUs, or CPU bundles) one engine spans."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def for_worker(self, i: int) -> EngineSpec:
        """Worker `i` of a pool: its own seed, so the workers draw apart."""
        return replace(self, seed=self.seed + i)
