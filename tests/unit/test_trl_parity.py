"""rayd's 2026 on-policy methods against TRL 1.16's reference trainers (in the lock), on one
shared float64 batch: IW-OPD's token weights, loss and gradients (`trl.experimental.iw_opd`),
and the self-distillation loss given the same teacher log-probs and its EMA update
(`trl.experimental.sdft`). Where a definition differs on purpose, the test says how (and
docs/algorithms.md)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from rayd.losses import LossSpec, batch_loss, position_weights, token_logprobs
from rayd.types import TrainBatch

torch.set_num_threads(1)
B, T, V = 3, 6, 11
GAMMA, EPSILON = 0.7, 1e-8


@pytest.fixture(scope="module")
def iw_opd_trainer():
    # Importing the trainer imports vLLM when it is installed (about 10 s, once here).
    return pytest.importorskip("trl.experimental.iw_opd.iw_opd_trainer").IWOPDTrainer


def shared_batch(seed: int = 0):
    """A student's logits [B, T, V] (the completion positions of a rollout), its sampled
    tokens, the teacher's log-probs of them, and the completion mask: row 1 shorter, row 2 with
    one token only. Behaviour log-probs equal the student's own (a fresh rollout)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 1:] = False
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64).log_softmax(-1)
    teacher_lp = teacher.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return logits, tokens, mask, teacher_lp


def rayd_batch(logits, tokens, mask, teacher_lp) -> TrainBatch:
    """The same rows as a rayd TrainBatch: prompt of one token, the completion after it."""
    b, t = mask.shape
    input_ids = torch.cat([torch.zeros(b, 1, dtype=torch.long), tokens], dim=1)
    behaviour = token_logprobs(logits.detach(), tokens, mask)
    zeros = torch.zeros(b, t, 1)
    return TrainBatch(
        input_ids,
        torch.ones_like(input_ids),
        mask,
        behaviour,
        torch.where(mask, teacher_lp, 0.0),
        zeros.long(),
        zeros,
    )


def trl_iw_opd(trainer, logits, tokens, mask, teacher_lp, behaviour):
    """TRL's IW-OPD loss (token mean: num_items_in_batch=None) and what it logged."""
    stub = SimpleNamespace(
        temperature=1.0,
        iw_opd_gamma=GAMMA,
        iw_opd_epsilon=EPSILON,
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    labels = torch.where(mask, tokens, -100)
    loss = trainer._compute_iw_opd_loss(
        stub,
        student_logits=logits,
        completion_tokens=tokens,
        labels=labels,
        teacher_actual_logprobs=teacher_lp,
        rollout_logprobs=behaviour,
        num_items_in_batch=None,
    )
    return loss, stub._metrics["train"]


def test_iw_opd_weights_loss_and_gradients_equal_trl(iw_opd_trainer) -> None:
    logits, tokens, mask, teacher_lp = shared_batch()
    batch = rayd_batch(logits, tokens, mask, teacher_lp)
    spec = LossSpec(
        "on_policy_pg",
        position_weighting="iw_opd",
        iw_opd_gamma=GAMMA,
        iw_opd_epsilon=EPSILON,
    )
    student = logits.clone().requires_grad_(True)
    per_token, metrics = batch_loss(student, batch, spec)
    ours = per_token.sum() / mask.sum()  # the learner's token mean (one micro-batch)
    (our_grad,) = torch.autograd.grad(ours, student)

    reference = logits.clone().requires_grad_(True)
    theirs, logged = trl_iw_opd(
        iw_opd_trainer, reference, tokens, mask, teacher_lp, batch.behavior_logprobs
    )
    (their_grad,) = torch.autograd.grad(theirs, reference)

    # The weights: TRL logs their mean, min and max over the valid tokens.
    advantage = torch.where(mask, teacher_lp - batch.behavior_logprobs, 0.0)
    weights = position_weights(advantage, mask, GAMMA, EPSILON)
    valid = weights[mask]
    assert logged["iw_opd/mean_weight"][0] == pytest.approx(float(valid.mean()), abs=1e-12)
    assert logged["iw_opd/min_weight"][0] == pytest.approx(float(valid.min()), abs=1e-12)
    assert logged["iw_opd/max_weight"][0] == pytest.approx(float(valid.max()), abs=1e-12)
    torch.testing.assert_close(metrics["iw_opd/weight"], weights, atol=1e-12, rtol=0)
    # The gradients, entry by entry: the weights times each token's advantage.
    torch.testing.assert_close(our_grad, their_grad, atol=1e-10, rtol=0)
    # The values differ on purpose: TRL's surrogate is -s_t * w_t * A_t, rayd's policy-gradient
    # surrogate -ratio_t * w_t * A_t (ratio 1 on a fresh rollout). The same weighted advantages
    # in TRL's form give TRL's value exactly.
    student_lp = token_logprobs(logits, tokens, mask)
    trl_form = torch.where(mask, -student_lp * weights * advantage, 0.0).sum() / mask.sum()
    assert float(theirs.detach()) == pytest.approx(float(trl_form), abs=1e-12)
    torch.testing.assert_close(per_token, torch.where(mask, -weights * advantage, 0.0))


@pytest.mark.parametrize(
    "broken",
    [
        "inclusive prefix",  # P_t including token t itself
        "no abs",  # signed discrepancies
        "mean one",  # weights renormalised to mean 1 per row
    ],
)
def test_the_parity_check_sees_a_changed_definition(iw_opd_trainer, broken) -> None:
    logits, tokens, mask, teacher_lp = shared_batch(1)
    batch = rayd_batch(logits, tokens, mask, teacher_lp)
    advantage = torch.where(mask, teacher_lp - batch.behavior_logprobs, 0.0)
    d = advantage if broken == "no abs" else advantage.abs()
    before = d.cumsum(-1) if broken == "inclusive prefix" else d.cumsum(-1) - d
    wrong = 1 + GAMMA * (1 - before / d.sum(-1, keepdim=True).clamp(min=EPSILON))
    if broken == "mean one":
        wrong = wrong / (torch.where(mask, wrong, 0).sum(-1, True) / mask.sum(-1, True))
    _, logged = trl_iw_opd(
        iw_opd_trainer, logits, tokens, mask, teacher_lp, batch.behavior_logprobs
    )
    valid = torch.where(mask, wrong, math.nan)[mask]
    assert (logged["iw_opd/mean_weight"][0], logged["iw_opd/max_weight"][0]) != pytest.approx(
        (float(valid.mean()), float(valid.max())), abs=1e-9
    )


def test_position_weights_by_hand() -> None:
    # One completion of three tokens with discrepancies 0.2, 0.3, 0.5 (Z = 1): P = 0, 0.2, 0.5,
    # so w = 1 + gamma * (1, 0.8, 0.5); a fourth, masked column changes nothing.
    d = torch.tensor([[0.2, -0.3, 0.5, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    got = position_weights(d, mask, gamma=0.5, epsilon=1e-8)
    torch.testing.assert_close(got, torch.tensor([[1.5, 1.4, 1.25, 0.0]], dtype=torch.float64))
    # No discrepancy at all: every token keeps the first token's weight, 1 + gamma.
    flat = position_weights(torch.zeros(1, 3, dtype=torch.float64), mask[:, :3], 0.5, 1e-8)
    torch.testing.assert_close(flat, torch.full((1, 3), 1.5, dtype=torch.float64))


def test_a_dense_loss_is_weighted_by_its_own_divergence_by_hand() -> None:
    """rayd's extension to the top-k losses: a token's discrepancy is the dense divergence at
    it. Two completion tokens, V = 2, the hand example of test_losses (forward KL 0.130812,
    0.143841 per token, all mass in the k = 2 bins)."""
    ln = math.log
    student = torch.tensor([[[0.0, 0.0], [ln(3.0), 0.0]]], dtype=torch.float64)
    teacher = torch.tensor([[[ln(3.0), 0.0], [0.0, 0.0]]], dtype=torch.float64)
    lp, ids = teacher.log_softmax(-1).sort(dim=-1, descending=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    input_ids = torch.zeros(1, 3, dtype=torch.long)
    zeros = torch.zeros(1, 2, dtype=torch.float64)
    batch = TrainBatch(input_ids, torch.ones_like(input_ids), mask, zeros, zeros, ids, lp)
    plain, _ = batch_loss(student, batch, LossSpec("forward_kl", tail=False))
    weighted, metrics = batch_loss(
        student, batch, LossSpec("forward_kl", tail=False, position_weighting="iw_opd")
    )
    d1, d2 = 0.130812, 0.143841
    assert plain[0].tolist() == pytest.approx([d1, d2], abs=1e-6)
    w = [1.5, 1 + 0.5 * (1 - d1 / (d1 + d2))]
    assert weighted[0].tolist() == pytest.approx([d1 * w[0], d2 * w[1]], abs=1e-6)
    assert metrics["iw_opd/weight"][0].tolist() == pytest.approx(w, abs=1e-6)
    # Half the tokens in each of the first and last quarters of the completion.
    assert metrics["iw_opd/tokens_q1"][0].tolist() == [1.0, 0.0]
    assert metrics["iw_opd/tokens_q3"][0].tolist() == [0.0, 1.0]


def test_position_weighting_is_refused_where_it_means_nothing() -> None:
    from rayd.config import ConfigError, load_config

    with pytest.raises(ValueError, match="position weighting applies to the on-policy losses"):
        LossSpec("sft", position_weighting="iw_opd")
    with pytest.raises(ValueError, match="gamma >= 0"):
        LossSpec("on_policy_pg", position_weighting="iw_opd", iw_opd_gamma=-1.0)
    base = ["models.student.path=tiny:test-student", "models.teacher.path=tiny:test-teacher"]
    with pytest.raises(ConfigError, match=r"algorithm\.position_weighting weighs the tokens"):
        load_config(None, [*base, "algorithm.name=sft", "algorithm.position_weighting=iw_opd"])


# ---------------------------------------------------------------------------------------------
# Self-distillation (SDFT): the loss given the same teacher logits, and the EMA update


@pytest.fixture(scope="module")
def sdft():
    return pytest.importorskip("trl.experimental.sdft.loss_utils")


def self_distillation_batch(seed: int = 2):
    """Student and teacher logits at the completion positions [B, T, V] (the teacher's after
    its own, privileged prompt: aligned by completion position), a mask, sampled tokens."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 1.5
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    return student, teacher, tokens, mask


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_the_self_distillation_loss_equals_sdfts_full_logit_loss(sdft, alpha) -> None:
    """rayd's jsd(beta) over the whole vocabulary is TRL's compute_divergence(alpha) with
    alpha = beta (0: forward KL, 1: reverse KL), per token, values and gradients. The
    reductions differ on purpose: TRL averages each sequence, then the sequences; rayd takes
    the mean over every token of the step (a long completion weighs by its length)."""
    student, teacher, tokens, mask = self_distillation_batch()
    batch = rayd_batch(student, tokens, mask, torch.zeros(B, T, dtype=torch.float64))
    ours_in = student.clone().requires_grad_(True)
    kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(alpha, "jsd")
    spec = LossSpec(kind, beta=alpha, full_vocab=True)  # type: ignore[arg-type]
    ours, _ = batch_loss(ours_in, batch, spec, teacher_logits=teacher)
    theirs_in = student.clone().requires_grad_(True)
    theirs = sdft.compute_full_logit_self_distillation_loss(
        theirs_in, teacher, distillation_alpha=alpha
    )
    torch.testing.assert_close(ours, torch.where(mask, theirs, 0.0), atol=1e-10, rtol=0)
    (g_ours,) = torch.autograd.grad(ours.sum(), ours_in)
    (g_theirs,) = torch.autograd.grad(torch.where(mask, theirs, 0.0).sum(), theirs_in)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-10, rtol=0)
    # TRL's reduction and rayd's, on the same per-token values
    m, theirs = mask.double(), theirs.detach()
    per_sequence = ((theirs * m).sum(-1) / m.sum(-1)).mean()
    per_token = (theirs * m).sum() / m.sum()
    assert float(per_sequence) != pytest.approx(float(per_token), abs=1e-6)  # rows differ


@pytest.mark.parametrize("tail", [False, True])
def test_the_top_k_self_distillation_loss_equals_sdfts(sdft, tail) -> None:
    """SDFT's default mode compares the two over the student's top-k (renormalised within
    them, or with a tail bin): rayd's teacher.support=student_topk with tail=false/true."""
    student, teacher, tokens, mask = self_distillation_batch(3)
    k = 4
    ids = student.topk(k, dim=-1).indices  # the student's own top-k at each position
    lp = teacher.log_softmax(-1).gather(-1, ids)  # the teacher's exact log-probs there
    zeros = torch.zeros(B, T, dtype=torch.float64)
    input_ids = torch.cat([torch.zeros(B, 1, dtype=torch.long), tokens], dim=1)
    batch = TrainBatch(input_ids, torch.ones_like(input_ids), mask, zeros, zeros, ids, lp)
    ours, _ = batch_loss(student, batch, LossSpec("jsd", beta=0.5, tail=tail))
    theirs = sdft.compute_topk_self_distillation_loss(
        student, teacher, distillation_topk=k, distillation_alpha=0.5, distillation_add_tail=tail
    )
    torch.testing.assert_close(ours, torch.where(mask, theirs, 0.0), atol=1e-8, rtol=0)


def test_the_ema_update_equals_trls() -> None:
    callbacks = pytest.importorskip("trl.trainer.callbacks")
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayd.learner.deepspeed_backend import ema_update

    config = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    student, ours, theirs = (LlamaForCausalLM(config).double() for _ in range(3))
    theirs.load_state_dict(ours.state_dict())
    for rate in (0.05, 0.5, 1.0):
        ema_update(ours, student.state_dict(), rate)
        callbacks.SyncRefModelCallback._sync_target_model(student, theirs, rate)
        for (name, a), b in zip(
            ours.state_dict().items(), theirs.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=name)
    # rate 1 is the live student itself
    for a, b in zip(ours.state_dict().values(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
