"""Teacher scoring with one transformers forward pass per micro-batch: exact, and the only
backend that can return full logits or score caller-chosen token ids.

Sequences (prompt + completion) are right-padded: with a causal mask, padding after a sequence
cannot change any position of it. Completion token j of a pair with a p-token prompt is predicted
by the logits at column p - 1 + j. All log-probs are log_softmax of float32 logits at
temperature 1, the same distribution vLLM's prompt log-probs report.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import AutoModelForCausalLM

from rayd.device import detect, resolve_dtype
from rayd.rollout.spec import EngineSpec
from rayd.teacher.scorer import Pair
from rayd.types import TeacherScore
from rayd.weight_sync import deserialize_state_dict, load_whole_state_dict


class HFScorer:
    """`TeacherScorer` over a transformers causal LM."""

    def __init__(self, spec: EngineSpec, *, batch_size: int = 8) -> None:
        self.device = detect()
        self.model = AutoModelForCausalLM.from_pretrained(
            str(spec.model_path), dtype=resolve_dtype(spec.dtype, self.device)
        )
        self.model.to(self.device.torch_device()).eval()
        pad = self.model.config.pad_token_id
        self.pad_id = 0 if pad is None else int(pad)  # masked out: any valid id will do
        # Logits of a micro-batch are [batch, length, vocab]: bounded by this, not by the request.
        self.batch_size = batch_size

    def load_weights(self, blob: bytes) -> None:
        """New weights for a teacher that follows the student (models.teacher: self)."""
        misfit = load_whole_state_dict(self.model, deserialize_state_dict(blob))
        if misfit:
            raise RuntimeError(f"weight blob does not fit the teacher: {misfit}")

    def score(
        self,
        pairs: list[Pair],
        top_k: int,
        return_logits: bool = False,
        hidden_layers: list[int] | None = None,
    ) -> list[TeacherScore]:
        """Per pair: token log-probs, top-k, optionally full logits and the hidden states of
        `hidden_layers` (indices into transformers' hidden_states: 0 = embeddings)."""
        scores = []
        outputs = self._completion_outputs(pairs, hidden_layers)
        for (logits, hidden), (_, completion) in zip(outputs, pairs, strict=True):
            logp = logits.log_softmax(-1)
            targets = torch.tensor(completion, dtype=torch.long)
            top = logp.topk(top_k, dim=-1)  # sorted descending
            scores.append(
                TeacherScore(
                    token_logprobs=logp.gather(-1, targets[:, None]).squeeze(-1),
                    topk_ids=top.indices,
                    topk_logprobs=top.values,
                    logits=logits if return_logits else None,
                    hidden=hidden,
                )
            )
        return scores

    def score_ids(
        self, pairs: list[Pair], ids_per_position: list[torch.Tensor], add_top_k: int = 0
    ) -> list[TeacherScore]:
        """The teacher's exact log-probs at caller-chosen ids: ids_per_position[i] is [T_i, m].

        Student-top-k distillation: the ids are the student's top-k, so a top-k divergence is
        taken over the student's support. `add_top_k`: also the teacher's own add_top_k most
        likely tokens *among the other ids* (the union support, m + add_top_k distinct ids
        that contain both top-k lists). The support is sorted by the teacher's log-prob,
        descending, as `score`'s top-k is; token_logprobs as in `score`. One forward pass.
        """
        if len(ids_per_position) != len(pairs):
            raise ValueError(f"{len(ids_per_position)} id tensors for {len(pairs)} pairs")
        scores = []
        logits_only = (logits for logits, _ in self._completion_outputs(pairs))
        for i, (logits, ids, (_, completion)) in enumerate(
            zip(logits_only, ids_per_position, pairs, strict=True)
        ):
            if ids.ndim != 2 or ids.shape[0] != logits.shape[0]:
                raise ValueError(
                    f"pair {i}: ids of shape {tuple(ids.shape)} for {logits.shape[0]} tokens"
                )
            logp = logits.log_softmax(-1)
            ids = ids.long()
            if add_top_k:
                others = logp.scatter(-1, ids, float("-inf"))
                ids = torch.cat([ids, others.topk(add_top_k, dim=-1).indices], dim=-1)
            support = logp.gather(-1, ids).sort(dim=-1, descending=True)
            targets = torch.tensor(completion, dtype=torch.long)
            scores.append(
                TeacherScore(
                    token_logprobs=logp.gather(-1, targets[:, None]).squeeze(-1),
                    topk_ids=ids.gather(-1, support.indices),
                    topk_logprobs=support.values,
                )
            )
        return scores

    @torch.no_grad()
    def _completion_outputs(
        self, pairs: list[Pair], hidden_layers: list[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per pair, float32 CPU logits [T, V] predicting each completion token, and (when
        asked) the hidden states [T, n, D] of those positions at the n `hidden_layers`."""
        device = self.device.torch_device()
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            width = max(len(p) + len(c) for p, c in chunk)
            input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (prompt, completion) in enumerate(chunk):
                seq = list(prompt) + list(completion)
                input_ids[row, : len(seq)] = torch.tensor(seq)
                attention_mask[row, : len(seq)] = 1
            out = self.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                output_hidden_states=bool(hidden_layers),
            )
            hidden = (
                torch.stack([out.hidden_states[i] for i in hidden_layers], dim=2)
                if hidden_layers
                else None
            )
            for row, (prompt, completion) in enumerate(chunk):
                cols = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
                yield (
                    out.logits[row, cols].float().cpu(),
                    None if hidden is None else hidden[row, cols].float().cpu(),
                )
