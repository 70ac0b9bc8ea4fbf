import subprocess
import sys
from pathlib import Path

import pytest

from rayd.config import ConfigError, load_config

BASE = ["models.student.path=s", "models.teacher.path=t"]
ROOT = Path(__file__).resolve().parents[2]


def test_defaults_and_overrides_typed():
    cfg = load_config(None, [*BASE, "learner.zero_stage=3", "algorithm.beta=0.25"])
    assert cfg.learner.zero_stage == 3
    assert cfg.algorithm.beta == 0.25
    assert cfg.algorithm.resolved_loss == "on_policy_pg"


def test_label_task_adds_one_sample_per_prompt():
    cfg = load_config(
        None,
        [
            *BASE,
            "algorithm.label_weight=0.5",
            "algorithm.step_weighting=divergence",
            "rollout.n=3",
            "trainer.prompts_per_step=2",
            "learner.micro_batch_size=4",
        ],
    )
    assert cfg.samples_per_prompt == 4
    assert cfg.algorithm.step_delimiter == ";"  # what the addition task's rationales end steps with


def test_a_preset_builds_with_its_own_seed_or_the_runs():
    cfg = load_config(
        None,
        [
            "models.student.path=tiny:s",
            "models.teacher.path=tiny:t",
            "models.teacher.seed=0",
            "trainer.seed=2",
        ],
    )
    # what check_models resolves every teacher through, one or several
    assert [t.build_seed(cfg.trainer.seed) for t in cfg.models.teacher_list] == [0]
    assert cfg.models.student.build_seed(cfg.trainer.seed) == 2  # follows the run
    with pytest.raises(ConfigError, match=r"models.teacher.seed: .*only a tiny:<preset>"):
        load_config(None, [*BASE, "models.teacher.seed=0"])


def test_regimes_configs_are_valid():
    cfg = load_config(ROOT / "configs/regimes/student.yaml")
    assert cfg.data.task_options == {"digits": 3, "swap": 0.5, "repair": 0.1}
    assert cfg.models.student.path == "tiny:regime-student"


def test_demo_config_is_valid():
    cfg = load_config(ROOT / "configs/demo/onpolicy.yaml")
    assert cfg.models.teacher.path.startswith("tiny:")


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["learner.zero_stage=4"], "learner.zero_stage: Input should be less than or equal to 3"),
        (["learner.zero_stagee=1"], "learner.zero_stagee: unknown key"),
        (["rollout.temperature=hot"], "rollout.temperature: Input should be a valid number"),
        (["trainer.prompts_per_step=3"], "must equal learner.num_learners"),
        (["algorithm.temperature=2"], "needs teacher.backend=hf"),
        (["algorithm.lmbda=0.5"], "needs algorithm.name=gkd"),
        (["algorithm.name=gkd", "algorithm.loss=on_policy_pg"], "gkd takes forward_kl"),
        (["rollout.max_new_tokens=600"], "smaller than rollout.max_model_len"),
        (["learner=3"], "learner: Input should be a valid dictionary"),
        (["nonsense"], "not of the form key.path=value"),
        (["algorithm.step_weighting=steps"], "algorithm.step_weighting: Input should be 'none'"),
        (["algorithm.step_temperature=0"], "algorithm.step_temperature: Input should be greater"),
        (["algorithm.step_delimiter="], "algorithm.step_delimiter: String should have at least"),
        (["algorithm.label_weight=-1"], "algorithm.label_weight: Input should be greater"),
        (
            ["algorithm.name=sft", "algorithm.step_weighting=uniform"],
            "algorithm.step_weighting applies to on_policy and gkd, not sft",
        ),
        (
            ["algorithm.name=step_by_step", "algorithm.label_weight=1"],
            "algorithm.label_weight applies to on_policy and gkd, not step_by_step",
        ),
        (["algorithm.label_weight=0.5"], "trainer.prompts_per_step * (rollout.n + 1 label-task"),
        (["rollout.backend=learner", "trainer.max_staleness=1"], "set trainer.max_staleness=0"),
        (["rollout.backend=learner", "learner.zero_stage=3"], "use zero_stage 0-2"),
        (["rollout.backend=learner", "rollout.num_workers=2"], "leave rollout.num_workers at 1"),
        (
            ["rollout.backend=learner", "rollout.tensor_parallel_size=2"],
            "need rollout.backend=vllm (got learner)",
        ),
        (
            ["trainer.eval_sample_temperature=0"],
            "trainer.eval_sample_temperature: Input should be greater than 0",
        ),
        (
            ["trainer.eval_sample_temperature=.inf"],
            "trainer.eval_sample_temperature: Input should be a finite number",
        ),
        (
            ["trainer.eval_sample_temperature=1", "data.source=prompts.jsonl"],
            "trainer.eval_sample_temperature: sampled accuracy needs a task's answer verifier",
        ),
    ],
)
def test_bad_values_give_one_clear_line(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, *overrides])
    message = str(info.value)
    assert needle in message
    assert message.startswith("config error:")


def test_missing_models_and_file(tmp_path):
    with pytest.raises(ConfigError, match="models: required key is missing"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_train_cli_bad_config_exits_nonzero_with_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("models: {student: {path: s}, teacher: {path: t}}\nlearner: {zero_stage: 4}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rayd", "train", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    err_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err_lines[-1].startswith("config error: learner.zero_stage")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("support", "method", "kwargs"),
    [
        ("teacher_topk", "score", {"top_k": 3}),
        ("student_topk", "score_ids", {"add_top_k": 0}),
        ("union", "score_ids", {"add_top_k": 3}),
    ],
)
def test_teacher_support_asks_the_rollouts_and_the_teacher_for_the_right_ids(
    support, method, kwargs
):
    import torch

    from rayd.teacher.signal import ask_teacher
    from rayd.types import Sample

    cfg = load_config(
        None,
        [
            *BASE,
            "teacher.backend=hf",
            f"teacher.support={support}",
            "teacher.top_k=3",
            "algorithm.loss=reverse_kl",
        ],
    )
    assert cfg.student_topk == (0 if support == "teacher_topk" else 3)
    ids = torch.tensor([[4, 5, 6], [7, 8, 9]])
    samples = [Sample([1], [2, 3], [-1.0, -1.0], prompt_index=0, student_topk_ids=ids)]

    class RecordingPool:  # stands in for the teacher WorkerPool: what would be sent to it
        def map_chunks(self, name, *inputs, **kw):
            self.call = (name, inputs, kw)
            return []

    from rayd.teacher.group import Teachers

    pool = RecordingPool()
    ask_teacher(cfg.teacher, Teachers.single(pool), samples)  # type: ignore[arg-type]
    name, inputs, kw = pool.call
    assert (name, kw) == (method, kwargs)
    assert inputs[0] == [([1], [2, 3])]
    if method == "score_ids":
        assert inputs[1][0] is ids


@pytest.mark.parametrize("loss", ["tvd", "skew_kl", "skew_reverse_kl"])
def test_tvd_and_skew_kl_run_over_any_top_k_support_but_not_the_full_vocabulary(loss):
    for extra in (
        [],
        ["algorithm.name=gkd", "algorithm.skew=0.3"],
        ["teacher.backend=hf", "teacher.support=union"],
    ):
        cfg = load_config(None, [*BASE, f"algorithm.loss={loss}", *extra])
        assert cfg.algorithm.resolved_loss == loss
    with pytest.raises(ConfigError, match=rf"algorithm\.loss={loss} runs over the teacher's top-k"):
        load_config(None, [*BASE, f"algorithm.loss={loss}", "teacher.support=full"])
    with pytest.raises(ConfigError, match=r"algorithm\.skew"):
        load_config(None, [*BASE, f"algorithm.loss={loss}", "algorithm.skew=1"])
