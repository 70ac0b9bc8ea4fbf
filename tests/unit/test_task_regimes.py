"""The regimes variant of the addition task (issue 22; docs/experiments/regimes.md): several
valid rationales per prompt (`swap`), errors repaired later in a rationale (`repair`), and the
plain task unchanged when both are 0."""

from __future__ import annotations

import re

import pytest

from rayd.models import DEFAULT_CHARS
from rayd.tasks import AdditionTask, make_task
from rayd.tasks.arithmetic import REPAIR_MARKER
from rayd.zoo import PRESETS, cache_target

VARIANT = {"digits": 3, "swap": 0.5, "repair": 0.1}


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.removesuffix("=").split("+")
    return int(a), int(b)


def test_default_options_are_the_plain_task_byte_for_byte():
    # Hard-coded from make() and examples() before the options existed: the demo, its caches
    # and the e2e tests depend on these strings, splits and answers.
    assert AdditionTask.make(47, 38).completion == "7+8+0=15;4+3+1=8;A=85"
    assert AdditionTask.make(989, 536).completion == "9+6+0=15;8+3+1=12;9+5+1=15;A=1525"
    three = make_task("addition", digits=3)
    train = [(e.prompt, e.completion) for e in three.examples("train", 3)]
    assert train == [
        ("526+462=", "6+2+0=8;2+6+0=8;5+4+0=9;A=988"),
        ("933+793=", "3+3+0=6;3+9+0=12;9+7+1=17;A=1726"),
        ("187+914=", "7+4+0=11;8+1+1=10;1+9+1=11;A=1101"),
    ]
    assert [e.prompt for e in three.examples("eval", 3)] == ["216+718=", "989+536=", "940+123="]
    two = make_task("addition").examples("train", 2)
    assert [e.completion for e in two] == ["3+5+0=8;6+5+0=11;A=118", "6+0+0=6;9+2+0=11;A=116"]
    zeros = make_task("addition", digits=3, swap=0.0, repair=0.0)
    assert zeros.examples("train", 50) == three.examples("train", 50)


def test_variant_keeps_the_plain_prompts_splits_and_answers():
    # The choices come from a stream of their own: only the rationales differ.
    plain = make_task("addition", digits=3).examples("eval", 200)
    variant = make_task("addition", **VARIANT).examples("eval", 200)
    assert [(e.prompt, e.answer) for e in variant] == [(e.prompt, e.answer) for e in plain]
    assert any(v.rationale != p.rationale for v, p in zip(variant, plain, strict=True))
    assert make_task("addition", **VARIANT).examples("eval", 20) == variant[:20]  # deterministic


def test_variant_splits_are_disjoint():
    task = make_task("addition", **VARIANT)
    train = {e.prompt for e in task.examples("train", 4000)}
    held_out = {e.prompt for e in task.examples("eval", 500)}
    assert len(held_out) == 500 and not train & held_out


def test_gold_rationales_verify_and_use_both_orders():
    task = make_task("addition", **VARIANT)
    examples = task.examples("train", 2000)
    straight = swapped = 0
    for e in examples:
        a, b = _operands(e.prompt)
        assert task.is_correct(e.completion, e.answer)
        assert AdditionTask.check_rationale(a, b, e.rationale), e.completion
        # Column i's operands as written, against a's and b's digits in place.
        da, db = str(a)[::-1], str(b)[::-1]
        for i, (x, y) in enumerate(re.findall(r"(\d)\+(\d)\+\d=", e.rationale)):
            if da[i] == db[i]:
                continue  # both orders read the same
            straight += (x, y) == (da[i], db[i])
            swapped += (x, y) == (db[i], da[i])
    # About half each (binomial over ~5400 unequal columns: 0.5 +- 0.007 is one sigma).
    assert 0.46 < swapped / (straight + swapped) < 0.54


def test_repairs_occur_at_about_rate_p_and_end_in_the_right_total():
    task = make_task("addition", **VARIANT)
    steps = repairs = 0
    for e in task.examples("train", 3000):
        a, b = _operands(e.prompt)
        carry = 0
        da, db = str(a)[::-1], str(b)[::-1]
        for i, step in enumerate(e.rationale.split(";")[:-1]):
            steps += 1
            right = int(da[i]) + int(db[i]) + carry
            total = step.split("=")[1]
            if REPAIR_MARKER in total:
                repairs += 1
                wrong, fixed = total.split(REPAIR_MARKER)
                assert fixed == str(right) and wrong != str(right) and 0 <= int(wrong) <= 19
            else:
                assert total == str(right)
            carry = right // 10
    # 9000 steps at p = 0.1: 0.1 +- 0.003 is one sigma.
    assert 0.09 < repairs / steps < 0.11


def test_check_rationale_rejects_invalid_ones():
    ok = "7+8+0=15;4+3+1=8;"
    assert AdditionTask.check_rationale(47, 38, ok)
    assert AdditionTask.check_rationale(47, 38, "8+7+0=16!15;3+4+1=8;")
    for bad in (
        "7+8+0=16;4+3+1=8;",  # a wrong total left standing
        "7+8+0=15!15;4+3+1=8;",  # a "repair" of the right total
        "7+8+0=15;4+3+0=7;",  # the wrong carry
        "7+8+0=15;",  # a column missing
        "7+8+0=15;4+3+1=8;x",  # text outside the steps
        "7+9+0=16;4+3+1=8;",  # a digit of neither operand
    ):
        assert not AdditionTask.check_rationale(47, 38, bad), bad


def test_options_are_checked_and_the_marker_is_one_token():
    assert REPAIR_MARKER in DEFAULT_CHARS  # the tiny models' character tokenizer has it
    with pytest.raises(ValueError, match="repair"):
        make_task("addition", repair=0.5)  # a wrong total would tie the right one at greedy
    with pytest.raises(ValueError, match="swap"):
        make_task("addition", swap=1.5)


def test_presets_keep_their_cache_keys():
    # The existing recipes' hashes (cached models on every machine) must not move.
    assert cache_target("addition-teacher", PRESETS["addition-teacher"]).name == (
        "addition-teacher-92e3d5940440"
    )
    assert cache_target("test-teacher", PRESETS["test-teacher"]).name == (
        "test-teacher-0b3b03504923"
    )
    assert PRESETS["repair-teacher"]["pretrain"]["task_options"] == VARIANT


def test_report_corrupts_a_prefix_with_a_total_that_is_already_wrong():
    from rayd.commands.bench.regimes import corrupted_prefixes

    prompts = make_task("addition", **VARIANT).examples("eval", 100)
    for row in corrupted_prefixes(prompts):
        wrong = row["prefix"].rsplit("=", 1)[1]
        right = row["repair"].removeprefix(REPAIR_MARKER).removesuffix(";")
        # "=1" before a right "15" is not yet an error: such values are never drawn.
        assert not right.startswith(wrong)
        assert row["clean"].endswith("=" + right)
        if row["slip"]:  # an operand copied wrong, summed consistently with it
            last = row["slip"].removeprefix(row["example"].prompt).rsplit(";", 1)[-1]
            operands, total = last.split("=")
            assert sum(int(v) for v in operands.split("+")) == int(total)
            clean = row["clean"].removeprefix(row["example"].prompt).rsplit(";", 1)[-1]
            assert clean.split("=")[0] != operands
