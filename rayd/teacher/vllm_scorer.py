"""Teacher scoring with vLLM prompt log-probs.

Each pair is submitted as one token prompt (prompt + completion) with `max_tokens=1` and
`prompt_logprobs=top_k`. vLLM then returns, for every prompt position t >= 1, the log-probs of the
top-k tokens plus the actual token at t (k + 1 entries when the actual token is outside the top
k). Prompt positions are scored at temperature 1, whatever the engine's logprobs_mode (vLLM
documents raw and processed modes as identical for prompts). vLLM skips reading the prefix cache
for requests with prompt log-probs, so every position is computed, never served from cache.

Costs: the whole prompt is scored although only the completion is used (0.32's
`prompt_logprob_start` needs the V2 model runner), and the engine samples one throwaway token.
On CPU the transformers scorer was faster for a 135M teacher (SmolLM2-135M, 32 sequences of ~2000
tokens in all, top-8: 6.3 s against vLLM's 14.6 s): measure.
"""

from __future__ import annotations

from vllm import RequestOutput, SamplingParams
from vllm.inputs import TokensPrompt

from rayd.rollout.spec import EngineSpec
from rayd.rollout.vllm_engine import EXTENSION, build_llm, load_weights
from rayd.teacher.scorer import Pair, score_from_prompt_logprobs
from rayd.types import TeacherScore


class VLLMScorer:
    """`TeacherScorer` over a vLLM engine holding the teacher."""

    def __init__(self, spec: EngineSpec) -> None:
        self.max_top_k = spec.max_logprobs
        # max_logprobs caps prompt_logprobs as well; fixed at engine start. The extension lets
        # a teacher that follows the student (models.teacher: self) take new weights.
        self.llm = build_llm(spec, worker_extension_cls=EXTENSION)

    def load_weights(self, blob: bytes) -> None:
        load_weights(self.llm, blob)

    def score(self, pairs: list[Pair], top_k: int) -> list[TeacherScore]:
        if not 0 <= top_k <= self.max_top_k:
            raise ValueError(
                f"top_k={top_k} outside 0..{self.max_top_k} (max_top_k of this engine)"
            )
        # temperature=0: the throwaway sampled token costs no random draw.
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=top_k, detokenize=False
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p) + list(c)) for p, c in pairs],
            params,
            use_tqdm=False,
        )
        return [
            score_from_prompt_logprobs(i, prompt, completion, _rows(output), top_k, source="vLLM")
            for i, ((prompt, completion), output) in enumerate(zip(pairs, outputs, strict=True))
        ]


def _rows(output: RequestOutput) -> list[dict[int, float] | None] | None:
    """vLLM's prompt log-probs as {token id: log-prob} per prompt position (the form the served
    teacher's JSON also takes, so both go through one `score_from_prompt_logprobs`)."""
    rows = output.prompt_logprobs
    if rows is None:
        return None
    return [None if row is None else {t: lp.logprob for t, lp in row.items()} for row in rows]
