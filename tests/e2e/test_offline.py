"""Reasoning distillation end to end: teacher rationales written by `rayd generate` on real vLLM
engines, then the offline modes on real DeepSpeed learners, each with its loss falling.

Tiny models (seconds to build); a few dozen steps per mode, so this checks that the pipeline
runs and learns, not the accuracies the demo reports.
"""

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

from rayd.commands.generate import generate, load_generate_config
from rayd.config import load_config
from rayd.driver import train

from helpers import TINY_CONFIG


@pytest.fixture(scope="module")
def traces(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("traces")
    cfg = load_generate_config(
        None,
        [
            "teacher.path=tiny:test-reasoner",
            f"output_dir={out}",
            "prompts.count=96",
            "prompts.eval_size=32",
            "sampling.n=2",
            "sampling.temperature=1.0",
            "sampling.max_new_tokens=24",
            "engines.max_model_len=64",
            "shard_size=32",
        ],
    )
    return cfg, generate(cfg)


def test_generate_writes_a_verified_dataset_and_resumes_by_shard(traces):
    cfg, summary = traces
    out = cfg.out
    assert summary["samples"] == 192
    assert summary["kept"] + sum(summary["dropped"].values()) == 192
    assert summary["kept"] > 0
    ds = load_from_disk(str(out / "dataset"))
    assert len(ds) == summary["kept"]
    assert set(ds.column_names) >= {"prompt", "completion", "rationale", "answer", "sample_id"}
    for row in ds.select(range(min(len(ds), 20))):
        assert row["completion"].endswith("A=" + row["answer"])
        assert row["rationale"] + "A=" + row["answer"] == row["completion"]
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 192 - summary["kept"]
    provenance = json.loads((out / "provenance.json").read_text())
    assert len(provenance["teacher_weights_sha256"]) == 64
    assert provenance["sampling"]["n"] == 2 and "finished" in provenance

    # An interrupted job: one shard lost. The rerun redoes only that shard, with the same seed,
    # so the dataset comes out the same and nothing is duplicated.
    shards = sorted((out / "shards").iterdir())
    assert len(shards) == 3
    before = {p.name: p.read_text() for p in shards}
    shards[1].unlink()
    again = generate(cfg)
    assert again == summary
    assert {p.name: p.read_text() for p in sorted((out / "shards").iterdir())} == before


@pytest.mark.parametrize(
    "mode",
    [
        ["algorithm.name=sft"],
        ["algorithm.name=step_by_step", "trainer.prompts_per_step=8"],
        ["algorithm.name=logit_kd", "algorithm.alpha=0.5"],
        ["algorithm.name=feature_kd", "teacher.backend=hf", "learner.zero_stage=3"],
    ],
    ids=["sft", "step_by_step", "logit_kd", "feature_kd"],
)
def test_offline_mode_loss_falls(traces, tmp_path, mode):
    cfg = load_config(
        TINY_CONFIG,
        [
            f"output_dir={tmp_path}/{{name}}",
            "algorithm.loss=null",
            f"data.train_dataset={traces[0].out / 'dataset'}",
            "trainer.max_steps=30",
            "trainer.eval_every=0",
            "learner.optim.lr=3.0e-3",
            "logging.progress=false",
            *mode,
        ],
    )
    summary = train(cfg)
    records = [json.loads(x) for x in Path(summary["metrics"]).read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, f"{mode}: loss {first:.3f} -> {last:.3f}"
    assert "eval/accuracy" in summary["final"]
    if cfg.algorithm.name == "logit_kd":
        assert "soft_loss" in records[-2] and "hard_loss" in records[-2]
        assert "eval/reverse_kl" in summary["final"]
    elif cfg.algorithm.name == "feature_kd":
        # Student layer 1 (of 1) maps to teacher layer 2 (of 2) through a learned projection,
        # under ZeRO-3 (the projection is partitioned with the student); both terms fall.
        steps = [r for r in records if "loss" in r]
        for term in ("feature_loss", "token_loss"):
            first = sum(r[term] for r in steps[:5]) / 5
            last = sum(r[term] for r in steps[-5:]) / 5
            assert last < 0.7 * first, f"{term} {first:.3f} -> {last:.3f}"
        # The projection is a training aid, not part of the exported student.
        exported = load_file(str(Path(summary["student"]) / "model.safetensors"))
        assert not [k for k in exported if "feature_proj" in k]
    else:  # no teacher actor was started, so the eval has no teacher KL
        assert "eval/reverse_kl" not in summary["final"]
        assert "time/teacher" not in records[-2]
