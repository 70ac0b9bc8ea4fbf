"""Privileged context without Ray: the teacher prompts written from the data, the feedback
context chosen among a prompt's own samples, and the batch that carries the teacher's own
input to learners that hold it (positions aligned with the student's)."""

from __future__ import annotations

import pytest
import torch

from rayd.config import ConfigError, load_config
from rayd.data.prompts import TeacherPrompts, encode_prompt, load_prompts
from rayd.learner.deepspeed_backend import _teacher_view
from rayd.models import build_char_tokenizer
from rayd.tasks import AdditionTask
from rayd.teacher.privileged import PrivilegedContext
from rayd.types import Sample, TeacherScore, training_batch

TEMPLATE = "{prompt}\nsolution: {privileged_context}\nnow: {prompt}"


def test_each_row_gets_its_teacher_prompt_with_the_field_it_shows() -> None:
    tok = build_char_tokenizer()
    cfg = load_config(
        None, ["models.student.path=tiny:test-student", "models.teacher=self", "data.eval_size=4"]
    )
    task = AdditionTask(seed=0)
    plain = load_prompts(cfg.data, tok, 32, 0)
    for context in ("completion", "rationale", "answer"):
        shown = load_prompts(
            cfg.data, tok, 32, 0, teacher_prompts=TeacherPrompts(context, TEMPLATE, 200)
        )
        for a, b in zip(plain.train[:5] + plain.eval, shown.train[:5] + shown.eval, strict=True):
            assert a.ids == b.ids and a.teacher_ids is None  # the student's prompt unchanged
            field = {
                "completion": tok.decode(b.completion_ids[:-1]),  # the eos is the end, not text
                "rationale": b.rationale,
                "answer": task.answer_text(b.answer),
            }[context]
            text = TEMPLATE.format(prompt=b.text, privileged_context=field)
            assert b.teacher_ids == encode_prompt(tok, text, False)
    with pytest.raises(ConfigError, match=r"more than 10 \(teacher\.max_model_len"):
        load_prompts(cfg.data, tok, 32, 0, teacher_prompts=TeacherPrompts("answer", TEMPLATE, 10))
    with pytest.raises(ConfigError, match="characters the tokenizer does not know"):
        load_prompts(
            cfg.data,
            tok,
            32,
            0,
            teacher_prompts=TeacherPrompts("answer", "{prompt}é{privileged_context}", 99),
        )


def _sample(index: int, text: str, prompt: list[int]) -> Sample:
    completion = list(range(4, 4 + len(text)))
    return Sample(prompt, completion, [-1.0] * len(completion), prompt_index=index, text=text)


def test_feedback_shows_a_correct_sibling_and_leaves_the_others_unscored() -> None:
    tok = build_char_tokenizer()
    cfg = load_config(
        None, ["models.student.path=tiny:test-student", "models.teacher=self", "data.eval_size=4"]
    )
    prompts = load_prompts(cfg.data, tok, 32, 0).train[:2]
    answer = [AdditionTask(seed=0).answer_text(p.answer) for p in prompts]  # "A=85"
    privileged = PrivilegedContext(
        "feedback", TEMPLATE, prompts, None, tok, chat_template=False, max_len=200
    )
    right, wrong = f"x;{answer[0]}", "x;A=0"
    chunk = [
        _sample(0, wrong, prompts[0].ids),
        _sample(0, right, prompts[0].ids),  # the only correct one of prompt 0
        _sample(0, wrong, prompts[0].ids),
        _sample(1, wrong, prompts[1].ids),  # prompt 1: no correct sample at all
        _sample(1, wrong, prompts[1].ids),
    ]
    label = _sample(0, answer[0], prompts[0].ids)
    label.hard_target = True
    privileged.attach([*chunk, label])
    shown = encode_prompt(tok, TEMPLATE.format(prompt=prompts[0].text, privileged_context=right))
    assert chunk[0].teacher_prompt_ids == shown and chunk[2].teacher_prompt_ids == shown
    # the correct sample has no other correct one to be shown: no signal, like its prompt-mates
    # without any (TRL's SDPO: dont_reprompt_on_self_success)
    assert [s.unscored for s in chunk] == [False, True, False, True, True]
    assert [s.asks_teacher for s in chunk] == [True, False, True, False, False]
    assert label.teacher_prompt_ids is None and not label.unscored
    # too long for the teacher's window: no signal either
    short = PrivilegedContext(
        "feedback", TEMPLATE, prompts, None, tok, chat_template=False, max_len=8
    )
    again = [_sample(0, wrong, prompts[0].ids), _sample(0, right, prompts[0].ids)]
    short.attach(again)
    assert again[0].unscored


def test_the_batch_carries_the_teachers_prompts_aligned_with_the_students_targets() -> None:
    samples = [
        Sample([1, 2], [5, 6, 7], [-1.0] * 3, prompt_index=0, teacher_prompt_ids=[1, 2, 9, 9, 9]),
        Sample([3], [8, 9], [-1.0] * 2, prompt_index=1, teacher_prompt_ids=[3, 9]),
        Sample([4, 4, 4], [5], [-1.0], prompt_index=2, unscored=True),
    ]
    scores = [TeacherScore.empty(len(s.completion_ids)) for s in samples]
    batch = training_batch(samples, scores, 0, 0, drop_truncated=False, teacher_inputs=True)
    assert batch.loss_mask.sum(1).tolist() == [3, 2, 0]  # the unscored row leaves the loss
    assert batch.teacher_offset.tolist() == [3, 1, 0]
    ids, attention, (rows, columns) = _teacher_view(batch)
    student_rows, student_columns = batch.loss_mask.nonzero(as_tuple=True)
    # Every loss position predicts the same completion token on both sides.
    torch.testing.assert_close(
        ids[rows, columns + 1], batch.input_ids[student_rows, student_columns + 1]
    )
    assert attention[rows, columns + 1].all()
    # Sliced by rows as the learners split a batch: still aligned, trimmed to its own length.
    part = batch.slice(1, 2)
    ids, _, (rows, columns) = _teacher_view(part)
    assert part.teacher_input_ids.shape == (1, 4)
    assert ids[rows, columns + 1].tolist() == [8, 9]
    # Without teacher prompts, or for teacher actors, nothing more travels.
    plain = training_batch(samples, scores, 0, 0, drop_truncated=False)
    assert plain.teacher_input_ids.numel() == 0 and _teacher_view(plain) is None
