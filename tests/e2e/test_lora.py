"""A LoRA student end to end (learner.lora, with gradient checkpointing), scored by a
tensor-parallel teacher (teacher.tensor_parallel_size=2: one vLLM engine over two CPU ranks in
a placement group): the vLLM rollout engine takes the merged weights every step, the run leaves
the merged student/ and its adapter beside it, and `rayd export` writes the merged weights or,
with --adapter, the adapter, from the final student/ or from a ZeRO-2 checkpoint, all of them
the same model. (One run for three features: an end-to-end run costs a minute here.)
"""

import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rayd.cli import main as rayd_main
from rayd.commands.bench import step_records
from rayd.config import load_config
from rayd.driver import train
from rayd.learner.lora import ADAPTER_DIR, ADAPTER_WEIGHTS
from rayd.zoo import resolve_model_path

from helpers import TINY_CONFIG


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run")
    cfg = load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}",
            "trainer.max_steps=4",
            "trainer.save_every=4",
            "teacher.tensor_parallel_size=2",
            "learner.lora.r=4",
            "learner.gradient_checkpointing=true",
            "logging.progress=false",
        ],
    )
    train(cfg)
    return out


def merged_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_a_lora_run_exports_its_merged_student_and_its_adapter(run, tmp_path):
    steps = step_records(run)
    assert len(steps) == 4 and all(r["skipped"] == 0.0 for r in steps)
    assert all(math.isfinite(r["reverse_kl"]) and r["reverse_kl"] > 0 for r in steps)
    student = merged_weights(run / "student")
    base = resolve_model_path("tiny:test-student")
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert student.keys() == original.keys()
    # The adapters trained the attention and MLP weights; everything else is the base model's.
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(student[name], original[name])
    assert torch.equal(student["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert (run / "student" / ADAPTER_DIR / ADAPTER_WEIGHTS).is_file()

    for source in ("final", "checkpoint"):
        merged, adapter = tmp_path / f"merged-{source}", tmp_path / f"adapter-{source}"
        assert rayd_main(["export", str(run), "--out", str(merged), "--from", source]) == 0
        assert (
            rayd_main(["export", str(run), "--out", str(adapter), "--from", source, "--adapter"])
            == 0
        )
        # fp32 ZeRO-2 shards consolidated on the CPU: the learners' own weights.
        same(merged_weights(merged), student, atol=1e-6)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
        same(model.merge_and_unload().state_dict(), student, atol=1e-6)
        assert "PeftModel.from_pretrained" in (adapter / "README.md").read_text()
