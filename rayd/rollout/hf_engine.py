"""Rollout backend: transformers `generate`. The debugging backend and the measured baseline.

It follows the vLLM backend's conventions so the two are interchangeable:
- log-probs of sampled tokens come from the processed scores (`output_scores=True`: after
  temperature, top-p and the min-new-tokens eos mask), i.e. the distribution sampled from;
  so do the top-k ids (`return_topk`), as vLLM's `logprobs=k` in processed mode;
- `min_new_tokens=1`; a completion ends at (and includes) the first eos;
- sampling knobs a checkpoint's generation_config.json may carry (top_k, repetition penalty) are
  pinned off, as vLLM ignores them when given explicit SamplingParams; transformers would
  otherwise even apply its global default top_k=50.
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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from rayd.device import detect, resolve_dtype
from rayd.rollout.engine import Completion
from rayd.rollout.spec import EngineSpec
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
        if not self.live:
            # Unseeded calls continue this stream, as vLLM's engine-level seed does.
            torch.manual_seed(spec.seed)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seeds: list[int] | None = None,
        return_topk: int = 0,
    ) -> list[list[Completion]]:
        with self._as_sampler():
            return self._generate(
                prompts, n, temperature, top_p, max_new_tokens, seeds, return_topk
            )

    @contextmanager
    def _as_sampler(self) -> Iterator[None]:
        """A live model's owner gets its module back in the mode it was in, and its RNG
        stream (dropout, a resumed run's restored state) unmoved."""
        if not self.live:
            yield
            return
        training = self.model.training
        self.model.eval()
        devices = [torch.cuda.current_device()] if self.device.is_gpu else []
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            self.model.train(training)

    def _generate(
        self,
        prompts: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seeds: list[int] | None,
        return_topk: int,
    ) -> list[list[Completion]]:
        if seeds:
            # One global stream per call, from the first prompt's seed (this process is a
            # dedicated actor, or `live` forks the stream); vLLM seeds every prompt, so the
            # two backends draw different samples from the same seeds.
            torch.manual_seed(seeds[0])
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p)
            if temperature > 0
            else dict(do_sample=False)
        )
        config = GenerationConfig(
            **sampling,
            top_k=0,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            num_return_sequences=n,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        # The scores are float32 once stacked (below), whatever the model's dtype.
        per_prompt = n * max_new_tokens * self.vocab_size * 4
        size = self.batch_size or max(MIN_BATCH, SCORES_BUDGET_BYTES // per_prompt)
        result: list[list[Completion]] = []
        for start in range(0, len(prompts), size):
            batch = prompts[start : start + size]
            result.extend(self._generate_batch(batch, n, config, return_topk))
        return result

    def _generate_batch(
        self, prompts: list[list[int]], n: int, config: GenerationConfig, return_topk: int
    ) -> list[list[Completion]]:
        device = self.device.torch_device()
        width = max(len(p) for p in prompts)
        # Left padding: every prompt ends at column `width`, where generation starts.
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
        )
        new_tokens = out.sequences[:, width:].cpu()  # [B * n, S], rows grouped by prompt
        scores = torch.stack(out.scores, dim=1).float().cpu()  # [B * n, S, V], processed
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
