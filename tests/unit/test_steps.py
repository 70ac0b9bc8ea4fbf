"""Reasoning steps of completions: token -> step assignment, the driver's weights and metrics."""

from __future__ import annotations

import math

import pytest
import torch

from rayd.config import load_config
from rayd.models import build_char_tokenizer
from rayd.steps import (
    completion_step_ids,
    step_ids_of_pieces,
    step_metrics,
    step_token_weights,
    weigh_steps,
)
from rayd.tasks import AdditionTask
from rayd.types import Sample, TeacherScore, collate

torch.set_num_threads(1)


def test_character_pieces_split_at_delimiters_and_the_answer() -> None:
    text = "7+8+0=15;4+3+1=8;A=85"
    ids = step_ids_of_pieces(list(text), ";", "A=")
    # "7+8+0=15;" -> 0, "4+3+1=8;" -> 1, "A=85" -> 2: the delimiter ends its step.
    assert ids == [0] * 9 + [1] * 8 + [2] * 4


def test_answer_without_delimiter_before_it_is_its_own_step() -> None:
    ids = step_ids_of_pieces(list("1+2=3;4A=7;8"), ";", "A=")
    # Delimiters inside the answer do not split it; the last marker starts the answer step.
    assert ids == [0] * 6 + [1] + [2] * 5


def test_no_delimiter_is_one_step_and_empty_is_empty() -> None:
    assert step_ids_of_pieces(list("12345"), ";", "A=") == [0] * 5
    assert step_ids_of_pieces(list("12345"), ";", None) == [0] * 5
    assert step_ids_of_pieces([], ";", "A=") == []
    assert step_ids_of_pieces(["A=5"], ";", "A=") == [0]  # the answer alone: one step


def test_multi_character_tokens_and_delimiters() -> None:
    # BPE-like pieces: a token belongs to the step of its first character, so one holding a
    # delimiter's end (" two.\n\nstep") stays with the step it closes, and "\n#### " (which
    # starts before the marker) with the last reasoning step; EOS ("") joins the token before.
    pieces = ["step one", ".\n", "step", " two.\n\nstep", " three", "\n#### ", "42", ""]
    assert step_ids_of_pieces(pieces, ".\n", "####") == [0, 0, 1, 1, 2, 2, 3, 3]
    # Several delimiters inside one token: still consecutive step ids, no gaps.
    assert step_ids_of_pieces(["a;;;", "b;", "c"], ";", None) == [0, 1, 2]
    assert step_ids_of_pieces(["a;", ";;b", "c;", "d"], ";", None) == [0, 1, 2, 3]
    # A delimiter split across two tokens ends its step at the token holding its last char.
    assert step_ids_of_pieces(["x", "<", "/s>", "y"], "</s>", None) == [0, 0, 0, 1]
    with pytest.raises(ValueError, match="non-empty"):
        step_ids_of_pieces(["a"], "", None)


def test_completion_step_ids_with_the_character_tokenizer() -> None:
    tok = build_char_tokenizer()
    example = AdditionTask(digits=3).make(123, 989)
    ids = [*tok(example.completion, add_special_tokens=False).input_ids, tok.eos_token_id]
    steps = completion_step_ids(tok, ids, ";", "A=")
    # "3+9+0=12;" "2+8+1=11;" "1+9+1=11;" "A=1112" + EOS (which joins the answer).
    assert steps == [0] * 9 + [1] * 9 + [2] * 9 + [3] * 7


def _sample(completion: str, tok, *, on_policy=True, hard=False, logprobs=None) -> Sample:
    ids = tok(completion, add_special_tokens=False).input_ids
    return Sample(
        prompt_ids=tok("1+2=", add_special_tokens=False).input_ids,
        completion_ids=ids,
        logprobs=logprobs if logprobs is not None else [0.0] * len(ids),
        prompt_index=0,
        on_policy=on_policy,
        hard_target=hard,
    )


def test_weigh_steps_on_a_collated_batch() -> None:
    tok = build_char_tokenizer()
    # Row 0 (a student sample): steps "1;" and "A=3", behaviour - teacher = 0 on step 0 and
    # ln 3 on each of step 1's three tokens -> shares 1/4, 3/4 of N = 5 -> 5/8, 5/4 per token.
    # Row 1 (a gkd dataset completion): uniform -> 2 steps of 2 and 3 tokens: 5/4, 5/6.
    # Row 2 (the label task): weight 1 on its tokens, no step weighting.
    samples = [
        _sample("1;A=3", tok, logprobs=[-1.0, -1.0] + [math.log(3) - 2.0] * 3),
        _sample("2;A=3", tok, on_policy=False),
        _sample("A=3", tok, on_policy=False, hard=True),
    ]
    scores = [
        TeacherScore(
            torch.tensor([-1.0, -1.0, -2.0, -2.0, -2.0]),
            torch.zeros(5, 2, dtype=torch.long),
            torch.zeros(5, 2),
        ),
        TeacherScore(
            torch.full((5,), -1.0), torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2)
        ),
        TeacherScore.empty(3, k=2),
    ]
    batch = collate(samples, scores, tok.pad_token_id)
    algo = load_config(
        None,
        [
            "models.student.path=s",
            "models.teacher.path=t",
            "algorithm.step_weighting=divergence",
        ],
    ).algorithm
    weights, metrics = weigh_steps(batch, samples, tok, algo, "A=")
    cols = slice(3, 8)  # prompt "1+2=" has 4 tokens: completion targets start at column 3
    torch.testing.assert_close(weights[0, cols], torch.tensor([0.625, 0.625, 1.25, 1.25, 1.25]))
    torch.testing.assert_close(weights[1, cols], torch.tensor([1.25, 1.25, 5 / 6, 5 / 6, 5 / 6]))
    torch.testing.assert_close(weights[2, 3:6], torch.ones(3))
    assert (weights[~batch.loss_mask] == 0).all()
    # Metrics describe the student samples only (row 0).
    assert metrics["steps/count"] == pytest.approx(2.0)
    assert metrics["steps/reverse_kl_first"] == pytest.approx(0.0)
    assert metrics["steps/reverse_kl_last"] == pytest.approx(math.log(3))
    assert metrics["steps/reverse_kl_worst"] == pytest.approx(math.log(3))
    assert metrics["steps/worst_position"] == pytest.approx(1.0)
    assert metrics["steps/max_share"] == pytest.approx(0.75)

    algo = algo.model_copy(update={"step_weighting": "none"})
    with pytest.raises(ValueError, match="uniform or divergence"):
        weigh_steps(batch, samples, tok, algo, "A=")


def test_step_metrics_of_nothing_is_empty() -> None:
    zeros = torch.zeros(2, 3)
    assert step_metrics(zeros.long(), zeros.bool(), zeros, zeros) == {}


def test_label_task_sample_and_step_by_step_samples() -> None:
    from rayd.data.prompts import Prompt
    from rayd.data.samples import label_sample, step_by_step_samples

    tok = build_char_tokenizer()
    enc = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    prompt = Prompt(3, enc("1+2="), None, "3", "1+2+0=3;")
    algo = load_config(
        None,
        [
            "models.student.path=s",
            "models.teacher.path=t",
            "algorithm.label_weight=0.25",
            "trainer.prompts_per_step=4",
        ],
    ).algorithm
    label = label_sample(prompt, algo, tok, AdditionTask(), version=7)
    assert label.prompt_ids == enc("answer: 1+2=")
    assert label.completion_ids == [*enc("A=3"), tok.eos_token_id]
    assert (label.hard_target, label.on_policy, label.weight) == (True, False, 0.25)
    assert (label.prompt_index, label.weight_version) == (3, 7)
    # step_by_step keeps its layout: plain prompt -> answer, prefix + prompt -> rationale.
    answer, rationale = step_by_step_samples(prompt, algo, tok, AdditionTask(), version=7)
    assert (answer.prompt_ids, answer.completion_ids) == (
        enc("1+2="),
        [*enc("A=3"), tok.eos_token_id],
    )
    assert rationale.prompt_ids == enc("why: 1+2=")
    assert rationale.completion_ids == [*enc("1+2+0=3;"), tok.eos_token_id]
    assert not answer.hard_target and rationale.weight == algo.rationale_weight


# ---------------------------------------------------------------------------------------------
# Reasoning-step weights, on a hand-made row: steps [0, 0, 0 | 1 | 2, 2] (n = 3, 1, 2; N = 6).

STEP_IDS = torch.tensor([[0, 0, 0, 1, 2, 2, 7]])  # the last column is masked: any id
STEP_MASK = torch.tensor([[True] * 6 + [False]])


def test_uniform_step_weights_give_each_step_equal_total_weight() -> None:
    w = step_token_weights(STEP_IDS, STEP_MASK, "uniform")
    # Each step gets N / S = 2 in total: 2/3 per token of the 3-token step, 2 for the
    # 1-token step, 1 per token of the 2-token step; the row's mean token weight is 1.
    expected = torch.tensor([[2 / 3, 2 / 3, 2 / 3, 2.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(w, expected)
    assert w.dtype == torch.float32
    assert w[STEP_MASK].mean().item() == pytest.approx(1.0)


def test_divergence_step_weights_follow_softmax_of_step_mean_reverse_kl() -> None:
    # Step means d = (0, ln 2, 0): step 0 averages -1, 0, 1; step 1 is one token of ln 2;
    # step 2 averages 0.5, -0.5. softmax(d / 1) -> shares 1/4, 1/2, 1/4 of N = 6 -> per token
    # 6/4/3, 6/2/1, 6/4/2. The masked column's NaN must not leak.
    kl = torch.tensor([[-1.0, 0.0, 1.0, math.log(2), 0.5, -0.5, float("nan")]])
    w = step_token_weights(STEP_IDS, STEP_MASK, "divergence", kl, temperature=1.0)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 0.5, 3.0, 0.75, 0.75, 0.0]]))
    # Temperature 2 halves the logits: the same shares need d = (0, 2 ln 2, 0).
    w2 = step_token_weights(STEP_IDS, STEP_MASK, "divergence", 2 * kl, temperature=2.0)
    torch.testing.assert_close(w2, w)
    # A very high temperature is uniform; a very low one puts everything on the worst step.
    hot = step_token_weights(STEP_IDS, STEP_MASK, "divergence", kl, temperature=1e6)
    torch.testing.assert_close(hot, step_token_weights(STEP_IDS, STEP_MASK, "uniform"))
    cold = step_token_weights(STEP_IDS, STEP_MASK, "divergence", kl, temperature=1e-3)
    torch.testing.assert_close(cold, torch.tensor([[0.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0]]))


def test_step_weights_masking_single_step_and_empty_rows() -> None:
    ids = torch.tensor([[0, 0, 0, 0], [0, 0, 3, 3], [5, 5, 5, 5]])  # row 1 skips ids 1 and 2
    mask = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    kl = torch.tensor([[9.0, -9.0, 1.0, float("inf")], [0.0, 0.0, 0.0, 0.0], [float("nan")] * 4])
    for mode in ("uniform", "divergence"):
        w = step_token_weights(ids, mask, mode, kl)
        assert torch.isfinite(w).all()
        # One step (no delimiter): every token weighs 1 whatever its reverse KL.
        torch.testing.assert_close(w[0], torch.tensor([1.0, 1.0, 1.0, 0.0]))
        # Skipped ids are empty steps: they take no share. Two steps of 2 tokens: all 1.
        torch.testing.assert_close(w[1], torch.ones(4))
        # An empty completion: zeros, no NaN.
        assert (w[2] == 0).all()
    empty = step_token_weights(
        torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0, dtype=torch.bool), "uniform"
    )
    assert empty.shape == (0, 0)


def test_step_weights_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="needs the per-token reverse_kl"):
        step_token_weights(STEP_IDS, STEP_MASK, "divergence")
    with pytest.raises(ValueError, match="temperature"):
        step_token_weights(STEP_IDS, STEP_MASK, "divergence", torch.zeros(1, 7), temperature=0.0)
    with pytest.raises(ValueError, match="'uniform' or 'divergence'"):
        step_token_weights(STEP_IDS, STEP_MASK, "none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        step_token_weights(-STEP_IDS, STEP_MASK, "uniform")
