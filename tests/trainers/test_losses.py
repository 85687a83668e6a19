"""FiberPO's properties (DESIGN.md): on-policy G = r = 1 with the plain policy gradient, the rollback band
pushes back toward the trust region, beyond it no gradient; GRPO/GSPO on-policy; DPO = log 2 at the reference."""
import math

import pytest
import torch

from flashops.trainers.losses import (LOG2, dpo_loss, fiberpo_loss, gate, group_advantages, grpo_loss, gspo_loss,
                                      kl_penalty)

B, T = 4, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    adv = torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    return old, adv, mask


def _plain_pg_grad(old, adv, mask):
    lp = old.clone().requires_grad_()
    ratio = torch.exp(lp - lp.detach())
    j = ((ratio * adv * mask).sum(-1) / mask.sum(-1)).mean()
    (-j).backward()
    return lp.grad


@pytest.mark.parametrize("fn", [fiberpo_loss, grpo_loss, gspo_loss])
def test_on_policy_ratio_is_one_and_gradient_is_the_plain_policy_gradient(fn):
    old, adv, mask = _inputs()
    lp = old.clone().requires_grad_()
    loss, stats = fn(lp, old, adv, mask)
    loss.backward()
    assert torch.allclose(stats["gated_ratio"], mask)  # G = r = 1 on response tokens
    expected = -((adv * mask).sum(-1) / mask.sum(-1)).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(lp.grad, _plain_pg_grad(old, adv, mask), atol=1e-7)


def test_fiberpo_equals_ratio_inside_the_trust_region():
    old, adv, mask = _inputs()
    g = torch.Generator().manual_seed(1)
    lp = old + (torch.rand(B, T, generator=g) - 0.5) * 0.1  # |log r| <= 0.05: inside every clip
    _, stats = fiberpo_loss(lp, old, adv, mask)
    assert torch.allclose(stats["gated_ratio"], torch.exp(lp - old) * mask, atol=1e-6)


def test_gate_is_continuous_and_has_the_rollback_slope():
    c, t = 0.2, torch.tensor(5.0)
    for x in (c, (1 + 1 / 5) * c):
        below, above = gate(torch.tensor(x - 1e-6), c, t), gate(torch.tensor(x + 1e-6), c, t)
        assert abs(float(below - above)) < 1e-4
    x = torch.tensor(0.22, requires_grad=True)  # inside (C, (1 + 1/T) C) = (0.2, 0.24)
    gate(x, c, t).backward()
    assert x.grad.item() == pytest.approx(-5.0)
    assert gate(torch.tensor(0.5), c, t).item() == 0.0


def _uniform_drift_grad(shift: float, adv_sign: float = 1.0, t: int = 5):
    old = torch.full((1, t), -1.0)
    lp = (old + shift).requires_grad_()
    adv = torch.full((1, t), adv_sign)
    loss, stats = fiberpo_loss(lp, old, adv, torch.ones(1, t), c_plus=0.2, c_minus=0.2)  # the band at C = 0.2
    loss.backward()
    return lp.grad, stats


def test_rollback_band_gradient_points_back_toward_the_trust_region():
    # log s+ = 0.22 is in the band (0.2, 0.24) for T = 5: a descent step must LOWER the log-ratios
    grad, stats = _uniform_drift_grad(0.22)
    assert (grad > 0).all(), grad
    assert stats["gated_fraction"].item() == 1.0
    # With A < 0 the equations as written give the opposite sign (minimising G * A raises the drift until
    # the weight reaches the flat region): recorded here so a change of behaviour is noticed.
    grad_neg, _ = _uniform_drift_grad(0.22, adv_sign=-1.0)
    assert (grad_neg < 0).all()
    # inside the trust region the gradient is the ordinary one (raises logprobs for A > 0)
    grad_in, _ = _uniform_drift_grad(0.1)
    assert (grad_in < 0).all()


def test_beyond_the_band_the_gradient_is_zero():
    grad, stats = _uniform_drift_grad(0.3)  # beyond (1 + 1/T) C = 0.24
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-7)
    grad, _ = _uniform_drift_grad(-0.5)  # the negative side: log s- beyond its band
    assert torch.allclose(grad, torch.zeros_like(grad), atol=1e-7)


def test_c_minus_defaults_below_c_plus_as_the_paper_recommends_and_they_must_add_up():
    # issue 16 changed the default from delta/2 each to the paper's C- < C+ (0.25 / 0.15 at delta 0.4)
    old, adv, mask = _inputs()
    lp = old + 0.22  # log s+ = 0.22: inside C+ = 0.25, in the rollback band of C+ = 0.2
    a, _ = fiberpo_loss(lp, old, adv, mask, delta=0.4)
    b, _ = fiberpo_loss(lp, old, adv, mask, delta=0.4, c_plus=0.25, c_minus=0.15)
    c, _ = fiberpo_loss(lp, old, adv, mask, delta=0.4, c_plus=0.2, c_minus=0.2)
    assert a.item() == b.item() != c.item()
    with pytest.raises(ValueError, match="add up to delta"):
        fiberpo_loss(lp, old, adv, mask, delta=0.4, c_plus=0.3, c_minus=0.3)


def test_fiberpo_matches_the_equations_on_a_hand_computed_case():
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.1, -0.05]])
    adv = torch.tensor([[1.0, 2.0]])
    loss, stats = fiberpo_loss(lp, old, adv, torch.ones(1, 2), eps=0.2, delta=0.4)
    s_plus, s_minus = 0.1 / 2, 0.05 / 2  # both inside C = 0.2 -> w = exp(s+ - s-)
    w = math.exp(s_plus - s_minus)
    r0 = math.exp((0.1 - s_plus) + s_minus)        # l = +1: u = log r - s+, v = -s-
    r1 = math.exp((-0.05 + s_minus) - s_plus)      # l = -1: l u = log r + s-, l v = s+
    g = [w * r0, w * r1]
    assert stats["gated_ratio"][0].tolist() == pytest.approx(g, abs=1e-6)
    assert loss.item() == pytest.approx(-(g[0] * 1 + g[1] * 2) / 2, abs=1e-6)


def test_grpo_clips_and_gspo_uses_the_sequence_ratio():
    old = torch.zeros(1, 3)
    lp = torch.tensor([[0.5, 0.0, 0.0]], requires_grad=True)
    loss, stats = grpo_loss(lp, old, torch.ones(1, 3), torch.ones(1, 3), eps=0.2)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0  # clipped above 1 + eps with A > 0: no gradient
    _, st = gspo_loss(lp.detach(), old, torch.ones(1, 3), torch.ones(1, 3))
    assert st["gated_ratio"][0].tolist() == pytest.approx([math.exp(0.5 / 3)] * 3)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    x, y = torch.randn(8), torch.randn(8)
    loss, stats = dpo_loss(x, y, x.clone(), y.clone(), beta=0.1)
    assert loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert stats["reward_margin"].item() == 0.0
    loss2, stats2 = dpo_loss(x + 1.0, y, x, y, beta=0.1)  # policy prefers chosen more than the reference
    assert loss2.item() < LOG2 and stats2["reward_accuracy"].item() == 1.0


def test_dpo_nll_term_adds_the_chosen_per_token_nll_and_pulls_the_chosen_answer_up():
    """dpo.nllWeight (RPO): loss = DPO + w x mean(-log p(chosen) / its token count); its gradient raises the
    chosen log-prob even where the DPO term alone would lower it (both sides falling, the rejected faster)."""
    chosen, rejected = torch.tensor([-6.0, -9.0]), torch.tensor([-8.0, -4.0])
    tokens = torch.tensor([3.0, 6.0])
    plain, _ = dpo_loss(chosen, rejected, chosen + 1, rejected + 1, beta=0.1)
    rpo, stats = dpo_loss(chosen, rejected, chosen + 1, rejected + 1, beta=0.1, nll_weight=0.5, chosen_tokens=tokens)
    assert rpo.item() == pytest.approx(plain.item() + 0.5 * (6 / 3 + 9 / 6) / 2)
    assert stats["chosen_nll"].item() == pytest.approx((6 / 3 + 9 / 6) / 2)
    with pytest.raises(ValueError, match="chosen_tokens"):
        dpo_loss(chosen, rejected, chosen, rejected, nll_weight=1.0)
    # the DPO term alone is indifferent to a shared shift of both sides; the NLL term is not
    c = torch.tensor([-6.0], requires_grad=True)
    r = torch.tensor([-8.0], requires_grad=True)
    loss, _ = dpo_loss(c, r, torch.tensor([-6.0]), torch.tensor([-8.0]), nll_weight=1.0, chosen_tokens=torch.tensor([3.0]))
    loss.backward()
    assert c.grad.item() < -0.3  # descending the loss raises log p(chosen) by more than DPO's own pull (0.05)


def test_group_advantages_are_zero_mean_per_group_and_kl_is_zero_at_the_reference():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    assert a.view(2, 4).sum(-1).abs().max() < 1e-5
    assert (a[4:] == 0).all() and a[0] > 0 > a[1]
    lp = torch.randn(2, 3)
    assert kl_penalty(lp, lp, torch.ones(2, 3)).item() == 0.0


@pytest.mark.parametrize("fn", [fiberpo_loss, grpo_loss, gspo_loss])
def test_masked_positions_never_reach_the_arithmetic(fn):
    """-inf old log-probs, NaN log-probs and NaN advantages on padding leave loss and gradient as if the
    padding held zeros (they used to give NaN through inf * 0)."""
    old, adv, mask = _inputs()
    g = torch.Generator().manual_seed(2)
    shift = (torch.rand(B, T, generator=g) - 0.5) * 0.6
    clean_lp = (old + shift).requires_grad_()
    clean, _ = fn(clean_lp, old, adv, mask)
    clean.backward()
    pad = mask == 0
    dirty_old = old.masked_fill(pad, float("-inf"))
    dirty_adv = adv.masked_fill(pad, float("nan"))
    dirty_lp = (old + shift).masked_fill(pad, float("nan")).requires_grad_()
    dirty, stats = fn(dirty_lp, dirty_old, dirty_adv, mask)
    dirty.backward()
    assert torch.isfinite(dirty) and dirty.item() == pytest.approx(clean.item(), abs=1e-7)
    assert torch.isfinite(dirty_lp.grad).all()
    assert torch.allclose(dirty_lp.grad, clean_lp.grad, atol=1e-7)
    assert (dirty_lp.grad[pad] == 0).all()
    assert torch.isfinite(stats["gated_ratio"]).all()


@pytest.mark.parametrize("fn", [fiberpo_loss, grpo_loss, gspo_loss])
def test_an_empty_trajectory_is_left_out_of_the_mean_over_trajectories(fn):
    """|T_j| = 0: the trajectory has no tokens, so its (1/|T_j|) sum is an empty sum; J averages over the
    trajectories that have a response. Adding an empty row changes neither the loss nor any gradient, and
    a batch of only empty rows gives loss 0 with zero gradients, not NaN."""
    old, adv, mask = _inputs()
    lp = (old + 0.05).requires_grad_()
    ref, _ = fn(lp, old, adv, mask)
    ref.backward()
    lp2 = torch.cat([old + 0.05, torch.zeros(1, T)]).requires_grad_()
    loss, _ = fn(lp2, torch.cat([old, torch.full((1, T), float("-inf"))]), torch.cat([adv, torch.ones(1, T)]),
                 torch.cat([mask, torch.zeros(1, T)]))
    loss.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-7)
    assert torch.allclose(lp2.grad[:B], lp.grad, atol=1e-7) and (lp2.grad[B] == 0).all()
    empty = torch.zeros(2, T, requires_grad=True)
    loss, _ = fn(empty, torch.zeros(2, T), torch.ones(2, T), torch.zeros(2, T))
    loss.backward()
    assert loss.item() == 0.0 and (empty.grad == 0).all()


def test_gspo_clips_the_sequence_ratio_asymmetrically_at_its_papers_defaults():
    old = torch.zeros(2, 4)
    # sequence log-ratios 3.5e-4 (inside 1 + 4e-4) and -3.5e-4 (outside 1 - 3e-4)
    lp = torch.tensor([[3.5e-4] * 4, [-3.5e-4] * 4], requires_grad=True)
    adv = torch.tensor([[1.0] * 4, [-1.0] * 4])
    loss, stats = gspo_loss(lp, old, adv, torch.ones(2, 4))
    loss.backward()
    assert (lp.grad[0] != 0).all()   # inside [1 - 3e-4, 1 + 4e-4]: the ordinary gradient
    assert (lp.grad[1] == 0).all()   # below 1 - 3e-4 with A < 0: clipped, no gradient
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
