"""The teacher actor: a plain class, wrapped with `ray.remote` where it is spawned.

It owns one scorer (vLLM prompt log-probs, a transformers forward pass, or prompt log-probs asked
of a teacher served elsewhere by `vllm serve`: backend=server), checks the pairs before
the engine sees them (lengths, vocabulary: an id outside the teacher's vocabulary means the
tokenizers differ, which token-level distillation must refuse), and checks every score before it
leaves (`scorer.check_scores`): a failed score is an error, never a zero signal.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig

from rayd.device import detect, prepare_process
from rayd.rollout.spec import EngineSpec
from rayd.teacher.scorer import Pair, check_scores
from rayd.types import TeacherScore

if TYPE_CHECKING:  # the backends import vLLM / transformers models: only when chosen
    from rayd.teacher.hf_scorer import HFScorer
    from rayd.teacher.server_scorer import ServerScorer
    from rayd.teacher.vllm_scorer import VLLMScorer


class TeacherWorker:
    def __init__(self, spec: EngineSpec) -> None:
        prepare_process(detect(), spec.threads)
        self.spec = spec
        self.backend = spec.backend
        self.max_model_len = spec.max_model_len
        self.vocab_size = int(AutoConfig.from_pretrained(spec.model_path).vocab_size)
        self.version = 0  # of the weights scored with (load_weights)
        if spec.backend == "vllm":
            from rayd.teacher.vllm_scorer import VLLMScorer

            self.scorer: VLLMScorer | HFScorer | ServerScorer = VLLMScorer(spec)
        elif spec.backend == "hf":
            from rayd.teacher.hf_scorer import HFScorer

            self.scorer = HFScorer(spec)
        elif spec.backend == "server":
            # The teacher runs elsewhere (`vllm serve`); this actor only sends requests, so it
            # needs no device and little CPU. model_path is the local copy of the teacher's
            # tokenizer and config: the vocabulary check above reads it.
            from rayd.teacher.server_scorer import ServerScorer

            self.scorer = ServerScorer(spec)
        else:
            raise ValueError(
                f"unknown teacher backend {spec.backend!r}; expected 'vllm', 'hf' or 'server'"
            )

    def ready(self) -> bool:
        """Returns once the scorer is built: lets the driver wait for start-up with a deadline."""
        return True

    def load_weights(self, blob: bytes, version: int) -> int:
        """Score with the weights in `blob` (rayd.weight_sync format) from now on: a teacher
        that follows the student (models.teacher: self, weights live or ema). Returns
        `version`, the learners' version of those weights."""
        if self.backend == "server":
            raise ValueError("a served teacher's weights are its server's: nothing to load")
        self.scorer.load_weights(blob)  # type: ignore[union-attr]
        self.version = int(version)
        return self.version

    def server_retries(self) -> int:
        """backend=server: how many requests this actor retried so far (0 for the others)."""
        return int(getattr(self.scorer, "retries", 0))

    def score(
        self,
        pairs: list[Pair],
        top_k: int,
        return_logits: bool = False,
        hidden_layers: list[int] | None = None,
    ) -> list[TeacherScore]:
        """Per pair, the teacher's signal on the completion tokens (see rayd.types.TeacherScore);
        full logits and hidden states (feature_kd) only from the 'hf' backend."""
        self._check_pairs(pairs)
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if return_logits or hidden_layers:
            if self.backend != "hf":
                raise ValueError("full teacher logits and hidden states need the 'hf' backend")
            scores = self.scorer.score(  # type: ignore[call-arg]
                pairs, top_k, return_logits=return_logits, hidden_layers=hidden_layers
            )
        else:
            scores = self.scorer.score(pairs, top_k)
        check_scores(pairs, scores, top_k)
        return scores

    def score_ids(
        self, pairs: list[Pair], ids_per_position: list[torch.Tensor], add_top_k: int = 0
    ) -> list[TeacherScore]:
        """The teacher's signal over a caller-chosen support (hf backend only): its log-probs at
        ids_per_position[i] ([T_i, m], e.g. the student's top-k), plus its own top add_top_k
        among the other ids (the union support). See HFScorer.score_ids."""
        if self.backend != "hf":
            raise ValueError(
                "scoring chosen token ids needs the 'hf' teacher backend (vLLM's prompt "
                "log-probs cover only its own top-k and the actual token)"
            )
        self._check_pairs(pairs)
        if add_top_k < 0:
            raise ValueError(f"add_top_k must be >= 0, got {add_top_k}")
        widths = {int(ids.shape[-1]) for ids in ids_per_position}
        if len(widths) > 1:
            raise ValueError(f"chosen ids of several widths {sorted(widths)}: one width per call")
        for i, ids in enumerate(ids_per_position):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise ValueError(f"ids for pair {i} fall outside the teacher vocabulary")
        scorer: HFScorer = self.scorer  # type: ignore[assignment]
        scores = scorer.score_ids(pairs, ids_per_position, add_top_k)
        width = widths.pop() + add_top_k if widths else add_top_k
        check_scores(pairs, scores, width)
        return scores

    def _check_pairs(self, pairs: list[Pair]) -> None:
        for i, (prompt, completion) in enumerate(pairs):
            if not prompt:
                raise ValueError(f"pair {i} has an empty prompt: its first token has no context")
            seq = list(prompt) + list(completion)
            if min(seq) < 0 or max(seq) >= self.vocab_size:
                raise ValueError(
                    f"pair {i} has token ids outside the teacher vocabulary "
                    f"[0, {self.vocab_size}): do student and teacher share a tokenizer?"
                )
            # vLLM scores a prompt by generating one token after it, which needs one more slot.
            if len(seq) > self.max_model_len - 1:
                raise ValueError(
                    f"pair {i} has {len(seq)} tokens; at most {self.max_model_len - 1} fit in "
                    f"max_model_len={self.max_model_len}"
                )
