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

import math

import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from rayd.rollout.spec import EngineSpec
from rayd.rollout.vllm_engine import build_llm
from rayd.teacher.scorer import Pair, TeacherSignalError
from rayd.types import TeacherScore


class VLLMScorer:
    """`TeacherScorer` over a vLLM engine holding the teacher."""

    def __init__(self, spec: EngineSpec) -> None:
        self.max_top_k = spec.max_logprobs
        # max_logprobs caps prompt_logprobs as well; fixed at engine start.
        self.llm = build_llm(spec)

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
            _to_score(i, prompt, completion, output.prompt_logprobs, top_k)
            for i, ((prompt, completion), output) in enumerate(zip(pairs, outputs, strict=True))
        ]


def _to_score(
    index: int, prompt: list[int], completion: list[int], rows: list | None, top_k: int
) -> TeacherScore:
    t, p = len(completion), len(prompt)
    token_lp = torch.empty(t, dtype=torch.float32)
    topk_ids = torch.empty((t, top_k), dtype=torch.long)
    topk_lp = torch.empty((t, top_k), dtype=torch.float32)
    missing = []
    for j, token in enumerate(completion):
        row = rows[p + j] if rows is not None and p + j < len(rows) else None
        if row is None or token not in row:
            missing.append(j)
            continue
        token_lp[j] = row[token].logprob
        # The actual token is an extra entry only when it is not among the top k.
        entries = [
            (tok, lp.logprob) for tok, lp in row.items() if not (tok == token and len(row) > top_k)
        ]
        entries.sort(key=lambda e: -e[1])
        if len(entries) != top_k or not all(math.isfinite(lp) for _, lp in entries):
            missing.append(j)
            continue
        for col, (tok, lp) in enumerate(entries):
            topk_ids[j, col] = tok
            topk_lp[j, col] = lp
    if missing:
        raise TeacherSignalError(
            f"vLLM returned no usable log-probs for {len(missing)}/{t} completion positions of "
            f"pair {index} (first missing position {missing[0]})"
        )
    return TeacherScore(token_logprobs=token_lp, topk_ids=topk_ids, topk_logprobs=topk_lp)
