"""LoRA students: the adapters' state dicts, and the merged weights everything else reads.

A LoRA student is a peft `PeftModel` around the Hugging Face model. Its state dict names every
tensor under `base_model.model.`, the wrapped linear layers' frozen weights under `.base_layer.`,
and the adapters as `<layer>.lora_A.<adapter>.weight` [r, in] and `<layer>.lora_B.<adapter>.weight`
[out, r]. The rollout engines, the final student/ and `rayd export` want the plain model: the
same keys as the base checkpoint, each adapted weight merged, W + (alpha / r) * B @ A.

These are pure functions of state dicts (no peft, no DeepSpeed), so the learner's published
weights and an export from a ZeRO checkpoint merge the same way. Only plain LoRA on linear
layers: no DoRA, no rsLoRA scaling, no Conv1D (fan_in_fan_out) layers; `lora_model` asks peft for
nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rayd.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's name for the one adapter rayd trains
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's from_pretrained reads
ADAPTER_DIR = "adapter"  # a LoRA run's student/adapter/: the adapter beside the merged weights


def lora_model(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """`model` with LoRA adapters on `lora.target_modules`; only the adapters require grad."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora))


def peft_config(lora: LoraConfig, base_model: str | None = None) -> Any:
    """peft's LoraConfig for `lora` (saved as adapter_config.json beside an adapter)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model,
    )


def merged_state(state: dict[str, Tensor], lora: LoraConfig) -> dict[str, Tensor]:
    """The plain model's state dict from a LoRA student's: base keys, adapters merged in."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        out[_base_key(key)] = tensor
    suffix_a = f".lora_A.{ADAPTER}.weight"
    for key, a in state.items():
        if not key.endswith(suffix_a):
            continue
        layer = key[: -len(suffix_a)]
        b = state[f"{layer}.lora_B.{ADAPTER}.weight"]
        target = _base_key(f"{layer}.base_layer.weight")
        out[target] = merge_one(out[target], a, b, lora)
    return out


def merge_plan(keys: list[str]) -> list[tuple[str, list[str]]]:
    """`merged_state`'s output, one entry at a time, without the tensors: (plain name, the
    LoRA state keys it is made of), in state-dict order. A merged weight is made of its base
    weight and the layer's A and B (`merge_one`); every other entry of one key, as it is."""
    present = set(keys)
    suffix = ".base_layer.weight"
    plan = []
    for key in keys:
        if ".lora_" in key:
            continue
        layer = key[: -len(suffix)] if key.endswith(suffix) else None
        a = f"{layer}.lora_A.{ADAPTER}.weight"
        if layer is not None and a in present:
            plan.append((_base_key(key), [key, a, f"{layer}.lora_B.{ADAPTER}.weight"]))
        else:
            plan.append((_base_key(key), [key]))
    return plan


def merge_one(weight: Tensor, a: Tensor, b: Tensor, lora: LoraConfig) -> Tensor:
    """One merged weight, as `merged_state` makes it."""
    delta = (b.float() @ a.float()) * (lora.alpha / lora.r)
    return (weight.float() + delta).to(weight.dtype)


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapters alone, keyed as peft's `save_pretrained` writes them (no adapter name)."""
    return {
        key.replace(f".{ADAPTER}.", "."): tensor for key, tensor in state.items() if ".lora_" in key
    }


def _base_key(key: str) -> str:
    key = key.removeprefix(PEFT_PREFIX)
    return key.replace(".base_layer.", ".")


def save_adapter(
    folder: Path, adapters: dict[str, Tensor], lora: LoraConfig, base_model: str
) -> None:
    """A peft adapter folder (`PeftModel.from_pretrained(base, folder)` loads it)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapters.items()}, str(folder / ADAPTER_WEIGHTS))
    peft_config(lora, base_model=base_model).save_pretrained(str(folder))
