"""Every kind of bad input gets one clear line and a non-zero exit, before any actor starts.

Each case runs `rayd train`'s entry point in this process (a subprocess per case would
spend most of the time importing torch; `test_config.py` checks the real CLI once). The table of
cases, messages and exit codes is written to `runs/reports/bad_inputs.md`
(`pytest tests/unit/test_bad_inputs.py`); docs/bad_inputs.md is a copy.
"""

import json
import shutil
from pathlib import Path

import pytest

from rayd.checkpoint import CheckpointStore
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


def existing_checkpoint(tmp: Path, corrupt: bool, num_learners: int = 1) -> list[str]:
    store = CheckpointStore(tmp / "run" / "checkpoints")
    staging = store.staging_dir(4)
    (staging / "learner" / "x.pt").write_bytes(b"weights")
    store.commit(staging, 4, {"num_learners": num_learners, "zero_stage": 2})
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
        "rollout.backend: Input should be 'vllm' or 'hf'",
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
        "is not a folder",
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
}


def test_every_bad_input_gets_one_clear_line(tmp_path, capsys):
    import ray

    assert len(CASES) >= 40
    # A Ray left running by an earlier in-process test forwards its dying actors' log lines
    # (resource_tracker warnings) into this test's stderr; every case here must fail before
    # Ray starts, which the loop checks. Shutting it down flushes Ray's deduplicated log lines
    # ("[repeated 2x across cluster]") to stderr: they belong to the earlier test, not here.
    ray.shutdown()
    capsys.readouterr()
    table, failures = [], []
    for i, (kind, (setup, code, needle)) in enumerate(CASES.items()):
        case_dir = tmp_path / f"case{i}"
        case_dir.mkdir()
        config, overrides = setup(case_dir)
        # A case with its own config file tests that file alone; the others change GOOD.
        if config:
            argv = [config, *overrides]
        else:
            argv = [str(write_base(case_dir)), *GOOD, f"output_dir={case_dir}/out", *overrides]
        exit_code = main(argv)
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
