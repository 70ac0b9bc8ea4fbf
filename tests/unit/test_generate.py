"""The generate pipeline's filters, fed bad samples: each is dropped with the right reason."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rayd.commands.generate import (
    ContaminationIndex,
    FiltersConfig,
    judge,
    load_generate_config,
    normalized,
    words,
)
from rayd.config import ConfigError
from rayd.evaluate import pass_at_k
from rayd.tasks import AdditionTask, JsonlTask, make_task
from rayd.tasks.base import Task


def _sample(i: int, prompt: str, completion: str, answer: str | None, finish: str = "stop"):
    return {
        "prompt_index": i,
        "prompt": prompt,
        "completion": completion,
        "answer": answer,
        "finish_reason": finish,
    }


def test_each_bad_sample_is_dropped_with_its_reason() -> None:
    task = AdditionTask(digits=2)
    good = AdditionTask.make(47, 38)
    leak = "12+34="  # an eval question the sample repeats
    samples = [
        _sample(0, good.prompt, good.completion, good.answer),  # kept
        _sample(0, good.prompt, " " + good.completion.upper() + " ", good.answer),  # duplicate
        _sample(0, good.prompt, "7+8+0=15;4+3+1=8;A=84", good.answer),  # wrong answer
        _sample(0, good.prompt, "7+8+0=15;", good.answer),  # malformed: no answer
        _sample(0, good.prompt, "  \n", good.answer),  # empty
        _sample(0, good.prompt, "7+8+0=15;4+3+1=8;4+", good.answer, "length"),  # over-long
        _sample(1, "10+2=", f"as in {leak} so A=12", "12"),  # eval leak
        _sample(2, good.prompt, good.completion, good.answer),  # same text, other prompt: kept
    ]
    index = ContaminationIndex(["12+34=", "99+1="], n=8)
    verdicts = judge(samples, task, index, FiltersConfig())
    assert verdicts == [
        "kept",
        "duplicate",
        "wrong_answer",
        "malformed",
        "empty",
        "over_long",
        "contaminated",
        "kept",
    ]
    # Each filter can be turned off.
    off = FiltersConfig(verify=False, ngram=0, dedupe=False)
    verdicts = judge(samples, task, ContaminationIndex(["12+34="], n=0), off)
    assert Counter(verdicts) == {"kept": 5, "malformed": 1, "empty": 1, "over_long": 1}


def test_contamination_ngrams() -> None:
    assert words("What is 47+38 ?") == ["what", "is", "47", "+", "38", "?"]
    index = ContaminationIndex(["Tom has 3 apples and buys 4 more . How many now ?"], n=5)
    assert index.leaks("we know tom has 3 apples and sells them")  # 5-gram shared
    assert not index.leaks("tom has 3 pears")
    assert not ContaminationIndex([], n=5).leaks("anything")
    assert normalized("A = 85 ;") == normalized("a=85")


def test_generate_config_errors() -> None:
    with pytest.raises(ConfigError, match="teacher: required key is missing"):
        load_generate_config(None, [])
    with pytest.raises(ConfigError, match=r"sampling\.n > 1 needs sampling\.temperature > 0"):
        load_generate_config(None, ["teacher.path=x", "sampling.n=2", "sampling.temperature=0"])
    with pytest.raises(ConfigError, match=r"filters\.ngrams: unknown key"):
        load_generate_config(None, ["teacher.path=x", "filters.ngrams=3"])


def test_jsonl_task_gsm8k_layout(tmp_path) -> None:
    rows = [
        {
            "question": f"Tom has {i} apples and buys 2. How many?",
            "answer": f"{i}+2={i + 2}\n#### {i + 2}",
        }
        for i in range(40)
    ]
    rows.append({"question": "Big?", "answer": "1,000 and more\n#### 1,000"})
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = make_task("jsonl", path=str(path), eval_fraction=0.25)
    train, evals = task.examples("train", 100), task.examples("eval", 100)
    assert len(train) + len(evals) == 41 and train and evals
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    ex = next(e for e in train + evals if e.prompt.startswith("Tom has 5 "))
    assert ex.answer == "7" and ex.rationale == "5+2=7\n"
    assert ex.completion == "5+2=7\n#### 7"
    assert task.is_correct(ex.completion, "7")
    assert task.is_correct("so the answer is 7.0", "7")  # no marker: the last number
    assert task.is_correct("#### 1000", "1,000")
    assert not task.is_correct("#### 8", "7")
    assert task.rationale_of(ex.completion) == "5+2=7\n"
    with pytest.raises(ValueError, match="does not exist"):
        JsonlTask(str(tmp_path / "missing.jsonl"))


def test_task_answer_conventions() -> None:
    task = AdditionTask(digits=2)
    ex = AdditionTask.make(47, 38)
    assert task.rationale_of(ex.completion) == ex.rationale
    assert task.answer_text("85") == "A=85"
    assert Task.default().extract_answer("x A=12") == "12"


def test_pass_at_k() -> None:
    assert pass_at_k(4, 0, 1) == 0.0
    assert pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
