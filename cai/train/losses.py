"""Preference losses: pure functions of per-sequence log-probabilities.

Every loss takes the summed (or, where the method says so, length-averaged) log-probability of
each response, as :func:`sequence_logps` / :func:`mean_sequence_logps` compute them from logits,
and returns per-example values; the trainer takes the mean. Nothing here touches a model, so each
formula is tested against numbers worked out by hand (``tests/test_losses.py``).

Notation: ``B`` pairs; ``h = (log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))``
is the difference of the log-ratios of the chosen (``y_w``) and rejected (``y_l``) responses.

Losses for pairs return a :class:`PairLoss`: the per-pair loss and the implicit rewards the method
assigns to each response (detached; they are for logging and reward accuracy).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Label of a position that is not scored (prompt and padding), as in transformers."""


class PairLoss(NamedTuple):
    """Per-pair output of a preference loss; every field has shape ``(B,)``."""

    losses: Tensor
    """The loss of each pair (differentiable)."""
    chosen_rewards: Tensor
    """The method's implicit reward of the chosen response (detached)."""
    rejected_rewards: Tensor
    """The method's implicit reward of the rejected response (detached)."""


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label token under the logits of the position before it.

    Args:
        logits: ``(B, T, V)`` the model's output for ``input_ids`` of shape ``(B, T)``.
        labels: ``(B, T)`` usually ``input_ids``; positions set to ``IGNORE_INDEX`` give 0.

    Returns:
        ``(B, T - 1)``: entry ``t`` is ``log p(labels[t + 1] | tokens ≤ t)``, computed in float32.
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    scored = labels != IGNORE_INDEX
    # gather - logsumexp: the same number as log_softmax at the label, without a second (B, T, V).
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked - logits.logsumexp(-1)) * scored


def sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probability of the scored tokens of each sequence: ``Σ_t mask_t log p(y_t | y_<t)``.

    Args:
        logits: ``(B, T, V)`` the model's output for ``labels`` (the input ids), ``(B, T)``.
        labels: ``(B, T)`` token ids.
        mask: ``(B, T)`` 1 (or True) on the tokens to score, aligned with ``labels``; position 0
            has no logits before it and must be 0.

    Returns:
        ``(B,)`` float32.
    """
    return (token_logps(logits, labels) * mask[:, 1:]).sum(-1)


def mean_sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Length-averaged log-probability ``(1/|y|) Σ_t mask_t log p(y_t | y_<t)`` (SimPO, ORPO, IPO).

    Same arguments as :func:`sequence_logps`; a sequence with no scored token gives 0.
    """
    return sequence_logps(logits, labels, mask) / mask[:, 1:].sum(-1).clamp(min=1)


def _log_ratios(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor
) -> tuple[Tensor, Tensor]:
    return policy_chosen - ref_chosen, policy_rejected - ref_rejected


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> PairLoss:
    """DPO, the sigmoid loss: ``-log σ(β h)``.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model" (eq. 7). Rewards ``β (log π - log π_ref)``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(B,)`` summed log-probs.
        beta: the KL strength β (typically 0.1).
    """
    return soft_dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, torch.ones_like(ref_chosen)
    )


def soft_dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
    p_chosen: Tensor,
) -> PairLoss:
    """Soft-label DPO: ``-p log σ(β h) - (1 - p) log σ(-β h)``, the target ``p`` per pair.

    The cross-entropy of the Bradley-Terry preference probability ``σ(β h)`` against a soft target:
    the judge's ``p_chosen``. With ``p = 1 - ε`` for every pair it is conservative DPO / label
    smoothing (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO");
    ``p = 1`` is :func:`dpo_loss`. Its minimum is at ``σ(β h) = p``, so uncertain judgements pull
    the margin toward zero instead of pushing it without bound. Rewards ``β (log π - log π_ref)``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(B,)`` summed log-probs.
        beta: the KL strength β.
        p_chosen: ``(B,)`` probability in [0, 1] that the chosen response is better.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    logits = beta * (chosen - rejected)
    losses = -p_chosen * F.logsigmoid(logits) - (1 - p_chosen) * F.logsigmoid(-logits)
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def ipo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> PairLoss:
    """IPO: ``(h - 1 / (2β))²``, a squared loss that regresses the margin to a finite target.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (eq. 17, β is their τ). Pass length-averaged log-probs
    (:func:`mean_sequence_logps`) for the per-token form the authors' results use. Rewards
    ``β (log π - log π_ref)``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(B,)`` log-probs.
        beta: the regularisation τ; the target margin is ``1 / (2τ)``.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def hinge_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float,
) -> PairLoss:
    """Hinge: ``max(0, 1 - β h)``, zero once the margin reaches ``1/β``.

    The SLiC calibration loss with the reference log-ratio (Zhao et al. 2023, "SLiC-HF: Sequence
    Likelihood Calibration with Human Feedback"; the normalised form in Liu et al. 2024, RSO).
    Rewards ``β (log π - log π_ref)``.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: ``(B,)`` summed log-probs.
        beta: β; the margin target is ``1/β``.
    """
    chosen, rejected = _log_ratios(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * (chosen - rejected))
    return PairLoss(losses, beta * chosen.detach(), beta * rejected.detach())


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for large ``-x`` (Mächler 2012)."""
    return torch.where(
        x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))
    )


def orpo_loss(policy_chosen_mean: Tensor, policy_rejected_mean: Tensor, beta: float) -> PairLoss:
    """ORPO (reference-free): ``-ℓ_w - β log σ(log odds(y_w) - log odds(y_l))``.

    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"
    (eq. 6-7, β is their λ). ``ℓ`` is the length-averaged log-prob, ``odds(y) = e^ℓ / (1 - e^ℓ)``,
    so ``log odds(y) = ℓ - log(1 - e^ℓ)``; ``-ℓ_w`` is the SFT term on the chosen response.
    Rewards ``β ℓ``.

    Args:
        policy_chosen_mean, policy_rejected_mean: ``(B,)`` length-averaged log-probs (< 0).
        beta: weight λ of the odds-ratio term (the paper uses 0.1).
    """
    log_odds = (policy_chosen_mean - _log1mexp(policy_chosen_mean)) - (
        policy_rejected_mean - _log1mexp(policy_rejected_mean)
    )
    losses = -policy_chosen_mean - beta * F.logsigmoid(log_odds)
    return PairLoss(
        losses, beta * policy_chosen_mean.detach(), beta * policy_rejected_mean.detach()
    )


def simpo_loss(
    policy_chosen_mean: Tensor, policy_rejected_mean: Tensor, beta: float, gamma: float
) -> PairLoss:
    """SimPO (reference-free): ``-log σ(β ℓ_w - β ℓ_l - γ)``.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"
    (eq. 6). ``ℓ`` is the length-averaged log-prob; γ is the target reward margin. Rewards ``β ℓ``.

    Args:
        policy_chosen_mean, policy_rejected_mean: ``(B,)`` length-averaged log-probs.
        beta: reward scale β (the paper uses 2.0-2.5).
        gamma: margin γ (the paper uses about 0.5-1.6; γ/β ≈ 0.5).
    """
    chosen, rejected = beta * policy_chosen_mean, beta * policy_rejected_mean
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return PairLoss(losses, chosen.detach(), rejected.detach())


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO for single-label data: each response is only marked desirable or undesirable.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (eq. 8).
    With ``r = log π(y|x) - log π_ref(y|x)`` and the reference point ``z0 = max(kl, 0)``::

        desirable:    λ_D (1 - σ(β (r - z0)))
        undesirable:  λ_U (1 - σ(β (z0 - r)))

    ``kl`` estimates ``KL(π ‖ π_ref)``; the paper takes the batch mean of ``r`` on mismatched
    (prompt, response) pairs, detached, so that it shifts the reference point but carries no
    gradient. It is detached here too.

    Args:
        policy_logps, ref_logps: ``(N,)`` summed log-probs of the N responses.
        desirable: ``(N,)`` bool, True where the response is desirable.
        kl: scalar tensor, the KL estimate in log-ratio units.
        beta: β (the paper uses 0.1).
        desirable_weight, undesirable_weight: λ_D, λ_U (balance them when the classes are unequal).

    Returns:
        ``(losses, rewards)``, both ``(N,)``; ``rewards = β r`` (detached).
    """
    ratio = policy_logps - ref_logps
    z0 = kl.detach().clamp(min=0)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    return losses, beta * ratio.detach()


__all__ = [
    "IGNORE_INDEX",
    "PairLoss",
    "dpo_loss",
    "hinge_loss",
    "ipo_loss",
    "kto_loss",
    "mean_sequence_logps",
    "orpo_loss",
    "sequence_logps",
    "simpo_loss",
    "soft_dpo_loss",
    "token_logps",
]
