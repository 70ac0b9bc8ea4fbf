"""The world's new task, subtraction by a borrow rationale (rayd/tasks/arithmetic.py)."""

from __future__ import annotations

import pytest

from rayd.tasks import SubtractionTask, make_task


def test_the_borrow_rationale_and_the_padded_answer():
    ex = SubtractionTask.make_subtraction(526, 462, 3)
    assert ex.prompt == "526-462="
    # 6-2 = 4; 2-6 borrows (12-6 = 6, written 16); 5-4-1 = 0
    assert ex.completion == "6-2-0=4;2-6-0=16;5-4-1=0;A=064"
    assert SubtractionTask.make_subtraction(100, 99, 3).completion == (
        "0-9-0=11;0-9-1=10;1-0-1=0;A=001"
    )
    with pytest.raises(ValueError, match="a >= b"):
        SubtractionTask.make_subtraction(1, 2, 3)


def test_every_example_is_valid_and_the_splits_are_disjoint():
    task = make_task("subtraction", digits=3)
    train = task.examples("train", 2000)
    test = task.examples("test", 500)
    validation = task.examples("validation", 500)
    for ex in train[:500] + test:
        a, b = (int(x) for x in ex.prompt[:-1].split("-"))
        assert a >= b and int(ex.answer) == a - b and len(ex.answer) == 3
        assert task.check_rationale(a, b, ex.rationale)
        assert not task.check_rationale(a, b, ex.rationale.replace("-0=", "-1=", 1))
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert not {e.prompt for e in test} & {e.prompt for e in validation}
    assert task.examples("test", 50) == test[:50]


def test_it_has_no_regime_options():
    with pytest.raises(KeyError, match="has no option 'slip'"):
        make_task("subtraction", digits=3, slip=0.3)
