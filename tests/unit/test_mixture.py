"""The several-teachers maths (rayd/mixture.py) on hand-made distributions."""

import math
from collections import Counter

import pytest
import torch

from rayd.losses import _topk_bins
from rayd.mixture import hash_route, mix_logprobs, mix_scores, mix_topk, normalised
from rayd.types import TeacherScore

V = 6
# Two teachers' full distributions at two positions over a 6-token vocabulary.
# No ties among the top-2s or in the mixtures, so every order below is unambiguous.
P1 = torch.tensor([[0.50, 0.20, 0.10, 0.10, 0.05, 0.05], [0.05, 0.05, 0.60, 0.12, 0.10, 0.08]])
P2 = torch.tensor([[0.12, 0.60, 0.05, 0.05, 0.10, 0.08], [0.35, 0.25, 0.10, 0.10, 0.10, 0.10]])


def topk(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = p.log().topk(k, dim=-1)
    return top.indices, top.values


def at(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return p.log().gather(-1, ids)


def distinct_sum(ids: torch.Tensor, lps: torch.Tensor) -> torch.Tensor:
    """Sum of probabilities over each row's distinct ids (a repeated id counted once)."""
    out = []
    for row_ids, row_lps in zip(ids.tolist(), lps.exp().tolist(), strict=True):
        out.append(sum(dict(zip(row_ids, row_lps, strict=True)).values()))
    return torch.tensor(out)


def test_weights_are_normalised_and_must_be_positive():
    assert normalised([3, 1]) == [0.75, 0.25]
    with pytest.raises(ValueError, match="must be > 0"):
        normalised([1.0, 0.0])


def test_sampled_token_logprob_is_the_log_of_the_mixture():
    token = torch.tensor([[0], [2]])
    got = mix_logprobs([at(P1, token)[:, 0], at(P2, token)[:, 0]], [3.0, 1.0])
    want = torch.tensor([math.log(0.75 * 0.50 + 0.25 * 0.12), math.log(0.75 * 0.60 + 0.25 * 0.10)])
    torch.testing.assert_close(got, want)


def test_exact_mixture_over_the_union_of_supports():
    """Every teacher scored every id of the union (the hf path): p_ens = sum_i w_i p_i there,
    sorted descending, the distinct ids first, the tail 1 - their sum."""
    (ids1, _), (ids2, _) = topk(P1, 2), topk(P2, 2)
    union = torch.cat([ids1, ids2], dim=-1)  # position 0: ids {0, 1} twice
    ids, lps = mix_topk([union, union], [at(P1, union), at(P2, union)], [0.7, 0.3], V, union)
    assert ids.shape == lps.shape == (2, 4)
    mix = 0.7 * P1 + 0.3 * P2
    for row in range(2):
        distinct = sorted(set(union[row].tolist()), key=lambda i: -float(mix[row, i]))
        n = len(distinct)
        assert ids[row, :n].tolist() == distinct
        torch.testing.assert_close(lps[row, :n], mix[row, distinct].log())
        # the rest repeats the least likely distinct entry (an empty bin for the losses)
        assert ids[row, n:].tolist() == [distinct[-1]] * (4 - n)
        torch.testing.assert_close(lps[row, n:], mix[row, [distinct[-1]] * (4 - n)].log())
    assert bool((lps[:, 1:] <= lps[:, :-1]).all())
    # position 0: union {0, 1}: tail = 1 - (0.7*0.5+0.3*0.12) - (0.7*0.2+0.3*0.6) = 0.294
    torch.testing.assert_close(1 - distinct_sum(ids, lps)[0], torch.tensor(0.294))


def test_missing_ids_get_the_teachers_tail_spread_evenly():
    """vLLM: each teacher knows only its own top-2; an id outside it gets (1 - top-2 mass) / 4."""
    (ids1, lp1), (ids2, lp2) = topk(P1, 2), topk(P2, 2)
    ids, lps = mix_topk([ids1, ids2], [lp1, lp2], [1.0, 1.0], V)
    # position 1: teacher 1's top-2 = {2: 0.6, 3: 0.12}, tail 0.28 over 4 ids; teacher 2's =
    # {0: 0.35, 1: 0.25}, tail 0.4 over 4 ids. So p_ens(2) = 0.5 * 0.6 + 0.5 * 0.1, etc.
    t1 = {int(i): float(p) for i, p in zip(ids1[1], lp1[1].exp(), strict=True)}
    t2 = {int(i): float(p) for i, p in zip(ids2[1], lp2[1].exp(), strict=True)}
    tail1, tail2 = (1 - sum(t1.values())) / (V - 2), (1 - sum(t2.values())) / (V - 2)
    want = {i: 0.5 * t1.get(i, tail1) + 0.5 * t2.get(i, tail2) for i in set(t1) | set(t2)}
    got = {int(i): float(p) for i, p in zip(ids[1], lps[1].exp(), strict=True)}
    assert got == pytest.approx(want)
    assert want[2] == pytest.approx(0.5 * 0.6 + 0.5 * 0.1)
    # Each teacher stays a sub-distribution over the union: the ensemble's tail is >= 0.
    assert float(distinct_sum(ids, lps).max()) <= 1.0


def test_same_support_is_exact_and_the_losses_read_the_right_bins():
    """teacher.support=student_topk: both teachers scored the same 3 ids (one with a repeat);
    _topk_bins turns the mixture into p_ens at the ids, an empty bin for the copy, the tail."""
    ids0 = torch.tensor([[4, 0, 1], [2, 5, 5]])
    scores = [TeacherScore(at(p, ids0[:, :1])[:, 0], ids0, at(p, ids0)) for p in (P1, P2)]
    mixed = mix_scores(scores, [0.25, 0.75], V, support=ids0)
    assert mixed.topk_ids.shape == (2, 3)
    mix = 0.25 * P1 + 0.75 * P2
    torch.testing.assert_close(mixed.token_logprobs, mix.gather(-1, ids0[:, :1])[:, 0].log())
    logits = torch.randn(1, 2, V)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, log_t = _topk_bins(
        logits, mixed.topk_ids[None], mixed.topk_logprobs[None], mask, tail=True, temperature=1
    )
    bins = log_t[0].exp()
    for row, n in ((0, 3), (1, 2)):
        distinct = sorted(set(ids0[row].tolist()), key=lambda i: -float(mix[row, i]))
        assert mixed.topk_ids[row, :n].tolist() == distinct
        torch.testing.assert_close(bins[row, :n], mix[row, distinct])
        torch.testing.assert_close(bins[row, n:3], torch.zeros(3 - n))  # a copy: empty bin
        torch.testing.assert_close(bins[row, 3], 1 - mix[row, distinct].sum())


def test_hash_routing_is_fixed_and_follows_the_weights():
    weights = [0.7, 0.3]
    routes = [hash_route(i, weights) for i in range(4000)]
    assert routes == [hash_route(i, weights) for i in range(4000)]  # deterministic
    share = Counter(routes)[0] / len(routes)
    assert abs(share - 0.7) < 0.03, share
    assert {hash_route(i, [1, 1, 1]) for i in range(100)} == {0, 1, 2}
