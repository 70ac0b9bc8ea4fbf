"""`rayd export` on a real run: the checkpoint consolidated from DeepSpeed's ZeRO-2 shards equals
the student the learners published, the export loads with transformers and with vLLM, and both
give the learner's greedy output; the model card's load snippets (transformers, vLLM), run as
written in fresh processes, print the card's expected output; `rayd eval` on the run, its
student/ and the export takes the run's settings and reproduces the run's final accuracy;
`--quantize int8` reloads as int8 with its accuracy recorded.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayd.cluster import get
from rayd.commands.eval import main as eval_main
from rayd.commands.export import export
from rayd.config import load_config
from rayd.driver import train
from rayd.rollout.worker import RolloutWorker
from rayd.sampling import Sampling

from helpers import TINY_CONFIG, engine_spec

PROMPTS = ["12+34=", "50+7=", "99+1=", "8+8="]


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("export-run")
    cfg = load_config(
        TINY_CONFIG,
        [
            f"output_dir={out}",
            "trainer.max_steps=4",
            "trainer.save_every=4",
            "rollout.backend=hf",
            "teacher.backend=hf",
            "logging.progress=false",
        ],
    )
    train(cfg)
    return out


def greedy_hf(model_dir: Path, tokenizer, max_new_tokens: int = 16) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    outs = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        completion = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in completion:  # vLLM's completion stops at eos, inclusive
            completion = completion[: completion.index(tokenizer.eos_token_id) + 1]
        outs.append(completion)
    return outs


def test_export_loads_in_transformers_and_vllm_with_the_learners_greedy_output(run, tmp_path):
    from_ckpt = export(run, tmp_path / "ckpt", source="checkpoint")
    export(run, tmp_path / "final", source="final")
    assert from_ckpt["weights"] == {"from": "checkpoint", "step": 4}
    # ZeRO-2 shards of two ranks, consolidated on the CPU = what the learners published.
    a = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    b = load_file(str(run / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)

    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "tiny:test-teacher" in card and "on_policy" in card and "max_steps: 4" in card
    record = json.loads((tmp_path / "ckpt" / "rayd_export.json").read_text())
    assert record["provenance"]["student_init"]["path"] == "tiny:test-student"

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    learner = greedy_hf(run / "student", tokenizer)
    assert greedy_hf(tmp_path / "ckpt", tokenizer) == learner
    engine = (
        ray.remote(RolloutWorker)
        .options(num_cpus=1)
        .remote(engine_spec(tmp_path / "ckpt", "vllm", dtype="auto", max_model_len=64))
    )
    try:
        ids = [tokenizer(t, add_special_tokens=False).input_ids for t in PROMPTS]
        samples = get(
            engine.generate.remote(ids, list(range(len(ids))), sampling=Sampling.greedy(16)),
            300,
            "vllm greedy",
        )
    finally:
        ray.kill(engine)
    assert [s.completion_ids for s in samples] == learner


def test_card_snippets_run_as_written_and_print_the_expected_output(run, tmp_path):
    out = tmp_path / "export"
    record = export(run, out)
    card = (out / "README.md").read_text()
    example = record["example"]
    # The first held-out prompt of the run's task, plain text (the tiny tokenizer has no
    # chat template), its greedy output and gold answer are on the card.
    assert example["question"] == example["prompt"] and "+" in example["prompt"]
    assert f"```text\n{example['prompt']}\n```" in card
    assert f"```text\n{example['output']}\n```" in card
    assert f"Gold answer: `{example['answer']}`" in card
    snippets = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(snippets) == 2
    assert "AutoModelForCausalLM" in snippets[0] and "model=path," in snippets[1]
    # Nothing of this session leaks in: the vLLM snippet must carry its own CPU memory setting.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "RAY_"))}
    for name, code in zip(("transformers", "vllm"), snippets, strict=True):
        script = tmp_path / f"{name}_snippet.py"
        script.write_text(code)
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env=env,
        )
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        # The output as whole lines (vLLM logs to stdout too, before and after it)
        assert f"\n{example['output']}\n" in f"\n{proc.stdout}", f"{name}: {proc.stdout[-800:]}"

    # rayd eval takes the run, its student/ and the export alike, with the run's settings.
    summary = json.loads((run / "summary.json").read_text())
    for target in (run, run / "student", out):
        report = tmp_path / f"eval-{target.name}.json"
        assert eval_main([str(target), "--out", str(report)]) == 0
        result = json.loads(report.read_text())
        settings = {k: v["value"] for k, v in result["settings"].items()}
        assert settings["task"] == "addition" and settings["count"] == 32
        assert settings["max_new_tokens"] == 24 and settings["backend"] == "hf"
        assert {v["from"] for k, v in result["settings"].items() if k != "options"} == {
            f"export {out}" if target == out else f"run {run}"
        }
        assert result["prompts"] == 32
        assert result["accuracy"] == summary["final"]["eval/accuracy"]


def test_int8_export_records_accuracy_before_and_after(run, tmp_path):
    record = export(run, tmp_path / "int8", quantize="int8", eval_count=16)
    accuracy = record["accuracy"]
    assert accuracy["prompts"] == 16
    assert 0.0 <= accuracy["float32"] <= 1.0 and 0.0 <= accuracy["int8"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert "Int8" in type(model.model.layers[0].mlp.up_proj.weight).__name__
    assert "int8" in (tmp_path / "int8" / "README.md").read_text()
    size = sum(f.stat().st_size for f in (tmp_path / "int8").glob("*.safetensors"))
    assert size < (run / "student" / "model.safetensors").stat().st_size
