"""Teacher signal size and fidelity: sparse top-k log-probs (what rayd sends) vs the full
vocabulary.

Size: a `TeacherScore` per completion, as the teacher actors return it (token log-probs float32
[T], top-k ids int64 [T, k], top-k log-probs float32 [T, k]), serialised with `ray.cloudpickle`
(protocol 5, the pickler Ray uses for Python objects; Ray adds only a small fixed header), divided
by T. The full-vocabulary alternative is a float32 [T, V] tensor serialised the same way. The
tiny model's vocabulary is measured; SmolLM2's (49152) and Qwen's (151936) are computed from the
payload sizes, where the pickling overhead is negligible.

Fidelity: one batch of the tiny student's own samples, scored in-process by the tiny teacher
(full logits). The learners' top-k losses (`batch_loss` over the teacher's top-k bins with the
tail bin) are compared with their exact full-vocabulary forms (teacher.support=full) on the
same batch, per k.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rayd.types import TeacherScore

KS = (1, 8, 32, 64)
DEFAULT_K = 8  # teacher.top_k's default
COMPUTED_VOCABS = {"smollm2_49152": 49152, "qwen_151936": 151936}


def _pickled_bytes(obj: Any) -> int:
    import ray.cloudpickle

    return len(ray.cloudpickle.dumps(obj, protocol=5))


def topk_score(length: int, k: int, vocab: int, gen: torch.Generator) -> TeacherScore:
    logprobs = torch.randn((length, vocab), generator=gen).log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    return TeacherScore(logprobs[:, 0].contiguous(), top.indices, top.values)


def size_figures(vocab: int, length: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    by_k = {
        str(k): round(_pickled_bytes(topk_score(length, k, vocab, gen)) / length, 1)
        for k in KS
        if k <= vocab
    }
    full = torch.randn((length, vocab), generator=gen)
    full_per_token = round(_pickled_bytes(full) / length, 1)
    out: dict[str, Any] = {
        "full_over_topk_bytes": full_per_token / by_k[str(DEFAULT_K)],
        "topk_bytes_per_token": by_k[str(DEFAULT_K)],
        "full_bytes_per_token": full_per_token,
        "topk_bytes_per_token_by_k": by_k,
        "vocab_size": vocab,
        "completion_tokens": length,
        "k": DEFAULT_K,
    }
    for name, size in COMPUTED_VOCABS.items():
        topk = 4 + DEFAULT_K * (8 + 4)  # token log-prob + k int64 ids + k float32 log-probs
        out[f"computed_{name}"] = {
            "full_over_topk_bytes": 4 * size / topk,
            "topk_bytes_per_token": topk,
            "full_bytes_per_token": 4 * size,
        }
    return out


@torch.no_grad()
def _student_batch(
    student: Any, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student's own samples (temperature 1), left-padded prompts: (input_ids [B, L],
    attention_mask [B, L], loss_mask [B, L-1])."""
    from rayd.commands.bench import sample_completions

    out, attn = sample_completions(
        student,
        prompts,
        pad_id=pad_id,
        eos=eos_id,
        max_new_tokens=max_new_tokens,
        seed=0,
        min_new_tokens=1,
    )
    width = attn.shape[1]
    new = out[:, width:]
    # A completion ends at (and includes) its first eos; generate pads after it.
    is_eos = (new == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    completion_mask = ~after_eos
    full_attn = torch.cat([attn, completion_mask.long()], dim=1)
    loss_mask = torch.zeros((len(prompts), out.shape[1] - 1), dtype=torch.bool)
    loss_mask[:, width - 1 :] = completion_mask
    return out, full_attn, loss_mask & full_attn[:, 1:].bool()


def loss_figures(quick: bool) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayd.losses import LossSpec, batch_loss
    from rayd.tasks import make_task
    from rayd.types import TrainBatch
    from rayd.zoo import resolve_model_path

    student_path = resolve_model_path("tiny:test-student")
    teacher_path = resolve_model_path("tiny:test-teacher")
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    rows = 8 if quick else 32
    examples = make_task("addition", digits=2, seed=0).examples("eval", rows)
    prompts = [tokenizer(e.prompt, add_special_tokens=False).input_ids for e in examples]
    input_ids, attn, mask = _student_batch(
        student, prompts, 24 if quick else 48, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    with torch.no_grad():
        s_logits = student(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
        t_logits = teacher(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
    tokens = int(mask.sum())
    t_logprobs = t_logits.log_softmax(-1)

    def training_loss(kind: str, full: bool, k: int = 1) -> float:
        """The learners' token-mean loss `kind` on this batch: over the whole vocabulary
        (teacher.support=full) or over the teacher's top-k bins with the tail."""
        top = t_logprobs.topk(k, dim=-1)
        batch = TrainBatch(
            input_ids,
            attn,
            mask,
            torch.zeros(mask.shape),
            torch.zeros(mask.shape),
            top.indices,
            top.values,
        )
        spec = LossSpec(kind, full_vocab=full)  # type: ignore[arg-type]
        loss, _ = batch_loss(s_logits, batch, spec, teacher_logits=t_logits if full else None)
        return float(loss.sum() / tokens)

    out: dict[str, Any] = {}
    for kind in ("reverse_kl", "forward_kl"):
        full = training_loss(kind, full=True)
        per_k: dict[str, Any] = {}
        for k in KS:
            if k > t_logits.shape[-1]:
                continue
            sparse = training_loss(kind, full=False, k=k)
            per_k[f"k{k}"] = {
                "topk_loss": sparse,
                "abs_diff": abs(sparse - full),
                "rel_diff": abs(sparse - full) / max(abs(full), 1e-12),
            }
        out[kind] = {"full_vocab_loss": full, **per_k}
    out["batch"] = {
        "rows": rows,
        "completion_tokens": tokens,
        "vocab_size": int(t_logits.shape[-1]),
        "student": "tiny:test-student",
        "teacher": "tiny:test-teacher",
    }
    return out


def run(quick: bool, workdir: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    from rayd.zoo import resolve_model_path

    vocab = int(AutoConfig.from_pretrained(resolve_model_path("tiny:test-student")).vocab_size)
    sizes = size_figures(vocab, length=64)
    result: dict[str, Any] = {
        "topk_bytes_per_token": sizes.pop("topk_bytes_per_token"),
        "full_bytes_per_token": sizes.pop("full_bytes_per_token"),
        **sizes,
        "loss": loss_figures(quick),
        "notes": [
            "bytes: a TeacherScore (float32 token log-probs, int64 top-k ids, float32 top-k "
            "log-probs) of a 64-token completion serialised with ray.cloudpickle protocol 5, per "
            "token; full = a float32 [T, V] tensor the same way; computed_* from payload sizes",
            "loss: mean per-token divergence over the tiny student's own samples; top-k with the "
            "tail bin (rayd/losses.py) vs the exact full-vocabulary divergence",
        ],
    }
    return result
