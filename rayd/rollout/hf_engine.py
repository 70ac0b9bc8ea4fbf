"""Rollout backend: transformers models, sampled as `generate` samples. The debugging backend,
the measured baseline, and the sampler of rollout.backend=learner.

It follows the vLLM backend's conventions so the two are interchangeable:
- log-probs of sampled tokens come from the processed scores (after temperature, top-p and the
  min-new-tokens eos mask), i.e. the distribution sampled from; so do the top-k ids
  (`return_topk`), as vLLM's `logprobs=k` in processed mode;
- `min_new_tokens=1`; a completion ends at (and includes) the first eos;
- sampling knobs a checkpoint's generation_config.json may carry (top_k, repetition penalty) are
  not applied, as vLLM ignores them when given explicit SamplingParams.
The loop is `Sampler`: transformers' own sampling steps without `generate`'s per-token
machinery, drawing exactly what `generate` draws from the same seed.
Prompts are left-padded and sampled in micro-batches, because the processed scores of a batch
([batch * n, new tokens, vocab]) are held until generation ends: as many prompts as keep those
scores within SCORES_BUDGET_BYTES, and never fewer than MIN_BATCH. With a small vocabulary that
is the whole call: each micro-batch is a decoding loop of its own, and for a tiny model the loop's
per-token cost, not its width, sets the time (rayd bench, section overhead).

Given a `model`, it samples from a model another owner trains (rollout.backend=learner: a
learner rank's own module, `live`): no copy of the weights, no load_weights, and the owner's
train mode and RNG stream are left as they were.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from rayd.device import detect, resolve_dtype
from rayd.rollout.engine import Completion
from rayd.rollout.spec import EngineSpec
from rayd.sampling import Sampling
from rayd.weight_sync import deserialize_state_dict

SCORES_BUDGET_BYTES = 256 << 20
MIN_BATCH = 16


class HFEngine:
    """`RolloutEngine` over a transformers causal LM."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        batch_size: int | None = None,
        model: torch.nn.Module | None = None,
    ) -> None:
        """`model`: sample from this live model (a learner's own, maybe a peft wrapper) instead
        of loading spec.model_path."""
        self.device = detect()
        self.live = model is not None
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(
                str(spec.model_path), dtype=resolve_dtype(spec.dtype, self.device)
            )
            model.to(self.device.torch_device()).eval()
        self.model = model
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.model.config.eos_token_id
        if eos is None:
            raise ValueError(
                f"{spec.model_path} defines no eos_token_id: completions could never stop"
            )
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos)
        pad = self.model.config.pad_token_id
        self.pad_id: int = self.eos_ids[0] if pad is None else int(pad)
        self.batch_size = batch_size  # None: from SCORES_BUDGET_BYTES per call
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        # The engine's own random stream, never the process's: a live model's owner (its
        # dropout, a resumed run's restored state) draws from the global one. Unseeded calls
        # continue this stream, as vLLM's engine-level seed does.
        self.generator = torch.Generator(self.device.torch_device()).manual_seed(spec.seed)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, seeds: list[int] | None = None
    ) -> list[list[Completion]]:
        n, max_new_tokens, return_topk = sampling.n, sampling.max_new_tokens, sampling.return_topk
        temperature, top_p = sampling.temperature, sampling.top_p
        with self._as_sampler():
            if seeds:
                # One stream per call, from the first prompt's seed; vLLM seeds every prompt,
                # so the two backends draw different samples from the same seeds.
                self.generator.manual_seed(seeds[0])
            sampler = Sampler(
                self.eos_ids, self.pad_id, temperature, top_p, max_new_tokens, n, self.generator
            )
            # The scores are float32 once stacked (below), whatever the model's dtype.
            per_prompt = n * max_new_tokens * self.vocab_size * 4
            size = self.batch_size or max(MIN_BATCH, SCORES_BUDGET_BYTES // per_prompt)
            result: list[list[Completion]] = []
            for start in range(0, len(prompts), size):
                batch = prompts[start : start + size]
                result.extend(self._generate_batch(batch, n, sampler, return_topk))
            return result

    @contextmanager
    def _as_sampler(self) -> Iterator[None]:
        """A live model's owner gets its module back in the mode it was in."""
        if not self.live:
            yield
            return
        training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(training)

    def _generate_batch(
        self, prompts: list[list[int]], n: int, sampler: Sampler, return_topk: int
    ) -> list[list[Completion]]:
        device = self.device.torch_device()
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at column `width`, where generation starts.
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        new_tokens, scores = sampler.run(
            self.model, input_ids.to(device), attention_mask.to(device)
        )
        new_tokens = new_tokens.cpu()  # [B * n, S], rows grouped by prompt
        scores = scores.cpu()  # [B * n, S, V] float32, processed
        logprobs = scores.log_softmax(-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        topk = scores.topk(return_topk, dim=-1).indices if return_topk else None
        eos = torch.tensor(self.eos_ids)
        completions = []
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row]
            hits = torch.isin(ids, eos).nonzero()
            # After eos, generate pads the row; keep everything up to and including the eos.
            length = int(hits[0]) + 1 if len(hits) else ids.shape[0]
            completions.append(
                Completion(
                    ids[:length].tolist(),
                    logprobs[row, :length].tolist(),
                    "stop" if len(hits) else "length",
                    None if topk is None else topk[row, :length].clone(),
                )
            )
        return [completions[i * n : (i + 1) * n] for i in range(len(prompts))]

    def load_weights(self, blob: bytes) -> None:
        if self.live:
            raise RuntimeError("a live engine samples its owner's weights: nothing to load")
        state_dict = deserialize_state_dict(blob)
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        # serialize_state_dict drops tensors that alias another one (tied embeddings): those are
        # the only acceptable missing keys, and they were filled through their alias.
        loaded_ptrs = {t.data_ptr() for n, t in self.model.state_dict().items() if n in state_dict}
        current = self.model.state_dict()
        missing = [m for m in missing if current[m].data_ptr() not in loaded_ptrs]
        if missing or unexpected:
            raise RuntimeError(
                f"weight blob does not fit the model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )

    @torch.no_grad()
    def logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        device = self.device.torch_device()
        result = []
        with self._as_sampler():
            for seq in sequences:  # one at a time: exact, no padding; this is a checking tool
                ids = torch.tensor([seq], device=device)
                logp = self.model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                result.append(logp.gather(-1, ids[0, 1:, None]).squeeze(-1).cpu())
        return result


class Sampler:
    """transformers' sampling loop (`generate`'s `_sample`), without what rayd never asks of it.

    The same steps in the same order: a float32 copy of the last logits, the processors (eos
    masked before the first token, then temperature and top-p, transformers' own classes),
    softmax and one `torch.multinomial` over the whole batch per token (greedy: argmax),
    finished rows padded, a step per token until every row has its eos or max_new_tokens. So it
    draws exactly what `generate` draws from the same seed (a unit test holds them equal). What
    it leaves out is generate's per-token machinery, its config merging and checks, stopping
    criteria and input preparation: for a tiny model that is a quarter of the call (rayd bench,
    section overhead).
    """

    def __init__(
        self,
        eos_ids: list[int],
        pad_id: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        n: int,
        generator: torch.Generator | None = None,
    ) -> None:
        """`generator`: the random stream of the draws (None: the process's global one, as
        `generate` draws from)."""
        self.eos_ids, self.pad_id, self.n = eos_ids, pad_id, n
        self.generator = generator
        self.max_new_tokens = max_new_tokens
        self.do_sample = temperature > 0
        self.warpers: list[Any] = []
        if self.do_sample and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if self.do_sample and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    # Inference mode, not just no_grad: no version counters or autograd metadata on the
    # step's small tensors. The same numbers, and a tiny model decodes faster
    # (docs/experiments/performance.md). Its outputs are only read, never trained through.
    @torch.inference_mode()
    def run(
        self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new tokens [B * n, S], processed scores [B * n, S, V] float32) for left-padded
        prompts; rows grouped by prompt, each padded after its eos."""
        ids = input_ids.repeat_interleave(self.n, dim=0)
        mask = attention_mask.repeat_interleave(self.n, dim=0)
        eos = torch.tensor(self.eos_ids, device=ids.device)
        unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
        cache = DynamicCache(config=model.config)
        # Left padding: positions count the real tokens; a pad's own is never attended to.
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        step_ids = ids
        tokens: list[torch.Tensor] = []
        scores: list[torch.Tensor] = []
        for step in range(self.max_new_tokens):
            logits = (
                model(
                    input_ids=step_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    past_key_values=cache,
                    use_cache=True,
                )
                .logits[:, -1]
                .to(dtype=torch.float32, copy=True)
            )
            if step == 0:  # min_new_tokens=1: no empty completion
                logits[:, eos] = -math.inf
            for warp in self.warpers:
                logits = warp(ids, logits)
            if self.do_sample:
                probs = logits.softmax(dim=-1)
                picked = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
            else:
                picked = logits.argmax(dim=-1)
            picked = torch.where(unfinished, picked, self.pad_id)
            tokens.append(picked)
            scores.append(logits)
            unfinished &= ~torch.isin(picked, eos)
            if not unfinished.any():
                break
            step_ids = picked[:, None]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            positions = positions[:, -1:] + 1
        return torch.stack(tokens, dim=1), torch.stack(scores, dim=1)
