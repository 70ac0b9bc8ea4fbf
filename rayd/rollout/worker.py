"""The rollout actor: a plain class, wrapped with `ray.remote` where it is spawned.

It owns one engine (vLLM or transformers; or, inside a learner rank, a transformers engine over
the rank's live weights), the tokenizer for decoding, and the version of the
weights it serves. Every `Sample` it returns carries that version, so the driver can check
staleness instead of trusting it. A Ray restart re-runs the constructor and the worker is back at
version 0 (the checkpoint it was built from): the driver re-syncs before using it again.

Inputs are checked here, before the engine sees them: over-long prompts have hung engines
(huggingface/trl#3433), and an out-of-vocabulary id is a bug upstream, not a sampling question.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from rayd.cluster import NeedsRestore
from rayd.device import detect, prepare_process
from rayd.rollout.engine import RolloutEngine
from rayd.rollout.spec import EngineSpec
from rayd.sampling import Sampling, prompt_seeds
from rayd.types import Sample

FAILED_LOAD = -1  # weight_version() after a failed load


class RolloutWorker:
    def __init__(self, spec: EngineSpec, engine: RolloutEngine | None = None) -> None:
        """`engine`: sample with this one, built by the process's owner (a learner rank
        sampling with its live weights: rollout.backend=learner), instead of the spec's."""
        if engine is None:
            prepare_process(detect(), spec.threads)
        self.spec = spec
        self.backend = spec.backend
        self.max_model_len = spec.max_model_len
        self.max_logprobs = spec.max_logprobs
        self.vocab_size = int(AutoConfig.from_pretrained(spec.model_path).vocab_size)
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        self.engine: RolloutEngine = engine if engine is not None else _make_engine(spec)
        self._version = 0
        self._weights_by: str | None = None  # how the last weights came: "blob" or "stream"

    def ready(self) -> bool:
        """Returns once the engine is built: lets the driver wait for start-up with a deadline."""
        return True

    def weight_version(self) -> int:
        """The version of the weights served; FAILED_LOAD (-1) after a failed load."""
        return self._version

    def generate(
        self,
        prompts: list[list[int]],
        prompt_indices: list[int],
        seeds: list[int] | None = None,
        *,
        sampling: Sampling,
        seed: int | None = None,
        expect_version: int | None = None,
    ) -> list[Sample]:
        """`sampling.n` samples per prompt, prompt-major (all samples of prompts[0] first).

        `sampling.return_topk=k`: each Sample also carries the ids of the sampling
        distribution's k most likely tokens at every completion position (`student_topk_ids`).

        `expect_version`: refuse (NeedsRestore) unless these weights are served, e.g. after Ray
        restarted this actor with the initial student and before the pool re-sent the weights.

        `seeds`: one per prompt, sliced by the pool with the prompts: the driver computes them
        over the whole batch with `prompt_seeds`, so copies of a prompt on two workers still
        draw apart. `seed` instead: this call's prompts get `prompt_seeds(seed, prompt_indices)`.
        Either way the workers of a pool, each handed a slice of one batch, draw independent
        samples, and a prompt draws the same ones whichever worker gets it.
        """
        if expect_version is not None and self._version != expect_version:
            raise NeedsRestore(
                f"serving weights version {self._version}, the caller expects {expect_version}"
            )
        if self._version == FAILED_LOAD:
            raise RuntimeError("the last weight load failed; load weights again before sampling")
        if len(prompts) != len(prompt_indices):
            raise ValueError(f"{len(prompts)} prompts but {len(prompt_indices)} prompt indices")
        if seeds is not None and seed is not None:
            raise ValueError("give per-prompt seeds or one seed, not both")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if seed is not None:
            seeds = prompt_seeds(seed, prompt_indices)
        return_topk, max_new_tokens = sampling.return_topk, sampling.max_new_tokens
        most = min(self.max_logprobs, self.vocab_size)
        if not 0 <= return_topk <= most:
            raise ValueError(
                f"return_topk={return_topk} outside 0..{most} (max_logprobs of this engine, "
                "capped by the vocabulary)"
            )
        limit = self.max_model_len - max_new_tokens
        for index, prompt in zip(prompt_indices, prompts, strict=True):
            self._check_ids(prompt, f"prompt {index}")
            if len(prompt) > limit:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens; with max_new_tokens="
                    f"{max_new_tokens} at most {limit} fit in max_model_len={self.max_model_len}"
                )
        per_prompt = self.engine.generate(prompts, sampling, seeds=seeds)
        samples = []
        for index, prompt, completions in zip(prompt_indices, prompts, per_prompt, strict=True):
            for c in completions:
                samples.append(
                    Sample(
                        prompt_ids=list(prompt),
                        completion_ids=c.token_ids,
                        logprobs=c.logprobs,
                        prompt_index=index,
                        finish_reason=c.finish_reason,
                        weight_version=self._version,
                        on_policy=True,
                        text=self.tokenizer.decode(c.token_ids, skip_special_tokens=True),
                        student_topk_ids=c.topk_ids,
                    )
                )
        return samples

    def load_weights(self, blob: bytes, version: int) -> int:
        """Serve the weights in `blob` (rayd.weight_sync format) from now on, as `version`."""
        start = time.perf_counter()
        try:
            self.engine.load_weights(blob)
        except Exception:
            # A load that failed half-way leaves a mix of old and new weights that no version
            # describes: refuse to sample until a load succeeds.
            self._version = FAILED_LOAD
            raise
        self._version = int(version)
        self._say_path("blob", len(blob), time.perf_counter() - start)
        return self._version

    def join_weight_stream(self, init: dict[str, Any]) -> None:
        self.engine.join_weight_stream(init)  # type: ignore[attr-defined]

    def receive_weights(self, update: dict[str, Any], version: int) -> list[dict[str, Any]]:
        """Serve the streamed weights (rayd.rollout.weight_stream) from now on, as `version`;
        the same rule as `load_weights` when it fails. Each engine rank's report."""
        try:
            reports = self.engine.receive_weights(update, version)  # type: ignore[attr-defined]
        except Exception:
            self._version = FAILED_LOAD
            raise
        self._version = int(version)
        seconds = max(float(r["seconds"]) for r in reports)
        self._say_path("stream", int(reports[0]["bytes"]), seconds)
        return reports

    def _say_path(self, method: str, nbytes: int, seconds: float) -> None:
        """One line in the engine's log when its weights start coming another way (the first
        sync, a fallback blob, a restart); every sync's figures are in the run's metrics."""
        if method != self._weights_by:
            self._weights_by = method
            print(
                f"rayd: rollout engine: weights version {self._version} by {method}, "
                f"{nbytes / 2**20:.1f} MiB in {seconds:.2f} s",
                file=sys.stderr,
                flush=True,
            )

    def leave_weight_stream(self) -> None:
        self.engine.leave_weight_stream()  # type: ignore[attr-defined]

    def weights_changed(self, version: int) -> None:
        """An injected engine's weights were changed in place by their owner (a learner's
        optimizer step): they are `version` now."""
        self._version = int(version)

    def logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Teacher-forced log-probs of each token after the first ([len - 1] each), temperature 1.

        The way to prove a weight sync: compare with the learner's model on the same tokens.
        """
        for i, seq in enumerate(sequences):
            self._check_ids(seq, f"sequence {i}")
            # vLLM scores a prompt by generating one token after it, which needs one more slot.
            if not 2 <= len(seq) <= self.max_model_len - 1:
                raise ValueError(
                    f"sequence {i} has {len(seq)} tokens; need 2..{self.max_model_len - 1}"
                )
        return self.engine.logprobs(sequences)

    def _check_ids(self, ids: list[int], what: str) -> None:
        if not ids:
            raise ValueError(f"{what} is empty")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"{what} has token ids outside [0, {self.vocab_size})")


def _make_engine(spec: EngineSpec) -> RolloutEngine:
    # Imported here: vLLM is heavy and only the vllm backend needs it.
    if spec.backend == "vllm":
        from rayd.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(spec)
    if spec.backend == "hf":
        from rayd.rollout.hf_engine import HFEngine

        return HFEngine(spec)
    raise ValueError(f"unknown rollout backend {spec.backend!r}; expected 'vllm' or 'hf'")
