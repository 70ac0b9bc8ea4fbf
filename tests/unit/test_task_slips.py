"""The portable world's task option (issue 37; docs/experiments/world.md): `slip` writes one digit
of a column step wrong, then the repair marker and the right digit, with the wrong digit left
out of the loss; and the validation and test splits that halve the held-out pairs."""

from __future__ import annotations

from collections import Counter

import pytest

from rayd.models import build_char_tokenizer
from rayd.pretrain import encode_examples
from rayd.tasks import AdditionTask, make_task
from rayd.tasks.arithmetic import REPAIR_MARKER, SLIP_KINDS

SLIPS = {"digits": 3, "slip": 0.3}


def _operands(prompt: str) -> tuple[int, int]:
    a, b = prompt.removesuffix("=").split("+")
    return int(a), int(b)


def _clean(completion: str, unlearned: tuple[tuple[int, int], ...]) -> str:
    """The completion with each slip (the wrong digit and the marker after it) removed."""
    drop = {i for lo, hi in unlearned for i in (*range(lo, hi), hi)}
    return "".join(c for i, c in enumerate(completion) if i not in drop)


def test_slips_keep_the_plain_prompts_answers_and_clean_rationale():
    plain = make_task("addition", digits=3).examples("train", 500)
    slipped = make_task("addition", **SLIPS).examples("train", 500)
    assert [(e.prompt, e.answer) for e in slipped] == [(e.prompt, e.answer) for e in plain]
    for p, s in zip(plain, slipped, strict=True):
        assert _clean(s.completion, s.unlearned) == p.completion
        for lo, hi in s.unlearned:
            assert hi == lo + 1 and s.completion[hi] == REPAIR_MARKER
            assert s.completion[lo] != s.completion[hi + 1]  # a slip is a different digit
        assert AdditionTask.check_rationale(*_operands(s.prompt), s.rationale)


def test_slips_occur_at_about_the_rate_and_of_every_kind():
    examples = make_task("addition", **SLIPS).examples("train", 3000)
    steps = sum(e.rationale.count(";") for e in examples)
    slips = sum(len(e.unlearned) for e in examples)
    assert 0.27 < slips / steps < 0.33
    kinds: Counter[str] = Counter()
    for e in examples:
        for lo, _ in e.unlearned:
            offset = lo - (e.completion.rfind(";", 0, lo) + 1)
            kinds["operand" if offset in (0, 2) else "carry" if offset == 4 else "total"] += 1
    assert set(kinds) == set(SLIP_KINDS)
    assert min(kinds.values()) > slips / 3 * 0.85


def test_check_rationale_accepts_repairs_and_refuses_unrepaired_or_fake_ones():
    assert AdditionTask.check_rationale(47, 38, "7+9!8+0=15;4+3+1=8;")
    assert AdditionTask.check_rationale(47, 38, "7+8+1!0=15;4+3+1=8;")
    assert AdditionTask.check_rationale(47, 38, "7+8+0=16!5;4+3+1=8;")
    assert not AdditionTask.check_rationale(47, 38, "7+9+0=15;4+3+1=8;")  # unrepaired
    assert not AdditionTask.check_rationale(47, 38, "7+8!8+0=15;4+3+1=8;")  # a right digit
    assert not AdditionTask.check_rationale(47, 38, "7+8+0=16!6;4+3+1=8;")  # a wrong fix


def test_slip_and_repair_together_are_refused():
    with pytest.raises(ValueError, match=r"repair and task_options\.slip"):
        make_task("addition", digits=3, repair=0.1, slip=0.1)
    with pytest.raises(ValueError, match="slip must lie in"):
        make_task("addition", digits=3, slip=1.5)


def test_the_loss_mask_leaves_out_exactly_the_wrong_digits():
    tokenizer = build_char_tokenizer()
    examples = make_task("addition", **SLIPS).examples("train", 50)
    assert any(e.unlearned for e in examples)
    for e, (ids, mask) in zip(examples, encode_examples(tokenizer, examples), strict=True):
        start = len(e.prompt)
        text = tokenizer.decode(ids[start:-1])
        assert text == e.completion
        dropped = [i for i, m in enumerate(mask[start:-1]) if not m]
        assert dropped == [lo for lo, _ in e.unlearned]
        assert mask[:start] == [0] * start and mask[-1] == 1  # prompt out, EOS in


def test_validation_and_test_halve_the_held_out_pairs():
    task = make_task("addition", digits=3)
    held_out = {e.prompt for e in task.examples("eval", 4000)}
    validation = {e.prompt for e in task.examples("validation", 2000)}
    test = {e.prompt for e in task.examples("test", 2000)}
    train = {e.prompt for e in task.examples("train", 20000)}
    assert len(validation) == len(test) == 2000 and not validation & test
    assert not (validation | test) & train
    # Both lie inside "eval"; about half of a sample of it is in each.
    assert 0.4 < len(held_out & test) / len(held_out & (test | validation)) < 0.6
    with pytest.raises(ValueError, match="split must be one of"):
        task.examples("dev", 1)
