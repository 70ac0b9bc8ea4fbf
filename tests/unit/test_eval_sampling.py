"""Sampled accuracy beside greedy (`rayd eval --temperature`, trainer.eval_sample_temperature),
without Ray: `score_task` and `task_accuracy` drive a rollout worker in this process, on the
shipped world student (3-digit addition, about 70% greedy: docs/experiments/world.md). The Ray
paths around them are tests/e2e/test_export.py (`rayd eval` on a run) and the e2e runs' held-out
evals."""

import pytest
from transformers import AutoTokenizer

from rayd.commands.eval import _checked, _parser, _print_result
from rayd.config import load_config, save_config
from rayd.evaluate import eval_prompts, eval_sample_seed, score_task, task_accuracy
from rayd.rollout.worker import RolloutWorker
from rayd.sampling import Sampling
from rayd.tasks import make_task
from rayd.world import TASK_OPTIONS
from rayd.zoo import resolve_model_path

from helpers import engine_spec

NEW_TOKENS = 48  # a 3-digit carry rationale and its answer fit (configs/world/student.yaml)


@pytest.fixture(scope="module")
def world():
    path = resolve_model_path("tiny:world-student")
    task = make_task("addition", seed=0, **TASK_OPTIONS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    examples, ids = eval_prompts(tokenizer, task, 24, chat_template=False, max_prompt_len=48)
    worker = RolloutWorker(engine_spec(path, "hf", max_model_len=96))
    return worker, task, examples, ids


def score(world, **kwargs):
    worker, task, examples, ids = world
    return score_task(worker.generate, examples, ids, task, max_new_tokens=NEW_TOKENS, **kwargs)


def test_plain_eval_is_greedy_alone_and_prints_as_before(world, capsys):
    worker, task, examples, ids = world
    result = score(world, seed=0)
    assert list(result) == ["prompts", "accuracy", "completion_len", "examples"]
    greedy = worker.generate(ids, list(range(len(ids))), sampling=Sampling.greedy(NEW_TOKENS))
    right = [task.is_correct(s.text, e.answer) for s, e in zip(greedy, examples, strict=True)]
    assert result["accuracy"] == sum(right) / len(right) > 0.3
    # What `rayd eval` printed before --temperature meant anything without --pass-k.
    _print_result("runs/demo/sft/student", {"prompts": 24, "accuracy": 17 / 24}, 0.75, seed=0)
    assert capsys.readouterr().out == (
        "model                                     prompts  accuracy\n"
        "runs/demo/sft/student                          24     70.8%\n"
        "rayd eval: the run's own final held-out accuracy (summary.json): 75.0%\n"
    )


def test_hot_sampled_accuracy_is_seeded_and_below_greedy(world, capsys):
    hot = score(world, temperature=3.0, seed=5)
    assert hot["temperature"] == 3.0
    assert hot["sampled_accuracy"] <= hot["accuracy"] - 0.2, hot  # 29% against 71% here
    assert score(world, temperature=3.0, seed=5) == hot  # the same seed, the same draws
    # At temperature 1 the student is close to its mode, and still not at it on every prompt.
    assert score(world, temperature=1.0, seed=5)["sampled_accuracy"] > hot["sampled_accuracy"]
    _print_result("m", hot, None, seed=5)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[-2:] == ["accuracy", "sampled"]
    assert "sampled: 1 draw per prompt at temperature 3, seed 5 (--seed)" in out


def test_pass_at_k_still_draws_at_one_without_a_temperature(world):
    result = score(world, ks=(1,), samples=2, seed=0)
    assert (result["temperature"], result["samples_per_prompt"]) == (1.0, 2)
    assert "sampled_accuracy" not in result


def test_task_accuracy_scores_one_completion_per_prompt(world):
    worker, task, _, ids = world
    with pytest.raises(ValueError, match="one completion per prompt, got n=2"):
        task_accuracy(
            worker.generate, ids, [0], ["1"], task, Sampling(2, 1.0, 1.0, NEW_TOKENS), seed=0
        )


def test_the_command_line_chooses_the_temperature(tmp_path):
    run = tmp_path / "run"
    overrides = ["models.student.path=s", "models.teacher.path=t", "data.eval_size=8"]
    save_config(load_config(None, overrides), run / "config.yaml")
    (run / "student").mkdir()
    (run / "student" / "config.json").write_text("{}")

    def temperature(*flags: str) -> float | None:
        return _checked(_parser().parse_args([str(run), *flags])).temperature

    assert temperature() is None  # plain `rayd eval`: greedy alone, as before
    assert temperature("--temperature", "0.7") == 0.7
    assert temperature("--pass-k", "1,4") == 1.0  # pass@k's old default
    assert temperature("--pass-k", "1", "--temperature", "0.5") == 0.5


def test_each_eval_step_has_its_own_reproducible_seed():
    seeds = [eval_sample_seed(7, step) for step in (0, 5, 10)]
    assert seeds == [eval_sample_seed(7, step) for step in (0, 5, 10)]
    assert len(set(seeds)) == 3 and eval_sample_seed(8, 5) != seeds[1]
    assert all(0 <= s < 2**31 for s in seeds)


def test_the_config_key_is_off_by_default():
    base = ["models.student.path=s", "models.teacher.path=t"]
    assert load_config(None, base).trainer.eval_sample_temperature is None
    cfg = load_config(None, [*base, "trainer.eval_sample_temperature=1"])
    assert cfg.trainer.eval_sample_temperature == 1.0
