"""`rayd bench`'s memory section: its peak measure sees what a step allocates, and a variant
runs in a process of its own with the lever in force (no timing is asserted)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig

from rayd.commands.bench import memory
from rayd.models import build_tiny_llama


def test_the_peak_starts_again_at_the_memory_in_use() -> None:
    before = memory.reset_peak()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert memory.peak_mib() - before >= 60
    del block
    again = memory.reset_peak()
    assert memory.peak_mib() - again < 60  # the old peak is gone


def test_a_lora_variant_trains_only_its_adapters(tmp_path: Path) -> None:
    model = build_tiny_llama(tmp_path / "model", layers=1, hidden=64, seed=0)
    settings = {
        "model": str(model),
        "vocab": int(AutoConfig.from_pretrained(model).vocab_size),
        "rows": 2,
        "completion_len": 8,
        "steps": 1,
        "threads": 1,
    }
    full = memory.measure("zero2", settings)
    lora = memory.measure("zero2+lora", settings)
    assert 0 < lora["trainable_params"] < full["trainable_params"] / 4
    for result in (full, lora):
        assert result["peak_mib"] >= result["start_mib"] > 0
        assert result["step_s"] > 0 and result["loss_tokens"] == 16
