"""Unpaired data: (prompt, completion, desirable) rows, with a reference model.

Signature: ``(policy_logps, ref_logps, labels, *, beta, ...)``, tensors (B,), ``labels`` bool (True =
desirable). ``losses`` is (B,) in row order; the rewards are those of the desirable rows (n_D,) and of the
undesirable rows (n_U,).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from dpolab.losses.registry import LossOutput, Tensor, register


def _split_rewards(beta: float, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    r = beta * h.detach()
    return r[labels], r[~labels]


class KTOWeightAdvice(NamedTuple):
    ratio: float  # λ_D·n_D / (λ_U·n_U)
    ok: bool  # the ratio is in [1, 4/3]
    desirable_weight_range: tuple[float, float]  # λ_D putting the ratio in range, λ_U fixed
    undesirable_weight_range: tuple[float, float]  # λ_U putting the ratio in range, λ_D fixed


def kto_weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> KTOWeightAdvice:
    """Check KTO's weights against the label balance: the paper advises ``λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]``.

    Returns the ratio, whether it is in range, and the range for either weight with the other fixed
    (change one of them, not both). TRL 1.16 warns only when n_D ≠ n_U (and uses 1.33 for 4/3); this helper
    flags any ratio out of range.
    """
    n_d, n_u = max(int(n_desirable), 1), max(int(n_undesirable), 1)
    ratio = desirable_weight * n_d / (undesirable_weight * n_u)
    return KTOWeightAdvice(
        ratio=ratio,
        ok=1.0 <= ratio <= 4 / 3 + 1e-12,
        desirable_weight_range=(undesirable_weight * n_u / n_d, 4 / 3 * undesirable_weight * n_u / n_d),
        undesirable_weight_range=(desirable_weight * n_d / (4 / 3 * n_u), desirable_weight * n_d / n_u),
    )


def kto_kl_estimate(kl_policy_logps: Tensor, kl_ref_logps: Tensor) -> Tensor:
    """KTO's reference point ``z = max(0, mean(π(y'|x) − ref(y'|x)))`` over mismatched pairs, detached.

    Under data parallelism gather both tensors from every process first (TRL averages over processes
    before the clamp). This value is also the ``kl`` metric.
    """
    return (kl_policy_logps - kl_ref_logps).detach().mean().clamp(min=0)


def kto_label_warning(n_desirable: int, n_undesirable: int, *, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0) -> str | None:
    """KTO's ``label_advice``: a warning when :func:`kto_weight_advice` finds the weights a poor fit."""
    advice = kto_weight_advice(n_desirable, n_undesirable, desirable_weight, undesirable_weight)
    if advice.ok:
        return None
    lo, hi = advice.desirable_weight_range
    return (f"KTO: {n_desirable} desirable and {n_undesirable} undesirable rows give λ_D·n_D/(λ_U·n_U) = "
            f"{advice.ratio:.2f}, outside the advised [1, 4/3]; try --desirable-weight between {lo:.2f} and {hi:.2f}")


@register("kto", data="unpaired", needs_kl=True, batch_coupled=True, label_advice=kto_label_warning,
          params=("desirable_weight", "undesirable_weight"), trl_name="KTOTrainer loss_type='kto'",
          paper="Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization",
          pick_when="Thumbs up / thumbs down data (no pairs), or very imbalanced good/bad counts; weight the "
                    "rarer side (see kto_weight_advice).",
          pinned_by=(("TRL 1.16's KTOTrainer loss code (value and gradient)",
            'tests/test_losses_trl.py::test_kto_matches_trl'),))
def kto(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, *, beta: float, kl_policy_logps: Tensor,
        kl_ref_logps: Tensor, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> LossOutput:
    """KTO: with ``h = π − ref`` and the reference point ``z`` (:func:`kto_kl_estimate`):
    desirable ``λ_D·(1 − σ(β(h − z)))``, undesirable ``λ_U·(1 − σ(β(z − h)))``.

    Ethayarajh et al. 2024, eq. 7. z is estimated from mismatched (prompt, completion) pairs of the batch
    (``kl_policy_logps``, ``kl_ref_logps``: TRL pairs prompt i with completion i−1) and never
    differentiated. TRL 1.16: same formula and defaults (λ_D = λ_U = 1, β = 0.1); TRL orders the losses
    desirable first, dpolab keeps row order, so the mean is the same.
    """
    labels = labels.to(torch.bool)
    h = policy_logps - ref_logps  # (B,)
    z = kto_kl_estimate(kl_policy_logps, kl_ref_logps)
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (h - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - h)))
    return torch.where(labels, desirable, undesirable), *_split_rewards(beta, h, labels)


@register("bco", data="unpaired", state=("delta",),
          paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment",
          pick_when="Thumbs up / thumbs down data: a logistic classifier on the implicit reward, with the "
                    "running reward mean as threshold.",
          pinned_by=(('calculus and optimisation: a calibrated classifier with its boundary at βh = δ',
            'tests/test_losses_properties.py::test_bco_is_a_calibrated_classifier_with_its_boundary_at_delta'),))
def bco(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, *, beta: float,
        delta: float | Tensor = 0.0) -> LossOutput:
    """BCO: desirable ``−logσ(βh − δ)``, undesirable ``−logσ(−(βh − δ))``; δ = running mean of βh.

    Jung et al. 2024. δ is state the trainer keeps with :func:`update_running_mean` (fed every
    batch's detached rewards before the loss, as the paper's reward shift); it defaults to 0 and is treated
    as a constant. Not in TRL 1.16 (its BCOTrainer was removed; the paper's density-ratio re-weighting of
    prompts (UDM) is not implemented here either).
    """
    labels = labels.to(torch.bool)
    h = policy_logps - ref_logps
    delta = torch.as_tensor(delta, dtype=h.dtype, device=h.device).detach()
    s = beta * h - delta
    return torch.where(labels, -F.logsigmoid(s), -F.logsigmoid(-s)), *_split_rewards(beta, h, labels)
