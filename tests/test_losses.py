"""The preference losses against numbers worked out by hand.

Convention in the comments: ``h`` is the log-ratio margin
``(π_c - ref_c) - (π_r - ref_r)``; ``σ(1) = 0.7310585786300049``, ``-log σ(1) = log(1 + e⁻¹) =
0.31326168751822286`` and ``-log σ(-1) = 1 + 0.31326168751822286`` (since
``log σ(-x) = log σ(x) - x``).
"""

from __future__ import annotations

import math

import pytest
import torch

from cai.train.losses import (
    IGNORE_INDEX,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    mean_sequence_logps,
    orpo_loss,
    sequence_logps,
    simpo_loss,
    soft_dpo_loss,
    token_logps,
)

NLS1 = 0.31326168751822286  # -log σ(1)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Three pairs, ref log-probs all -2:
#   pair 0: π_c = -1, π_r = -3 → log-ratios +1, -1 → h = 2
#   pair 1: π_c = -2, π_r = -2 → h = 0
#   pair 2: π_c = -3, π_r = -1 → h = -2
POLICY_C, POLICY_R = t(-1, -2, -3), t(-3, -2, -1)
REF_C, REF_R = t(-2, -2, -2), t(-2, -2, -2)


def test_dpo():
    """β = 0.5: βh = 1, 0, -1 → -log σ(1), log 2, -log σ(-1) = 1 + -log σ(1).
    Rewards β(π - ref): chosen 0.5, 0, -0.5; rejected -0.5, 0, 0.5."""
    out = dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5)
    torch.testing.assert_close(out.losses, t(NLS1, math.log(2), 1 + NLS1))
    torch.testing.assert_close(out.chosen_rewards, t(0.5, 0, -0.5))
    torch.testing.assert_close(out.rejected_rewards, t(-0.5, 0, 0.5))


def test_soft_dpo():
    """β = 0.5, targets p = 0.75, 0.5, 1:
    pair 0 (βh = 1): 0.75·(-log σ(1)) + 0.25·(1 + -log σ(1)) = -log σ(1) + 0.25;
    pair 1 (βh = 0): log 2 whatever p;  pair 2 (βh = -1, p = 1): 1 + -log σ(1), as DPO."""
    out = soft_dpo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5, p_chosen=t(0.75, 0.5, 1.0))
    torch.testing.assert_close(out.losses, t(NLS1 + 0.25, math.log(2), 1 + NLS1))


def test_soft_dpo_with_p_one_equals_dpo():
    gen = torch.Generator().manual_seed(0)
    logps = [-10 * torch.rand(16, generator=gen, dtype=torch.float64) for _ in range(4)]
    soft = soft_dpo_loss(*logps, beta=0.1, p_chosen=torch.ones(16, dtype=torch.float64))
    hard = dpo_loss(*logps, beta=0.1)
    for a, b in zip(soft, hard, strict=True):
        torch.testing.assert_close(a, b)


def test_soft_dpo_is_minimal_where_the_preference_probability_equals_the_target():
    """d/dh [-p log σ(βh) - (1-p) log σ(-βh)] = β(σ(βh) - p): zero at σ(βh) = p.
    With β = 0.5, h = 2 (βh = 1), p = σ(1) the gradient vanishes."""
    chosen = t(-1).requires_grad_()
    out = soft_dpo_loss(chosen, t(-3), t(-2), t(-2), beta=0.5, p_chosen=torch.sigmoid(t(1)))
    out.losses.sum().backward()
    torch.testing.assert_close(chosen.grad, t(0.0))


def test_ipo():
    """β = τ = 0.25: target margin 1/(2τ) = 2; h = 2, 0, -2 → (0)², (-2)², (-4)² = 0, 4, 16."""
    out = ipo_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.25)
    torch.testing.assert_close(out.losses, t(0, 4, 16))
    torch.testing.assert_close(out.chosen_rewards, t(0.25, 0, -0.25))


def test_hinge():
    """β = 0.5: max(0, 1 - βh) for βh = 1, 0, -1 → 0, 1, 2."""
    out = hinge_loss(POLICY_C, POLICY_R, REF_C, REF_R, beta=0.5)
    torch.testing.assert_close(out.losses, t(0, 1, 2))


def test_orpo():
    """ℓ_w = log 0.5: odds 0.5/0.5 = 1, log odds 0.  ℓ_l = log 0.2: odds 0.2/0.8, log odds -log 4.
    Odds-ratio term: log σ(log 4) = log(4/5).  λ = β = 0.1:
    loss = -ℓ_w - 0.1·log 0.8 = log 2 - 0.1·log 0.8 = 0.7154615356913663.
    Rewards βℓ: 0.1·log 0.5, 0.1·log 0.2."""
    out = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), beta=0.1)
    torch.testing.assert_close(out.losses, t(math.log(2) - 0.1 * math.log(0.8)))
    assert out.losses.item() == pytest.approx(0.7154615356913663)
    torch.testing.assert_close(out.chosen_rewards, t(0.1 * math.log(0.5)))
    torch.testing.assert_close(out.rejected_rewards, t(0.1 * math.log(0.2)))


def test_orpo_is_finite_near_certainty():
    """ℓ close to 0 (p → 1): log(1 - e^ℓ) must not round to log 0."""
    out = orpo_loss(t(-1e-9), t(-50.0), beta=0.1)
    assert torch.isfinite(out.losses).all()


def test_simpo():
    """β = 2, γ = 0.5, ℓ_w = -0.5, ℓ_l = -1: 2·(-0.5) - 2·(-1) - 0.5 = 0.5;
    loss = -log σ(0.5) = log(1 + e^-0.5) = 0.47407698418010663. Rewards βℓ: -1, -2."""
    out = simpo_loss(t(-0.5), t(-1.0), beta=2.0, gamma=0.5)
    torch.testing.assert_close(out.losses, t(0.47407698418010663))
    torch.testing.assert_close(out.chosen_rewards, t(-1.0))
    torch.testing.assert_close(out.rejected_rewards, t(-2.0))


def test_kto():
    """β = 0.5, KL estimate z0 = 1.
    desirable r = 3: 1 - σ(0.5·(3 - 1)) = 1 - σ(1) = 0.2689414213699951, λ_D = 2 → 0.5378828427399902;
    undesirable r = -1: 1 - σ(0.5·(1 - (-1))) = 1 - σ(1), λ_U = 1 → 0.2689414213699951.
    Rewards βr = 1.5, -0.5."""
    losses, rewards = kto_loss(
        t(-1, -4), t(-4, -3), torch.tensor([True, False]), t(1.0), 0.5, desirable_weight=2.0
    )
    torch.testing.assert_close(losses, t(2 * 0.2689414213699951, 0.2689414213699951))
    torch.testing.assert_close(rewards, t(1.5, -0.5))


def test_kto_clamps_a_negative_kl_estimate_and_passes_no_gradient_through_it():
    """z0 = max(-5, 0) = 0; desirable r = 2 → 1 - σ(0.5·2) = 1 - σ(1)."""
    kl = t(-5.0).requires_grad_()
    losses, _ = kto_loss(t(0.0), t(-2.0), torch.tensor([True]), kl, 0.5)
    torch.testing.assert_close(losses, t(1 - 0.7310585786300049))
    assert not losses.requires_grad


def test_sequence_logps():
    """Vocabulary of 2. Logits at position 0 are [0, 0] (p = 1/2 each), at position 1 [0, log 3]
    (p(token 1) = 3/4). Labels [0, 1, 1]: token 1 is scored by position 0 (log 1/2), token 2 by
    position 1 (log 3/4). Mask [0, 1, 1]: sum log(3/8) = -0.9808292530117262, mean half of it;
    mask [0, 0, 1]: log 3/4."""
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]]).repeat(2, 1, 1)
    labels = torch.tensor([[0, 1, 1], [0, 1, 1]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    torch.testing.assert_close(
        sequence_logps(logits, labels, mask), torch.tensor([math.log(3 / 8), math.log(3 / 4)])
    )
    torch.testing.assert_close(
        mean_sequence_logps(logits, labels, mask),
        torch.tensor([math.log(3 / 8) / 2, math.log(3 / 4)]),
    )


def test_token_logps_ignores_masked_labels():
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[1, IGNORE_INDEX, 2]])
    torch.testing.assert_close(token_logps(logits, labels), torch.tensor([[0.0, math.log(1 / 4)]]))


def test_token_logps_computes_in_float32_from_bf16_logits():
    logits = torch.randn(2, 5, 7).bfloat16()
    labels = torch.randint(0, 7, (2, 5))
    out = token_logps(logits, labels)
    assert out.dtype == torch.float32
    expected = logits.float().log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:, None])[..., 0]
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    "name, call",
    [
        ("dpo", lambda c, r, rc, rr: dpo_loss(c, r, rc, rr, 0.1)),
        ("soft_dpo", lambda c, r, rc, rr: soft_dpo_loss(c, r, rc, rr, 0.1, torch.full((5,), 0.8))),
        ("ipo", lambda c, r, rc, rr: ipo_loss(c, r, rc, rr, 0.1)),
        ("hinge", lambda c, r, rc, rr: hinge_loss(c, r, rc, rr, 0.1)),
        ("orpo", lambda c, r, rc, rr: orpo_loss(c, r, 0.1)),
        ("simpo", lambda c, r, rc, rr: simpo_loss(c, r, 2.0, 0.5)),
    ],
)
def test_pair_loss_shapes_and_gradients(name, call):
    """(B,) losses that carry gradient to the policy; (B,) detached rewards."""
    chosen = (-torch.rand(5)).requires_grad_()
    rejected = (-torch.rand(5)).requires_grad_()
    out = call(chosen, rejected, -torch.rand(5), -torch.rand(5))
    assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (5,)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    out.losses.sum().backward()
    assert chosen.grad is not None and rejected.grad is not None


def test_kto_shapes():
    logps = (-torch.rand(6)).requires_grad_()
    losses, rewards = kto_loss(logps, -torch.rand(6), torch.arange(6) < 3, torch.tensor(0.1), 0.1)
    assert losses.shape == rewards.shape == (6,)
    assert not rewards.requires_grad
    losses.sum().backward()
    assert logps.grad is not None
