"""rayd's training losses (`batch_loss`, the one entry point the learners call) against the
oracles of tests/reference_losses.py, hand-computed numbers, masking and gradients."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from rayd.config import FULL_VOCAB_LOSSES, TOPK_LOSSES, AlgorithmConfig, AlgorithmName
from rayd.losses import (
    LOSSES,
    LossKind,
    LossSpec,
    _topk_bins,
    batch_loss,
    feature_loss,
    sequence_reward_pg,
    stale_importance_weight,
    token_logprobs,
    token_reverse_kl_pg,
)
from rayd.types import Sample, TeacherScore, TrainBatch, collate

import reference_losses as ref

# The machine is shared: one thread keeps these small tensors fast and the neighbours happy.
torch.set_num_threads(1)

B, T, V = 2, 3, 6
LN = math.log


def _logits(seed: int, shape: tuple[int, ...] = (B, T, V), scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


def _mask() -> torch.Tensor:
    return torch.tensor([[True, True, False], [False, True, True]])


def _loss_batch(
    mask: torch.Tensor,
    targets: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    logprobs: torch.Tensor | None = None,
) -> TrainBatch:
    """A TrainBatch whose targets, top-k ids and log-probs are the given [B, T] / [B, T, k]
    tensors (zeros where not given), aligned so that `batch_loss` reads them at [B, T]."""
    b, t = mask.shape
    targets = torch.zeros(b, t, dtype=torch.long) if targets is None else targets
    input_ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), targets], dim=1)
    ids = torch.zeros(b, t, 1, dtype=torch.long) if ids is None else ids
    logprobs = torch.zeros(b, t, 1) if logprobs is None else logprobs
    zeros = torch.zeros(b, t)
    return TrainBatch(input_ids, torch.ones_like(input_ids), mask, zeros, zeros, ids, logprobs)


def full_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    **knobs,
) -> torch.Tensor:
    """rayd's per-token loss `kind` over the whole vocabulary (teacher.support=full)."""
    spec = LossSpec(kind, temperature=temperature, full_vocab=True, **knobs)  # type: ignore[arg-type]
    batch = _loss_batch(mask, targets)
    return batch_loss(student_logits, batch, spec, teacher_logits=teacher_logits)[0]


def topk_loss(
    kind: str,
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    tail: bool = True,
    temperature: float = 1.0,
    targets: torch.Tensor | None = None,
    **knobs,
) -> torch.Tensor:
    """rayd's per-token loss `kind` over the bins of the teacher's top-k `ids` (+ tail)."""
    spec = LossSpec(kind, tail=tail, temperature=temperature, **knobs)  # type: ignore[arg-type]
    batch = _loss_batch(mask, targets, ids, logprobs)
    return batch_loss(student_logits, batch, spec)[0]


def sft_loss(student_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """rayd's cross-entropy (algorithm sft) per token."""
    return batch_loss(student_logits, _loss_batch(mask, targets), LossSpec("sft"))[0]


def _ref_kl(p: torch.Tensor, q: torch.Tensor) -> float:
    """KL(p || q) of two probability vectors with plain sums."""
    return float(
        sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist(), strict=True) if pi > 0)
    )


def _per_position(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """Apply fn(row_0, row_1, ...) to each [b, t] position: the loop-based reference."""
    out = torch.zeros(tensors[0].shape[:2], dtype=torch.float64)
    for b in range(out.shape[0]):
        for t in range(out.shape[1]):
            out[b, t] = fn(*(x[b, t] for x in tensors))
    return out


def _ref_jsd(s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float) -> float:
    # TRL's generalized JSD written out with probabilities: m = beta * p_T + (1 - beta) * p_S.
    p_s, p_t = s_logits.softmax(-1), t_logits.softmax(-1)
    if beta == 0:
        return _ref_kl(p_t, p_s)
    if beta == 1:
        return _ref_kl(p_s, p_t)
    m = beta * p_t + (1 - beta) * p_s
    return beta * _ref_kl(p_t, m) + (1 - beta) * _ref_kl(p_s, m)


# ---------------------------------------------------------------------------------------------
# Hand-computed example: 2 tokens, V = 2


def _two_token_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Token 0: p_S = [0.5, 0.5], p_T = [0.75, 0.25]. Token 1: the two swapped.
    student = torch.tensor([[[0.0, 0.0], [LN(3.0), 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[LN(3.0), 0.0], [0.0, 0.0]]], dtype=torch.float64)
    return student, teacher, torch.ones(1, 2, dtype=torch.bool)


def test_hand_computed_two_tokens() -> None:
    s, t, m = _two_token_example()
    # forward, token 0: 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.130812
    # reverse, token 0: 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25) = 0.143841 (token 1: swapped)
    assert full_loss("forward_kl", s, t, m)[0].tolist() == pytest.approx(
        [0.130812, 0.143841], abs=1e-6
    )
    assert full_loss("reverse_kl", s, t, m)[0].tolist() == pytest.approx(
        [0.143841, 0.130812], abs=1e-6
    )
    # m = [0.625, 0.375]: 0.5 * (KL(T||m) + KL(S||m)) = 0.5 * (0.035375 + 0.032269)
    assert full_loss("jsd", s, t, m, beta=0.5)[0, 0].item() == pytest.approx(0.033822, abs=1e-6)
    assert full_loss("jsd", s, t, m, beta=0.25)[0, 0].item() == pytest.approx(0.024870, abs=1e-6)
    # tvd and the skew KLs have no full-vocabulary form: bins over both tokens, no tail.
    lp, ids = t.log_softmax(-1).sort(dim=-1, descending=True)
    tvd = topk_loss("tvd", s, ids, lp, m, tail=False)
    assert tvd[0].tolist() == pytest.approx([0.25, 0.25], abs=1e-9)
    # KL(p_T || 0.1 p_T + 0.9 p_S), m = [0.525, 0.475]
    skew = topk_loss("skew_kl", s, ids, lp, m, tail=False, skew=0.1)
    assert skew[0, 0].item() == pytest.approx(0.107043, abs=1e-6)
    # Cross-entropy of target 0 under p_S: ln 2, then ln(4/3).
    ce = sft_loss(s, torch.tensor([[0, 0]]), m)
    assert ce[0].tolist() == pytest.approx([LN(2.0), LN(4.0 / 3.0)], abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Full-vocabulary losses against loop references


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_full_vocab_against_references(temperature: float) -> None:
    s, t, mask = _logits(0), _logits(1), _mask()
    st, tt = s / temperature, t / temperature

    def cat_kl(a, b):
        return kl_divergence(Categorical(logits=a), Categorical(logits=b))

    want_fkl = _per_position(lambda a, b: cat_kl(b, a), st, tt) * mask
    want_rkl = _per_position(cat_kl, st, tt) * mask
    want_tvd = _per_position(lambda a, b: 0.5 * (a.softmax(-1) - b.softmax(-1)).abs().sum(), st, tt)
    torch.testing.assert_close(full_loss("forward_kl", s, t, mask, temperature), want_fkl)
    torch.testing.assert_close(full_loss("reverse_kl", s, t, mask, temperature), want_rkl)
    # The bins-only divergences over every token, without a tail: the full distributions.
    lp, ids = t.log_softmax(-1).sort(dim=-1, descending=True)
    got = topk_loss("tvd", s, ids, lp, mask, tail=False, temperature=temperature)
    torch.testing.assert_close(got, want_tvd * mask)
    for beta in (0.1, 0.5, 0.9):
        want = _per_position(lambda a, b, beta=beta: _ref_jsd(a, b, beta), st, tt) * mask
        torch.testing.assert_close(full_loss("jsd", s, t, mask, temperature, beta=beta), want)
    for alpha in (0.0, 0.1, 0.5):

        def skl(a, b, alpha=alpha):
            p_s, p_t = a.softmax(-1), b.softmax(-1)
            return _ref_kl(p_t, alpha * p_t + (1 - alpha) * p_s)

        def srkl(a, b, alpha=alpha):
            p_s, p_t = a.softmax(-1), b.softmax(-1)
            return _ref_kl(p_s, alpha * p_s + (1 - alpha) * p_t)

        bins = dict(tail=False, temperature=temperature, skew=alpha)
        got = topk_loss("skew_kl", s, ids, lp, mask, **bins)
        torch.testing.assert_close(got, _per_position(skl, st, tt) * mask)
        got = topk_loss("skew_reverse_kl", s, ids, lp, mask, **bins)
        torch.testing.assert_close(got, _per_position(srkl, st, tt) * mask)


def test_full_vocab_gradients_match_reference() -> None:
    mask = _mask()
    s = _logits(2).requires_grad_(True)
    t = _logits(3)
    full_loss("jsd", s, t, mask, beta=0.3).sum().backward()
    got = s.grad.clone()
    s.grad = None
    p_s, p_t = s.softmax(-1), t.softmax(-1)
    m = 0.3 * p_t + 0.7 * p_s
    ref = 0.3 * (p_t * (p_t / m).log()).sum(-1) + 0.7 * (p_s * (p_s / m).log()).sum(-1)
    (ref * mask).sum().backward()
    torch.testing.assert_close(got, s.grad)
    assert got[0, 2].abs().max() == 0 and got[1, 0].abs().max() == 0


def test_jsd_beta_limits() -> None:
    s, t, mask = _logits(4), _logits(5), _mask()
    forward, reverse = full_loss("forward_kl", s, t, mask), full_loss("reverse_kl", s, t, mask)
    torch.testing.assert_close(full_loss("jsd", s, t, mask, beta=0.0), forward)
    torch.testing.assert_close(full_loss("jsd", s, t, mask, beta=1.0), reverse)
    torch.testing.assert_close(ref.full_vocab("jsd", s, t, mask, beta=0.0), forward)
    # The interior of TRL's formula goes to 0 at both ends: the ends really are special cases.
    assert full_loss("jsd", s, t, mask, beta=1e-6).abs().max() < 1e-4
    lp, ids = t.log_softmax(-1).sort(dim=-1, descending=True)
    assert topk_loss("jsd", s, ids, lp, mask, tail=False, beta=1e-6).abs().max() < 1e-4
    with pytest.raises(ValueError, match="beta"):
        full_loss("jsd", s, t, mask, beta=1.5)


def test_teacher_zero_probability_tokens() -> None:
    # A teacher that rules tokens out (-inf logits, or -inf top-k log-probs) inside the mask:
    # those bins contribute 0 to KL(p_T || .), with finite gradients.
    mask = _mask()
    s = _logits(24).requires_grad_(True)
    t = _logits(25)
    t[..., 1] = float("-inf")
    got = full_loss("forward_kl", s, t, mask)
    p_t = t.softmax(-1)
    want = _per_position(lambda a, b: _ref_kl(b.softmax(-1), a.softmax(-1)), s.detach(), t)
    torch.testing.assert_close(got, want * mask)
    (grad,) = torch.autograd.grad(got.sum(), s)
    # d KL(p_T || softmax(s)) / ds = softmax(s) - p_T
    torch.testing.assert_close(grad, (s.detach().softmax(-1) - p_t) * mask.unsqueeze(-1))
    lp, ids = t.log_softmax(-1).sort(dim=-1, descending=True)
    got = topk_loss("forward_kl", s, ids, lp, mask, tail=False)
    torch.testing.assert_close(got, want * mask)
    (grad,) = torch.autograd.grad(got.sum(), s)
    assert torch.isfinite(grad).all()


def test_temperature_scales_both_sides() -> None:
    s, t, mask = _logits(6), _logits(7), _mask()
    hot = full_loss("forward_kl", s, t, mask, 3.0)
    torch.testing.assert_close(hot, full_loss("forward_kl", s / 3, t / 3, mask))
    assert not torch.allclose(hot, full_loss("forward_kl", s, t, mask))


def test_hinton_kd() -> None:
    s, t, mask = _logits(8), _logits(9), _mask()
    targets = torch.tensor([[1, 4, 0], [2, 5, 3]])
    got = full_loss("logit_kd", s, t, mask, 2.0, targets, alpha=0.7)
    ce = F.cross_entropy(s.reshape(-1, V), targets.reshape(-1), reduction="none").view(B, T)
    kl = _per_position(
        lambda a, b: kl_divergence(Categorical(logits=b), Categorical(logits=a)), s / 2, t / 2
    )
    torch.testing.assert_close(got, (0.7 * 4.0 * kl + 0.3 * ce) * mask)


def test_cross_entropy_and_token_logprobs() -> None:
    s, mask = _logits(10), _mask()
    targets = torch.tensor([[1, 4, -100], [-100, 5, 3]])  # -100 at masked positions is tolerated
    safe = targets.clamp(min=0)
    want = F.cross_entropy(s.reshape(-1, V), safe.reshape(-1), reduction="none").view(B, T) * mask
    torch.testing.assert_close(sft_loss(s, targets, mask), want)
    torch.testing.assert_close(ref.cross_entropy(s, targets, mask), want)
    full = s.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(s, safe), full)


# ---------------------------------------------------------------------------------------------
# Masking: garbage never leaks


def _poison(x: torch.Tensor, mask: torch.Tensor, values: list[float]) -> torch.Tensor:
    x = x.clone()
    for i, (b, t) in enumerate((~mask).nonzero().tolist()):
        x[b, t] = values[i % len(values)]
    return x


def _all_losses(s, t, ids, lp, targets, mask):
    """Every training loss on the same inputs, and the two pieces the table builds on."""
    torch.manual_seed(0)  # the same projection on every call
    proj = torch.nn.Linear(V, 4, dtype=torch.float64)
    return {
        "forward_kl": full_loss("forward_kl", s, t, mask, 2.0),
        "reverse_kl": full_loss("reverse_kl", s, t, mask),
        "jsd": full_loss("jsd", s, t, mask, beta=0.4),
        "tvd": topk_loss("tvd", s, ids, lp, mask),
        "skew": topk_loss("skew_kl", s, ids, lp, mask, skew=0.1),
        "skew_r": topk_loss("skew_reverse_kl", s, ids, lp, mask, skew=0.1),
        "topk_f": topk_loss("forward_kl", s, ids, lp, mask),
        "topk_r": topk_loss("reverse_kl", s, ids, lp, mask, tail=False, temperature=2.0),
        "topk_j": topk_loss("jsd", s, ids, lp, mask, beta=0.5),
        "ce": sft_loss(s, targets, mask),
        "hinton": full_loss("logit_kd", s, t, mask, 2.0, targets),
        "logit_kd": topk_loss("logit_kd", s, ids, lp, mask, targets=targets),
        "feat": feature_loss(s, t[..., :4], proj, mask, "mse"),
        "feat_cos": feature_loss(s, t[..., :4], proj, mask, "cosine"),
        "pg": token_reverse_kl_pg(token_logprobs(s, targets, mask), lp[..., 0], lp[..., 1], mask),
        "pg_clip": token_reverse_kl_pg(
            token_logprobs(s, targets, mask), lp[..., 0], lp[..., 1], mask, is_clip=1.5
        ),
    }


def _clean_inputs():
    s, t = _logits(11), _logits(12)
    ids = torch.tensor([[[0, 3, 5]] * T, [[2, 1, 4]] * T])
    lp = _logits(13, (B, T, 3)).log_softmax(-1) - 0.3  # top-3 mass exp(-0.3) = 0.74
    targets = torch.tensor([[1, 4, 0], [2, 5, 3]])
    return s, t, ids, lp, targets


def test_masked_positions_change_nothing() -> None:
    mask = _mask()
    s, t, ids, lp, targets = _clean_inputs()
    clean = _all_losses(s.requires_grad_(True), t, ids, lp, targets, mask)
    clean_grads = {k: torch.autograd.grad(v.sum(), s)[0] for k, v in clean.items()}

    bad = [float("nan"), float("-inf"), float("inf"), 1e30]
    s2 = _poison(s.detach(), mask, bad).requires_grad_(True)
    t2 = _poison(t, mask, bad)
    ids2 = _poison(ids, mask, [-1, 10**6])
    lp2 = _poison(lp, mask, bad)
    targets2 = _poison(targets, mask, [-100, 10**6])
    dirty = _all_losses(s2, t2, ids2, lp2, targets2, mask)
    for name, value in dirty.items():
        assert torch.isfinite(value).all(), name
        assert (value[~mask] == 0).all(), name
        torch.testing.assert_close(value, clean[name], msg=name)
        (grad,) = torch.autograd.grad(value.sum(), s2)
        assert torch.isfinite(grad).all(), name
        assert (grad[~mask] == 0).all(), name
        torch.testing.assert_close(grad, clean_grads[name], msg=name)


def test_topk_bins_are_finite_at_masked_positions() -> None:
    # Defence in depth: the bins themselves hold no NaN/inf at masked positions, so nothing
    # downstream (anomaly detection, a future reduction) can trip over them.
    mask = _mask()
    s, _, ids, lp, _ = _clean_inputs()
    bad = [float("nan"), float("-inf"), float("inf")]
    for tail in (True, False):
        log_s, log_t = _topk_bins(
            _poison(s, mask, bad), _poison(ids, mask, [-1]), _poison(lp, mask, bad), mask, tail, 1.0
        )
        assert torch.isfinite(log_s).all() and torch.isfinite(log_t).all()
        assert log_t.shape[-1] == 3 + tail
        torch.testing.assert_close(log_t.exp().sum(-1), torch.ones(B, T, dtype=torch.float64))


def test_all_masked_gives_zero_and_finite_grads() -> None:
    mask = torch.zeros(B, T, dtype=torch.bool)
    s, t, ids, lp, targets = _clean_inputs()
    s = s.requires_grad_(True)
    for name, value in _all_losses(s, t, ids, lp, targets, mask).items():
        total = value.sum()
        assert total.item() == 0.0, name
        (grad,) = torch.autograd.grad(total, s)
        assert torch.isfinite(grad).all() and (grad == 0).all(), name


# ---------------------------------------------------------------------------------------------
# Sparse top-k


def test_topk_full_width_without_tail_equals_full_vocab() -> None:
    s, t, mask = _logits(14), _logits(15), _mask()
    # Teacher top-k = all V tokens in descending order, as vLLM would send them.
    lp, ids = t.log_softmax(-1).sort(dim=-1, descending=True)
    for temperature in (1.0, 2.0):
        for kind, knobs in (("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3})):
            got = topk_loss(kind, s, ids, lp, mask, tail=False, temperature=temperature, **knobs)
            torch.testing.assert_close(got, full_loss(kind, s, t, mask, temperature, **knobs))
            torch.testing.assert_close(got, ref.full_vocab(kind, s, t, mask, temperature, **knobs))
    # With the tail bin the (empty) tail is a clamped speck of mass: still equal to ~1e-6.
    for kind in ("forward_kl", "reverse_kl"):
        torch.testing.assert_close(
            topk_loss(kind, s, ids, lp, mask, tail=True),
            full_loss(kind, s, t, mask),
            atol=1e-6,
            rtol=0,
        )


def _tail_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # Student softmax [0.4, 0.1, 0.4, 0.1]; teacher top-2 = tokens 2 and 0 with p 0.5 and 0.3.
    s = torch.tensor([[[LN(0.4), LN(0.1), LN(0.4), LN(0.1)]]], dtype=torch.float64) + 1.7
    ids = torch.tensor([[[2, 0]]])
    lp = torch.tensor([[[LN(0.5), LN(0.3)]]], dtype=torch.float64)
    return s, ids, lp, torch.ones(1, 1, dtype=torch.bool)


def test_tail_bin_hand_example() -> None:
    s, ids, lp, m = _tail_example()
    # Bins: teacher [0.5, 0.3, tail 0.2], student [0.4, 0.4, tail 0.2].
    # 0.5 ln(0.5/0.4) + 0.3 ln(0.3/0.4) + 0.2 ln(0.2/0.2) = 0.025267
    for fn in (topk_loss, ref.topk):
        assert fn("forward_kl", s, ids, lp, m, tail=True).item() == pytest.approx(
            0.025267, abs=1e-6
        )
        assert fn("reverse_kl", s, ids, lp, m, tail=True).item() == pytest.approx(
            0.025815, abs=1e-6
        )
        # Without the tail both renormalise within k: [0.625, 0.375] vs [0.5, 0.5].
        got = fn("forward_kl", s, ids, lp, m, tail=False).item()
        assert got == pytest.approx(0.031584, abs=1e-6)
    want = 0.5 * _ref_kl(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.45, 0.35, 0.2])) + 0.5 * (
        _ref_kl(torch.tensor([0.4, 0.4, 0.2]), torch.tensor([0.45, 0.35, 0.2]))
    )
    assert topk_loss("jsd", s, ids, lp, m, beta=0.5).item() == pytest.approx(want, abs=1e-6)


def test_tail_gradient_flows_through_student_logsumexp() -> None:
    s, ids, lp, m = _tail_example()
    s = s.requires_grad_(True)
    topk_loss("forward_kl", s, ids, lp, m, tail=True).sum().backward()
    # Reference: the same bins built from a full softmax.
    s_ref = s.detach().clone().requires_grad_(True)
    p = s_ref.softmax(-1)[0, 0]
    q = torch.stack([p[2], p[0], 1 - p[2] - p[0]])
    pt = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    (pt * (pt.log() - q.log())).sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad)
    assert s.grad[0, 0, 1].item() != 0  # tokens outside the top-k are pulled via the tail


def test_topk_teacher_mass_near_one_stays_finite() -> None:
    # Rounding can push the teacher's top-k sum to 1 or just past it: no NaN, no -inf.
    s = _logits(16, (1, 1, V)).requires_grad_(True)
    ids = torch.tensor([[[0, 1]]])
    lp = torch.tensor([[[LN(0.7), LN(0.3) + 1e-6]]], dtype=torch.float64)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        value = topk_loss(kind, s, ids, lp, torch.ones(1, 1, dtype=torch.bool))
        (grad,) = torch.autograd.grad(value.sum(), s)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_topk_temperature_rules() -> None:
    s, ids, lp, m = _tail_example()
    with pytest.raises(ValueError, match=r"tail=True needs temperature 1\.0"):
        topk_loss("forward_kl", s, ids, lp, m, tail=True, temperature=2.0)
    with pytest.raises(ValueError, match=r"tail=True needs temperature 1\.0"):
        LossSpec("forward_kl", temperature=2.0)
    LossSpec("forward_kl", temperature=2.0, tail=False)
    LossSpec("on_policy_pg", temperature=2.0)  # tail is irrelevant there
    # tail=False re-tempers within the k bins: p^(1/t) renormalised on both sides.
    pt = torch.tensor([0.5, 0.3]) ** 0.5
    ps = torch.tensor([0.4, 0.4]) ** 0.5
    want = _ref_kl(pt / pt.sum(), ps / ps.sum())
    got = topk_loss("forward_kl", s, ids, lp, m, tail=False, temperature=2.0).item()
    assert got == pytest.approx(want, abs=1e-6)


def test_topk_ids_outside_student_vocab_raise() -> None:
    s, _, lp, m = _tail_example()
    with pytest.raises(ValueError, match="share a tokenizer"):
        topk_loss("forward_kl", s, torch.tensor([[[2, 7]]]), lp, m)


# ---------------------------------------------------------------------------------------------
# Student-top-k support (teacher.support=student_topk / union): the ids are the student's


def _student_support(s: torch.Tensor, t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's top-k ids (its own order) and the teacher's exact log-probs at them."""
    ids = s.topk(k, dim=-1).indices
    return ids, t.log_softmax(-1).gather(-1, ids)


def test_student_support_reverse_kl_is_exact_at_full_width() -> None:
    s, t, mask = _logits(40), _logits(41), _mask()
    ids, lp = _student_support(s, t, V)
    # The teacher's mass over the chosen ids is 1: the tail is a clamped speck, not NaN.
    got = topk_loss("reverse_kl", s, ids, lp, mask, tail=True)
    torch.testing.assert_close(got, ref.full_vocab("reverse_kl", s, t, mask), atol=1e-6, rtol=0)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        x = s.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(topk_loss(kind, x, ids, lp, mask).sum(), x)
        assert torch.isfinite(grad).all()


def test_student_support_reverse_kl_approaches_the_exact_value_from_below() -> None:
    # Bins = the student's top-k + a tail. Top-(k+1) splits one token off the tail of top-k, a
    # finer partition, so the binned KL never falls as k grows (data processing inequality) and
    # reaches the full-vocabulary value at k = V.
    s, t = _logits(42, (4, 8, 32)), _logits(43, (4, 8, 32))
    mask = torch.ones(4, 8, dtype=torch.bool)
    exact = ref.full_vocab("reverse_kl", s, t, mask)
    previous = torch.zeros_like(exact)
    for k in (1, 2, 4, 8, 16, 32):
        ids, lp = _student_support(s, t, k)
        got = topk_loss("reverse_kl", s, ids, lp, mask, tail=True)
        assert (got >= previous - 1e-9).all() and (got <= exact + 1e-6).all()
        previous = got
    torch.testing.assert_close(previous, exact, atol=1e-6, rtol=0)
    # Where the student's mass is concentrated, a few of its tokens already give most of it.
    ids, lp = _student_support(s, t, 8)
    assert topk_loss("reverse_kl", s, ids, lp, mask).mean() > 0.8 * exact.mean()


def test_support_order_and_repeated_ids_do_not_matter() -> None:
    s, t, mask = _logits(44), _logits(45), _mask()
    ids, lp = _student_support(s, t, 3)
    # The same support shuffled, and padded with repeats of its own ids (a union of two lists
    # may name a token twice): every divergence and its gradient are unchanged.
    perm = torch.tensor([2, 0, 1])
    shuffled = ids[..., perm], lp[..., perm]
    repeat = torch.tensor([0, 1, 2, 0, 2])
    repeated = ids[..., repeat], lp[..., repeat]
    for tail, temperature in ((True, 1.0), (False, 1.0), (False, 2.0)):
        for name, knobs in (("forward_kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3})):
            x = s.clone().requires_grad_(True)
            want = topk_loss(name, x, ids, lp, mask, tail, temperature, **knobs)
            (want_grad,) = torch.autograd.grad(want.sum(), x)
            for variant in (shuffled, repeated):
                x = s.clone().requires_grad_(True)
                got = topk_loss(name, x, *variant, mask, tail, temperature, **knobs)
                (grad,) = torch.autograd.grad(got.sum(), x)
                torch.testing.assert_close(got, want, msg=f"{name} tail={tail}")
                torch.testing.assert_close(grad, want_grad, msg=f"{name} tail={tail}")
    # Bins of repeated ids are empty on both sides, so the distributions still sum to 1.
    log_s, log_t = _topk_bins(s, *repeated, mask, True, 1.0)
    torch.testing.assert_close(
        log_s.exp().sum(-1)[mask], torch.ones(int(mask.sum()), dtype=s.dtype)
    )
    torch.testing.assert_close(
        log_t.exp().sum(-1)[mask], torch.ones(int(mask.sum()), dtype=s.dtype)
    )


def test_batch_loss_over_a_union_support() -> None:
    # teacher.support=union: the student's top-2 plus the teacher's top-2 among the other ids,
    # sorted by the teacher's log-prob, as HFScorer.score_ids builds it.
    s, t = _logits(46, (1, 4, V)), _logits(47, (1, 4, V))
    student_ids = s[0].topk(2, dim=-1).indices
    logp = t[0].log_softmax(-1)
    others = logp.scatter(-1, student_ids, float("-inf")).topk(2, dim=-1).indices
    support = torch.cat([student_ids, others], -1)
    lp, order = logp.gather(-1, support).sort(-1, descending=True)
    score = TeacherScore(logp[:, 0].float(), support.gather(-1, order), lp.float())
    sample = Sample([1], [0, 0, 0, 0], [-1.0] * 4, prompt_index=0)
    batch = collate([sample], [score], pad_id=0)
    logits = s.float()  # [1, L-1 = 4, V]: prompt of 1 token, completion of 4
    loss, _ = batch_loss(logits, batch, LossSpec("reverse_kl"))
    want = ref.topk(
        "reverse_kl",
        logits,
        support[None].gather(-1, order[None]),
        lp[None].float(),
        batch.loss_mask,
    )
    torch.testing.assert_close(loss, want)
    # Four distinct ids hold the student's top-2 and more: at least as close to the exact value.
    exact = ref.full_vocab("reverse_kl", logits.double(), t, batch.loss_mask)
    ids_s, lp_s = _student_support(logits.double(), t, 2)
    alone = topk_loss("reverse_kl", logits.double(), ids_s, lp_s, batch.loss_mask)
    assert (alone <= loss.double() + 1e-6).all() and (loss.double() <= exact + 1e-5).all()


# ---------------------------------------------------------------------------------------------
# Sampled-token reverse-KL policy gradient


def test_pg_gradient_at_ratio_one() -> None:
    s, mask = _logits(17).requires_grad_(True), _mask()
    targets = torch.tensor([[1, 4, 0], [2, 5, 3]])
    teacher = _logits(18, (B, T), 1.0) - 2.0
    student_lp = token_logprobs(s, targets, mask)
    behavior = student_lp.detach()  # fresh rollout: ratio exactly 1
    loss = token_reverse_kl_pg(student_lp, behavior, teacher, mask)
    advantage = (teacher - behavior) * mask
    torch.testing.assert_close(loss, -advantage)
    (got,) = torch.autograd.grad(loss.sum(), s)
    (want,) = torch.autograd.grad((-advantage * token_logprobs(s, targets, mask)).sum(), s)
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0


def test_pg_stale_ratio_and_truncation() -> None:
    mask = torch.ones(1, 2, dtype=torch.bool)
    student = torch.tensor([[-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    behavior = torch.tensor([[-1.0 - LN(4.0), -1.0 + LN(2.0)]], dtype=torch.float64)
    teacher = torch.tensor([[-0.5, -3.0]], dtype=torch.float64)
    advantage = (teacher - behavior).detach()  # [ln4 + 0.5, -2 - ln2]
    # ratios 4 and 0.5
    plain = token_reverse_kl_pg(student, behavior, teacher, mask)
    torch.testing.assert_close(plain, -torch.tensor([[4.0, 0.5]], dtype=torch.float64) * advantage)
    (g,) = torch.autograd.grad(plain.sum(), student)
    torch.testing.assert_close(g, plain.detach())  # d/ds of -exp(s - b) * A is the value itself
    clipped = token_reverse_kl_pg(student, behavior, teacher, mask, is_clip=2.0)
    want = -torch.tensor([[2.0, 0.5]], dtype=torch.float64) * advantage
    torch.testing.assert_close(clipped, want)
    (g,) = torch.autograd.grad(clipped.sum(), student)
    # Truncated token: gradient -is_clip * A * d(logp); the untruncated one is unchanged.
    torch.testing.assert_close(g, want)


def test_sequence_reward_pg_is_reinforce_on_the_whole_row() -> None:
    s, mask = _logits(19).requires_grad_(True), _mask()
    targets = torch.tensor([[1, 4, 0], [2, 5, 3]])
    student_lp = token_logprobs(s, targets, mask)
    advantage = torch.tensor([0.75, -0.5], dtype=torch.float64)
    loss = sequence_reward_pg(student_lp, student_lp.detach(), advantage, mask)
    torch.testing.assert_close(loss, -advantage.unsqueeze(-1) * mask)  # ratio exactly 1
    # Summed over a row: -advantage times the gradient of the row's log-probability.
    (got,) = torch.autograd.grad(loss.sum(), s)
    row_lp = token_logprobs(s, targets, mask).sum(-1)
    (want,) = torch.autograd.grad(-(advantage * row_lp).sum(), s)
    torch.testing.assert_close(got, want)
    assert got[0].abs().sum() > 0 and got[1].abs().sum() > 0
    with pytest.raises(ValueError, match="do not match 2 rows"):
        sequence_reward_pg(student_lp, student_lp.detach(), advantage[:1], mask)


def test_batch_loss_mixes_distillation_and_reward() -> None:
    logits = _logits(26, (2, 3, V)).float().requires_grad_(True)
    batch = _batch()
    distill, _ = batch_loss(logits, batch, LossSpec("reverse_kl"))
    batch.advantage = torch.tensor([0.5, -1.0])
    student_lp = token_logprobs(logits, batch.input_ids[:, 1:], batch.loss_mask)
    reward = sequence_reward_pg(
        student_lp, batch.behavior_logprobs, batch.advantage, batch.loss_mask
    )
    mixed, metrics = batch_loss(
        logits, batch, LossSpec("reverse_kl", distill_weight=0.5, reward_weight=2.0)
    )
    torch.testing.assert_close(mixed, 0.5 * distill + 2.0 * reward)
    torch.testing.assert_close(metrics["reward_loss"], reward.detach())
    assert mixed[batch.loss_mask].ne(0).all() and mixed[~batch.loss_mask].eq(0).all()
    # The reward alone: the distillation term is gone, its gradient with it.
    alone, _ = batch_loss(
        logits, batch, LossSpec("on_policy_pg", distill_weight=0.0, reward_weight=1.0)
    )
    torch.testing.assert_close(alone, reward)
    # Without advantages (reward_weight 0 in the config: the driver sets none) nothing changes.
    batch.advantage = torch.zeros(0)
    plain, metrics = batch_loss(logits, batch, LossSpec("reverse_kl"))
    torch.testing.assert_close(plain, distill)
    assert "reward_loss" not in metrics
    with pytest.raises(ValueError, match="reward_weight must be >= 0"):
        LossSpec("reverse_kl", reward_weight=-1.0)


# ---------------------------------------------------------------------------------------------
# Feature loss


def test_feature_loss() -> None:
    torch.manual_seed(0)
    mask = _mask()
    hs, ht = _logits(19, (B, T, 5)), _logits(20, (B, T, 3))
    proj = torch.nn.Linear(5, 3, dtype=torch.float64)
    ps = proj(hs)
    torch.testing.assert_close(feature_loss(hs, ht, proj, mask), ((ps - ht) ** 2).mean(-1) * mask)
    cos = 1 - (ps * ht).sum(-1) / (ps.norm(dim=-1) * ht.norm(dim=-1))
    torch.testing.assert_close(feature_loss(hs, ht, proj, mask, "cosine"), cos * mask)
    with pytest.raises(ValueError, match="does not match"):
        feature_loss(hs, ht[..., :2], proj, mask)


# ---------------------------------------------------------------------------------------------
# batch_loss on a collated TrainBatch


def _batch():
    # Row 0: prompt [1, 2], completion [3, 4] -> targets in columns 1, 2 (L = 4, 3 columns).
    # Row 1: prompt [5], completion [2] -> target in column 0; columns 1, 2 are padding.
    samples = [
        Sample([1, 2], [3, 4], [-1.0, -2.0], prompt_index=0),
        Sample([5], [2], [-0.25], prompt_index=1),
    ]
    scores = [
        TeacherScore(
            torch.tensor([-0.5, -1.5]),
            torch.tensor([[3, 0], [4, 1]]),
            torch.tensor([[LN(0.5), LN(0.3)], [LN(0.6), LN(0.1)]]),
        ),
        TeacherScore(torch.tensor([-1.0]), torch.tensor([[2, 3]]), torch.tensor([[-0.1, -3.0]])),
    ]
    return collate(samples, scores, pad_id=0)


def test_batch_loss_columns_and_values() -> None:
    batch = _batch()
    assert batch.loss_mask.tolist() == [[False, True, True], [True, False, False]]
    logits = _logits(21, (2, 3, V)).float()
    logits[1, 1:] = float("nan")  # padding rows of the model output may hold anything
    logits.requires_grad_(True)
    mask = batch.loss_mask
    targets = batch.input_ids[:, 1:]

    loss, metrics = batch_loss(logits, batch, LossSpec("on_policy_pg"))
    student_lp = token_logprobs(logits.detach(), targets, mask)
    # reverse_kl metric = behavior - teacher: -1 - (-0.5), -2 - (-1.5), -0.25 - (-1)
    torch.testing.assert_close(
        metrics["reverse_kl"], torch.tensor([[0.0, -0.5, -0.5], [0.75, 0.0, 0.0]])
    )
    torch.testing.assert_close(metrics["student_logprob"], student_lp)
    ratio = (student_lp - batch.behavior_logprobs).exp() * mask
    advantage = batch.teacher_logprobs - batch.behavior_logprobs
    torch.testing.assert_close(loss.detach(), -ratio * advantage)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.isfinite(grad).all() and (grad[1, 1:] == 0).all()

    loss, _ = batch_loss(logits, batch, LossSpec("sft"))
    torch.testing.assert_close(loss.detach(), -student_lp)

    ids, lp = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    for kind in ("forward_kl", "reverse_kl"):
        for tail in (True, False):
            loss, _ = batch_loss(logits, batch, LossSpec(kind, tail=tail))
            torch.testing.assert_close(loss, ref.topk(kind, logits, ids, lp, mask, tail=tail))
            assert (loss[~mask] == 0).all() and (loss[mask] > 0).all()
    loss, _ = batch_loss(logits, batch, LossSpec("jsd", beta=0.3, tail=False, temperature=2.0))
    want = ref.topk("jsd", logits, ids, lp, mask, False, 2.0, beta=0.3)
    torch.testing.assert_close(loss, want)


def test_batch_loss_hand_value_topk_tail() -> None:
    # One completion token whose teacher/student bins are the tail hand example.
    s, ids, lp, _ = _tail_example()
    sample = Sample([1], [2], [LN(0.4)], prompt_index=0)
    score = TeacherScore(torch.tensor([LN(0.5)]), ids[0].clone(), lp[0].float())
    batch = collate([sample], [score], pad_id=0)
    loss, metrics = batch_loss(s.float(), batch, LossSpec("forward_kl"))
    assert loss.item() == pytest.approx(0.025267, abs=1e-5)
    assert metrics["student_logprob"].item() == pytest.approx(LN(0.4), abs=1e-5)
    assert metrics["reverse_kl"].item() == pytest.approx(LN(0.4) - LN(0.5), abs=1e-6)


def test_batch_loss_full_vocab_equals_the_full_vocabulary_losses() -> None:
    """teacher.support=full: the teacher's logits replace the batch's top-k signal; values,
    gradients, the teacher log-prob metric and logit_kd at T=2 match the reference functions,
    and padding logits (even NaN) change nothing."""
    batch = _batch()
    mask, targets = batch.loss_mask, batch.input_ids[:, 1:]
    student = _logits(31, (2, 3, V)).float()
    teacher = _logits(32, (2, 3, V)).float()
    student[1, 1:] = float("nan")
    teacher[1, 1:] = float("nan")
    clean_s = torch.where(mask.unsqueeze(-1), student, 0.0)
    clean_t = torch.where(mask.unsqueeze(-1), teacher, 0.0)
    cases = (
        (LossSpec("forward_kl", full_vocab=True), {}),
        (LossSpec("reverse_kl", full_vocab=True), {}),
        (LossSpec("jsd", beta=0.3, temperature=2.0, full_vocab=True), {"beta": 0.3}),
    )
    for spec, knobs in cases:
        want = ref.full_vocab(spec.kind, clean_s, clean_t, mask, spec.temperature, **knobs)
        s = student.clone().requires_grad_(True)
        loss, metrics = batch_loss(s, batch, spec, teacher_logits=teacher)
        torch.testing.assert_close(loss, want)
        teacher_lp = token_logprobs(clean_t, targets, mask)
        torch.testing.assert_close(
            metrics["reverse_kl"], (batch.behavior_logprobs - teacher_lp) * mask
        )
        (grad,) = torch.autograd.grad(loss.sum(), s)
        reference = clean_s.clone().requires_grad_(True)
        ref_loss = ref.full_vocab(spec.kind, reference, clean_t, mask, spec.temperature, **knobs)
        (want_grad,) = torch.autograd.grad(ref_loss.sum(), reference)
        torch.testing.assert_close(grad, want_grad)
        assert (grad[1, 1:] == 0).all()

    spec = LossSpec("logit_kd", alpha=0.3, temperature=2.0, full_vocab=True)  # no tail rule
    loss, metrics = batch_loss(student, batch, spec, teacher_logits=teacher)
    soft = ref.hinton(clean_s, clean_t, targets, mask, temperature=2.0, alpha=1.0)
    torch.testing.assert_close(metrics["soft_loss"], soft)
    ce = -token_logprobs(clean_s, targets, mask)
    torch.testing.assert_close(loss, 0.3 * soft + 0.7 * ce)


@pytest.mark.parametrize("chunk_rows", [1, 64])
def test_full_vocab_divergence_with_zero_probability_teacher_tokens(chunk_rows, monkeypatch):
    """The closed-form gradient (rayd.losses._FullVocabDivergence) where the teacher puts no
    mass on some tokens: values and gradients finite and equal to autograd's reference, in one
    chunk of rows or one row per chunk."""
    import rayd.losses

    monkeypatch.setattr(rayd.losses, "_CHUNK_ROWS", chunk_rows)

    student, finite = _logits(35), _logits(36)
    holes = finite.clone()
    holes[..., :2] = -math.inf  # reverse KL is infinite there: it takes the finite teacher
    mask = _mask()
    for kind, teacher in (("forward_kl", holes), ("jsd", holes), ("reverse_kl", finite)):
        s = student.clone().requires_grad_(True)
        got = full_loss(kind, s, teacher, mask, beta=0.5)
        (grad,) = torch.autograd.grad(got.sum(), s)
        r = student.clone().requires_grad_(True)
        want = ref.full_vocab(kind, r, teacher, mask, beta=0.5)
        (want_grad,) = torch.autograd.grad(want.sum(), r)
        assert torch.isfinite(got).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, want_grad)


def test_batch_loss_full_vocab_rows_equal_the_padded_form() -> None:
    """The learner passes only the [N, V] logits at the loss positions: loss, every metric and
    the student's gradient equal the [B, L-1, V] form, for the divergences, logit_kd's hard
    term at T = 2, a label-task row (cross-entropy, with its gradient) and a wider teacher."""
    samples = [
        Sample([1, 2], [3, 4], [-1.0, -2.0], prompt_index=0),
        Sample([5], [2], [0.0], prompt_index=1, on_policy=False, hard_target=True),
    ]
    labelled = collate(samples, [TeacherScore.empty(2, k=2), TeacherScore.empty(1, k=2)], 0)
    wide = torch.cat([_logits(38, (2, 3, V)).float(), torch.full((2, 3, 2), 3.0)], dim=-1)
    cases = (
        (_batch(), LossSpec("jsd", beta=0.3, full_vocab=True), _logits(37, (2, 3, V))),
        (_batch(), LossSpec("reverse_kl", temperature=2.0, full_vocab=True), wide),
        (_batch(), LossSpec("logit_kd", alpha=0.3, temperature=2.0, full_vocab=True), wide),
        (labelled, LossSpec("forward_kl", full_vocab=True), _logits(39, (2, 3, V))),
    )
    for batch, spec, teacher in cases:
        mask = batch.loss_mask
        student = _logits(36, (2, 3, V)).float().requires_grad_(True)
        teacher = teacher.float()
        want, want_metrics = batch_loss(student, batch, spec, teacher_logits=teacher)
        (want_grad,) = torch.autograd.grad(want.sum(), student)
        rows = student[mask].detach().requires_grad_(True)
        got, metrics = batch_loss(rows, batch, spec, teacher_logits=teacher[mask])
        (grad,) = torch.autograd.grad(got.sum(), rows)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(grad, want_grad[mask])
        assert metrics.keys() == want_metrics.keys()
        for name, value in metrics.items():
            torch.testing.assert_close(value, want_metrics[name], msg=name)
    # The label row's cross-entropy and its gradient, against a reference outside batch_loss.
    targets = labelled.input_ids[:, 1:]
    reference = _logits(36, (2, 3, V)).float().requires_grad_(True)
    ce = -token_logprobs(reference, targets, labelled.loss_mask)
    (ce_grad,) = torch.autograd.grad(ce[1].sum(), reference)
    torch.testing.assert_close(metrics["label_loss"][1], ce[1].detach())
    torch.testing.assert_close(grad[-1], ce_grad[1, 0])  # the label row's one loss position
    with pytest.raises(ValueError, match=r"\[N, V\] rows at the batch's 3 loss positions"):
        batch_loss(rows[:2], _batch(), spec, teacher_logits=teacher[_batch().loss_mask][:2])


def test_full_vocab_rows_target_logprobs() -> None:
    """The divergence pass also yields the tempered target log-probs of both sides."""
    from rayd.losses import full_vocab_rows

    student, teacher = _logits(40, (5, V)), _logits(41, (5, V))
    targets = torch.tensor([0, 5, 2, 2, 1])
    values, student_lp, teacher_lp = full_vocab_rows(
        student, teacher, targets, "reverse_kl", temperature=1.5
    )
    torch.testing.assert_close(student_lp, token_logprobs(student / 1.5, targets))
    torch.testing.assert_close(teacher_lp, token_logprobs(teacher / 1.5, targets))
    mask = torch.ones(1, 5, dtype=torch.bool)
    want = ref.full_vocab("reverse_kl", student[None], teacher[None], mask, temperature=1.5)
    torch.testing.assert_close(values, want[0])


def test_batch_loss_full_vocab_contract() -> None:
    batch = _batch()
    logits = _logits(33, (2, 3, V)).float()
    with pytest.raises(ValueError, match="teacher_logits"):
        batch_loss(logits, batch, LossSpec("jsd", full_vocab=True))
    with pytest.raises(ValueError, match="teacher_logits"):
        batch_loss(logits, batch, LossSpec("jsd"), teacher_logits=logits)
    with pytest.raises(ValueError, match="full_vocab applies"):
        LossSpec("on_policy_pg", full_vocab=True)
    # A teacher with a padded vocabulary (same tokenizer, more rows): the shared rows count.
    wide = torch.cat([_logits(34, (2, 3, V)).float(), torch.full((2, 3, 2), 5.0)], dim=-1)
    loss, _ = batch_loss(
        logits, batch, LossSpec("reverse_kl", full_vocab=True), teacher_logits=wide
    )
    want = ref.full_vocab("reverse_kl", logits, wide[..., :V], batch.loss_mask)
    torch.testing.assert_close(loss, want)


def test_batch_loss_off_policy_rows_use_the_student_as_behaviour() -> None:
    batch = _batch()
    batch.on_policy = torch.tensor([True, False])
    logits = _logits(22, (2, 3, V)).float()
    loss, metrics = batch_loss(logits, batch, LossSpec("on_policy_pg"))
    student_lp = metrics["student_logprob"]
    # Row 1 is a dataset completion: ratio 1, advantage teacher - student.
    assert loss[1, 0].item() == pytest.approx(-(-1.0 - student_lp[1, 0].item()), abs=1e-6)
    assert metrics["reverse_kl"][1, 0].item() == pytest.approx(student_lp[1, 0].item() + 1.0)
    assert metrics["ratio"][1, 0].item() == pytest.approx(1.0)


def test_batch_loss_all_masked_and_misaligned() -> None:
    batch = _batch()
    batch.loss_mask = torch.zeros_like(batch.loss_mask)
    logits = _logits(23, (2, 3, V)).float().requires_grad_(True)
    for spec in (LossSpec("on_policy_pg"), LossSpec("jsd"), LossSpec("sft")):
        loss, metrics = batch_loss(logits, batch, spec)
        assert (loss == 0).all() and all((m == 0).all() for m in metrics.values())
        (grad,) = torch.autograd.grad(loss.sum() / max(batch.num_tokens, 1), logits)
        assert (grad == 0).all()
    with pytest.raises(ValueError, match="not aligned"):
        batch_loss(logits[:, :2], batch, LossSpec("sft"))


def test_loss_spec_validation() -> None:
    with pytest.raises(ValueError, match="beta"):
        LossSpec("jsd", beta=-0.1)
    with pytest.raises(ValueError, match="unknown loss kind"):
        LossSpec("kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="is_clip"):
        LossSpec("on_policy_pg", is_clip=0.0)
    with pytest.raises(ValueError, match="temperature"):
        LossSpec("sft", temperature=2.0)


def test_batch_loss_logit_kd_is_hinton_over_topk_bins() -> None:
    batch = _batch()
    logits = _logits(24, (2, 3, V)).float()
    mask, targets = batch.loss_mask, batch.input_ids[:, 1:]
    ids, lp = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    ce = -token_logprobs(logits, targets, mask)
    for temperature, tail in ((1.0, True), (2.0, False)):
        spec = LossSpec("logit_kd", alpha=0.3, temperature=temperature, tail=tail)
        loss, metrics = batch_loss(logits, batch, spec)
        soft = ref.topk("forward_kl", logits, ids, lp, mask, tail=tail, temperature=temperature)
        torch.testing.assert_close(loss, 0.3 * temperature**2 * soft + 0.7 * ce)
        torch.testing.assert_close(metrics["hard_loss"], ce)
        torch.testing.assert_close(metrics["soft_loss"], temperature**2 * soft)
    with pytest.raises(ValueError, match="alpha"):
        LossSpec("logit_kd", alpha=1.5)
    with pytest.raises(ValueError, match="tail=True needs temperature"):
        LossSpec("logit_kd", temperature=2.0)


def test_batch_loss_row_weights_scale_rows() -> None:
    batch = _batch()
    logits = _logits(25, (2, 3, V)).float()
    plain, _ = batch_loss(logits, batch, LossSpec("sft"))
    batch.row_weight = torch.tensor([1.0, 0.25])
    weighted, metrics = batch_loss(logits, batch, LossSpec("sft"))
    torch.testing.assert_close(weighted[0], plain[0])
    torch.testing.assert_close(weighted[1], 0.25 * plain[1])
    # Metrics stay unweighted: they describe the tokens, not the objective.
    torch.testing.assert_close(metrics["student_logprob"], -plain)
    sliced = batch.slice(1, 2)
    assert sliced.row_weight.tolist() == [0.25]


def _batch_with_hidden(width: int = 4):
    """_batch()'s rows, with teacher hidden states of one layer pair: row r, completion token j
    holds the vector filled with 10 * r + j + 1."""
    samples = [
        Sample([1, 2], [3, 4], [-1.0, -2.0], prompt_index=0),
        Sample([5], [2], [-0.25], prompt_index=1),
    ]
    scores = []
    for r, sample in enumerate(samples):
        t = len(sample.completion_ids)
        hidden = torch.stack([torch.full((1, width), 10.0 * r + j + 1) for j in range(t)])
        scores.append(
            TeacherScore(
                torch.zeros(t),
                torch.zeros((t, 1), dtype=torch.long),
                torch.zeros((t, 1)),
                hidden=hidden,
            )
        )
    return collate(samples, scores, pad_id=0)


def test_collate_puts_teacher_hidden_states_at_the_target_columns() -> None:
    batch = _batch_with_hidden()
    assert tuple(batch.teacher_hidden.shape) == (2, 3, 1, 4)
    assert batch.teacher_hidden[0, :, 0, 0].tolist() == [0.0, 1.0, 2.0]  # columns 1, 2
    assert batch.teacher_hidden[1, :, 0, 0].tolist() == [11.0, 0.0, 0.0]  # column 0
    assert batch.slice(1, 2).teacher_hidden.shape == (1, 1, 1, 4)  # trimmed like the rest
    assert _batch().teacher_hidden.numel() == 0  # other modes carry none
    assert _batch().slice(0, 1).teacher_hidden.numel() == 0


def test_batch_loss_feature_kd_is_ce_plus_weighted_feature_distance() -> None:
    batch = _batch_with_hidden()
    logits = _logits(26, (2, 3, V)).float()
    spec = LossSpec(
        "feature_kd", feature_pairs=((1, 2),), teacher_hidden_size=4, feature_weight=0.5
    )
    projection = torch.nn.ModuleList([torch.nn.Linear(4, 4, bias=False)])
    with torch.no_grad():
        projection[0].weight.copy_(torch.eye(4))
    # The student's state equals the teacher's at every target: the feature term is 0.
    same = batch.teacher_hidden[:, :, 0].clone()
    loss, metrics = batch_loss(logits, batch, spec, [same], projection)
    ce, _ = batch_loss(logits, batch, LossSpec("sft"))
    torch.testing.assert_close(loss, ce)
    torch.testing.assert_close(metrics["feature_loss"], torch.zeros(2, 3))
    # Off by 1 everywhere (NaN at padding, which must not leak): MSE 1 per target token.
    shifted = same + 1.0
    shifted[1, 1:] = float("nan")
    shifted.requires_grad_(True)
    loss, metrics = batch_loss(logits, batch, spec, [shifted], projection)
    torch.testing.assert_close(loss, ce + 0.5 * batch.loss_mask.float())
    torch.testing.assert_close(metrics["token_loss"], ce)
    loss.sum().backward()
    assert torch.isfinite(shifted.grad).all() and torch.isfinite(projection[0].weight.grad).all()
    assert projection[0].weight.grad.abs().sum() > 0  # the projection learns
    with pytest.raises(ValueError, match="hidden states"):
        batch_loss(logits, batch, spec)
    with pytest.raises(ValueError, match="feature_pairs"):
        LossSpec("feature_kd")


def test_batch_loss_token_weights_scale_tokens_and_survive_slicing() -> None:
    batch = _batch()
    logits = _logits(26, (2, 3, V)).float()
    plain, _ = batch_loss(logits, batch, LossSpec("reverse_kl"))
    batch.token_weight = torch.tensor([[0.0, 0.5, 1.5], [2.0, 0.0, 0.0]])
    weighted, _ = batch_loss(logits, batch, LossSpec("reverse_kl"))
    torch.testing.assert_close(weighted, plain * batch.token_weight)
    parts = batch.split(2)
    assert parts[0].token_weight.tolist() == [[0.0, 0.5, 1.5]]
    assert parts[1].token_weight.tolist() == [[2.0]]  # trimmed with the padding columns
    torch.testing.assert_close(
        batch_loss(logits[1:, :1], parts[1], LossSpec("reverse_kl"))[0], weighted[1:, :1]
    )
    # Absent (the default): no weighting, and slicing keeps it absent.
    assert _batch().slice(0, 1).token_weight.numel() == 0


def test_batch_loss_hard_target_rows_take_cross_entropy() -> None:
    samples = [
        Sample([1, 2], [3, 4], [-1.0, -2.0], prompt_index=0),
        Sample([5], [2], [0.0], prompt_index=1, on_policy=False, hard_target=True, weight=0.5),
    ]
    scores = [
        TeacherScore(
            torch.tensor([-0.5, -1.5]),
            torch.tensor([[3, 0], [4, 1]]),
            torch.tensor([[LN(0.5), LN(0.3)], [LN(0.6), LN(0.1)]]),
        ),
        TeacherScore.empty(1, k=2),
    ]
    batch = collate(samples, scores, pad_id=0)
    assert batch.hard_target.tolist() == [False, True]
    logits = _logits(27, (2, 3, V)).float()
    mask, targets = batch.loss_mask, batch.input_ids[:, 1:]
    for kind in ("on_policy_pg", "reverse_kl"):
        loss, metrics = batch_loss(logits, batch, LossSpec(kind))
        plain, _ = batch_loss(logits, _batch(), LossSpec(kind))
        torch.testing.assert_close(loss[0], plain[0])  # the distilled row is untouched
        ce = -token_logprobs(logits, targets, mask)
        torch.testing.assert_close(loss[1], 0.5 * ce[1])
        torch.testing.assert_close(metrics["label_loss"][1], ce[1])
        assert metrics["label_loss"][0].abs().sum() == 0
        assert metrics["label_tokens"].tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
        assert metrics["reverse_kl"][1].abs().sum() == 0  # no teacher signal on the label row
    # Batches without a label task leave the field (and the label metrics) out altogether.
    assert _batch().hard_target.numel() == 0
    assert "label_loss" not in batch_loss(logits, _batch(), LossSpec("sft"))[1]


# ---------------------------------------------------------------------------------------------
# Stale rollouts (trainer.max_staleness >= 1): truncated importance weight of the top-k losses


def test_stale_importance_weight_is_one_on_fresh_rows_and_truncated_on_stale_ones() -> None:
    student = torch.tensor([[-1.0, -0.5, 0.0], [-1.0, -0.5, -2.0]])
    behavior = torch.tensor([[-2.0, -0.5, -3.0], [-2.0, -0.25, -9.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    w = stale_importance_weight(student, behavior, torch.tensor([False, True]), mask, clip=2.0)
    # Row 0 is fresh: exactly 1 everywhere, whatever the ratio. Row 1: min(ratio, 2).
    assert w[0].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(w[1], torch.tensor([2.0, math.exp(-0.25), 2.0]))
    # A ratio of exp(1e4) is truncated without overflowing.
    huge = stale_importance_weight(
        torch.tensor([[0.0]]), torch.tensor([[-1e4]]), torch.tensor([True]), mask[:1, :1]
    )
    assert huge.item() == 2.0
    with pytest.raises(ValueError, match="clip"):
        stale_importance_weight(student, behavior, torch.tensor([True, True]), mask, clip=0.0)


def test_stale_rows_scale_the_topk_loss_and_its_gradient_by_the_detached_weight() -> None:
    batch = _batch()
    logits = _logits(21, (2, 3, V)).float().requires_grad_(True)
    spec = LossSpec("reverse_kl")
    fresh_loss, fresh_metrics = batch_loss(logits, batch, spec)
    assert "is_weight" not in fresh_metrics  # no stale row: the loss as before, bit for bit

    batch.stale = torch.tensor([False, True])
    loss, metrics = batch_loss(logits, batch, spec)
    targets = batch.input_ids[:, 1:]
    student_lp = token_logprobs(logits.detach(), targets, batch.loss_mask)
    ratio = (student_lp[1] - batch.behavior_logprobs[1]).exp()
    weight = torch.where(batch.loss_mask[1], ratio.clamp(max=2.0), 1.0)
    assert torch.equal(loss[0], fresh_loss[0])
    torch.testing.assert_close(loss[1], fresh_loss[1] * weight)
    torch.testing.assert_close(metrics["is_weight"][1], weight * batch.loss_mask[1])
    # Gradient: the weight is a constant factor (w * d(loss)), nothing flows through it.
    (grad,) = torch.autograd.grad(loss[1].sum(), logits)
    (want,) = torch.autograd.grad((fresh_loss[1] * weight).sum(), logits)
    torch.testing.assert_close(grad, want)
    # algorithm.is_clip, when set, is the truncation.
    clipped, _ = batch_loss(logits, batch, LossSpec("reverse_kl", is_clip=1.0))
    torch.testing.assert_close(clipped[1], fresh_loss[1] * weight.clamp(max=1.0))


def test_collate_marks_on_policy_rows_behind_the_learner_as_stale() -> None:
    samples = [
        Sample([1], [2], [-1.0], prompt_index=0, weight_version=3),
        Sample([1], [2], [-1.0], prompt_index=1, weight_version=2),
        Sample([1], [2], [0.0], prompt_index=2, weight_version=1, on_policy=False),
    ]
    scores = [TeacherScore.empty(1) for _ in samples]
    assert collate(samples, scores, 0, learner_version=3).stale.tolist() == [False, True, False]
    assert collate(samples, scores, 0, learner_version=2).stale.numel() == 0  # none stale
    assert collate(samples, scores, 0).stale.numel() == 0
    sliced = collate(samples, scores, 0, learner_version=3).slice(1, 3)
    assert sliced.stale.tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# The loss table: every name reachable through batch_loss, and the config offers only its names


def _direct_losses(logits, batch, hidden, projection):
    """What batch_loss must give for every name in LOSSES, from the references (top-k path,
    temperature 1, tail=True unless named)."""
    mask, targets = batch.loss_mask, batch.input_ids[:, 1:]
    ids, lp = batch.teacher_topk_ids, batch.teacher_topk_logprobs
    student_lp = token_logprobs(logits, targets, mask)
    ce = ref.cross_entropy(logits, targets, mask)
    features = feature_loss(hidden, batch.teacher_hidden[:, :, 0], projection[0], mask)
    return {
        "on_policy_pg": (
            LossSpec("on_policy_pg"),
            token_reverse_kl_pg(student_lp, batch.behavior_logprobs, batch.teacher_logprobs, mask),
        ),
        "forward_kl": (LossSpec("forward_kl"), ref.topk("forward_kl", logits, ids, lp, mask)),
        "reverse_kl": (
            LossSpec("reverse_kl", tail=False),
            ref.topk("reverse_kl", logits, ids, lp, mask, False),
        ),
        "jsd": (LossSpec("jsd", beta=0.3), ref.topk("jsd", logits, ids, lp, mask, beta=0.3)),
        "tvd": (LossSpec("tvd"), ref.topk("tvd", logits, ids, lp, mask)),
        "skew_kl": (
            LossSpec("skew_kl", skew=0.2),
            ref.topk("skew_kl", logits, ids, lp, mask, skew=0.2),
        ),
        "skew_reverse_kl": (
            LossSpec("skew_reverse_kl", skew=0.3, tail=False, temperature=2.0),
            ref.topk("skew_reverse_kl", logits, ids, lp, mask, False, 2.0, skew=0.3),
        ),
        "sft": (LossSpec("sft"), ce),
        "logit_kd": (
            LossSpec("logit_kd", alpha=0.3),
            0.3 * ref.topk("forward_kl", logits, ids, lp, mask) + 0.7 * ce,
        ),
        "feature_kd": (
            LossSpec(
                "feature_kd", feature_pairs=((1, 2),), teacher_hidden_size=4, feature_weight=0.5
            ),
            ce + 0.5 * features,
        ),
    }


def test_every_loss_in_the_table_is_reachable_through_batch_loss() -> None:
    batch = _batch_with_hidden()
    # _batch()'s teacher signal on _batch_with_hidden()'s rows (same samples, same columns)
    for name in ("teacher_logprobs", "teacher_topk_ids", "teacher_topk_logprobs"):
        setattr(batch, name, getattr(_batch(), name))
    logits = _logits(41, (2, 3, V)).float()
    hidden = _logits(42, (2, 3, 4)).float()
    torch.manual_seed(0)
    projection = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    cases = _direct_losses(logits, batch, hidden, projection)
    assert set(cases) == set(LOSSES) == set(get_args(LossKind))
    for name, (spec, want) in cases.items():
        loss, metrics = batch_loss(logits, batch, spec, [hidden], projection)
        torch.testing.assert_close(loss, want, msg=name)
        assert set(metrics) >= {"reverse_kl", "student_logprob"}, name


def test_tvd_and_skew_kl_over_every_token_equal_the_full_vocabulary_forms() -> None:
    s, t, mask = _logits(43), _logits(44), _mask()
    lp, ids = t.log_softmax(-1).sort(dim=-1, descending=True)  # k = V
    for temperature in (1.0, 2.0):
        for kind in ("tvd", "skew_kl", "skew_reverse_kl"):
            torch.testing.assert_close(
                topk_loss(kind, s, ids, lp, mask, tail=False, temperature=temperature, skew=0.1),
                ref.full_vocab(kind, s, t, mask, temperature, skew=0.1),
            )
    torch.testing.assert_close(
        topk_loss("tvd", s, ids, lp, mask), ref.full_vocab("tvd", s, t, mask), atol=1e-6, rtol=0
    )
    # skew 0 is the plain KL in either direction
    torch.testing.assert_close(
        topk_loss("skew_kl", s, ids, lp, mask, skew=0.0), topk_loss("forward_kl", s, ids, lp, mask)
    )
    torch.testing.assert_close(
        topk_loss("skew_reverse_kl", s, ids, lp, mask, skew=0.0),
        topk_loss("reverse_kl", s, ids, lp, mask),
    )


def test_tvd_and_skew_kl_take_the_stale_weight_and_refuse_the_full_vocabulary() -> None:
    batch = _batch()
    logits = _logits(45, (2, 3, V)).float()
    for kind in ("tvd", "skew_kl", "skew_reverse_kl"):
        fresh, _ = batch_loss(logits, batch, LossSpec(kind))
        batch.stale = torch.tensor([False, True])
        loss, metrics = batch_loss(logits, batch, LossSpec(kind))
        batch.stale = torch.zeros(0, dtype=torch.bool)
        torch.testing.assert_close(loss, fresh * metrics["is_weight"])
        with pytest.raises(ValueError, match="full_vocab applies to forward_kl, reverse_kl"):
            LossSpec(kind, full_vocab=True)
        with pytest.raises(ValueError, match=r"tail=True needs temperature 1\.0"):
            LossSpec(kind, temperature=2.0)
    with pytest.raises(ValueError, match="skew"):
        LossSpec("skew_kl", skew=1.0)


def test_the_config_offers_only_losses_of_the_table() -> None:
    offered = set(get_args(get_args(AlgorithmConfig.model_fields["loss"].annotation)[0]))
    assert offered == {"on_policy_pg", *TOPK_LOSSES}
    resolved = {
        AlgorithmConfig(name=name, loss=loss).resolved_loss
        for name in get_args(AlgorithmName)
        for loss in [None, *(sorted(offered) if name in ("on_policy", "gkd") else [])]
    }
    assert resolved <= set(LOSSES), resolved - set(LOSSES)
    assert resolved >= offered | {"sft", "logit_kd", "feature_kd"}
    assert all(LOSSES[name].divergence for name in TOPK_LOSSES)
    assert all(LOSSES[name].full_vocab for name in FULL_VOCAB_LOSSES)
