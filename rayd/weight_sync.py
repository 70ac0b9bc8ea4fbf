"""Moving student weights from the learners to the rollout engines.

Weights travel as one safetensors blob placed in the Ray object store by learner rank 0, so the
driver only ever holds a reference: the cost grows with model size, not with the number of
rollout engines times model size at the driver. Every blob carries a version; a rollout tags each
sample with the version that produced it.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def serialize_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    """Contiguous CPU copies, minus tensors that alias another one (tied embeddings)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        ptr = tensor.data_ptr()
        if ptr in seen:  # safetensors refuses shared storage; the receiver re-ties on load
            continue
        seen.add(ptr)
        out[name] = tensor.detach().to("cpu").contiguous()
    return st_save(out)


def deserialize_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    return st_load(blob)


def load_whole_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor]
) -> str | None:
    """Load a full state dict into a model of the same architecture; returns what did not fit
    (None when all did). A tied LM head may be absent: serialize_state_dict drops it, and it
    follows the embedding, re-tied here."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = sorted(set(missing) - ({"lm_head.weight"} if tied else set()))
    if tied:
        model.tie_weights()
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {sorted(unexpected)[:3]}"
    return None
