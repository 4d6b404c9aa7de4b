"""Paired losses with a reference model: one chosen and one rejected completion per prompt.

Notation (SPEC §1): ``π_c, π_r`` summed completion log-probs of the policy, ``ref_c, ref_r`` of the
reference, ``h = π − ref``, ``Δ = h_c − h_r``, ``Δ̄ = h_c/n_c − h_r/n_r``. Every tensor is (B,).
A reference-free run of any of these passes ``ref_c = ref_r = 0``. The losses that also read a score gap,
the lengths in the margin, or absolute targets (odpo, rdpo, dpop, cal_dpo, rebel) are in
:mod:`dpolab.losses.margins`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dpolab.losses.registry import TRL_DPO_CODE, LossOutput, Tensor, register, rewards


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return pc - rc, pr - rr  # h_c, h_r: (B,)


def _per_token(h: Tensor, lengths: Tensor) -> Tensor:
    return h / lengths.to(h.dtype).clamp(min=1.0)


@register("sigmoid", params=("label_smoothing",), trl_name="DPOTrainer loss_type='sigmoid'", f_divergence=True,
          paper="Rafailov et al. 2023, Direct Preference Optimization (cDPO: Mitchell 2023)",
          pick_when="The default for paired preferences (prompt, chosen, rejected); with label_smoothing > 0 "
                    "(cDPO) when some labels are likely flipped.",
          pinned_by=(TRL_DPO_CODE,
           ('the closed-form gradient −β·σ(−βΔ)',
            'tests/test_losses.py::test_dpo_gradient_closed_form'),
           ('optimisation: the tabular optimum π_ref·exp(r/β)/Z',
            'tests/test_losses_optimum.py::test_dpo_population_minimiser_is_the_closed_form'),
           ('optimisation: cDPO (ε > 0) stops at βΔ = log((1−ε)/ε)',
            'tests/test_losses_optimum.py::test_cdpo_optimum_stops_at_log_odds_of_the_label_noise'),
           ('calculus: the β limits (gradient −β/2 at π_ref)',
            'tests/test_losses_properties.py::test_dpo_beta_limits')))
def sigmoid(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
            ref_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """DPO: ``L = −logσ(βΔ)``; with label smoothing ε > 0, conservative DPO:
    ``L = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)``.

    Rafailov et al. 2023, eq. 7; cDPO from the authors' note on noisy labels (ε = assumed flip rate).
    With ε > 0 a pair's optimum is finite: ``βΔ* = log((1−ε)/ε)`` (ε = 0.1: 2.197) instead of +∞.
    TRL 1.16: same formula at ε = 0, but TRL's ``sigmoid`` silently ignores ``label_smoothing``; dpolab
    honours it (cDPO).

    The β limits: the optimum ``π* ∝ π_ref·exp(r/β)`` tends to π_ref as β → ∞ and to the best answer as
    β → 0, but the gradient at π = π_ref does not vanish for large β: ``∂L/∂Δ = −β·σ(−βΔ)`` is −β/2 at
    Δ = 0, so a large β takes large first steps towards a nearby optimum (and saturates once βΔ ≫ 1);
    a small β pushes weakly (−β/2) towards a far one.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (h_c - h_r)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, *rewards(beta, h_c, h_r)


@register("robust", params=("label_smoothing",), trl_name="DPOTrainer loss_type='robust'", f_divergence=True,
          paper="Chowdhury et al. 2024, Provably Robust DPO",
          pick_when="Noisy preference labels with a known flip rate ε (label_smoothing, e.g. 0.1): an unbiased "
                    "estimate of the clean DPO loss.",
          pinned_by=(TRL_DPO_CODE,))
def robust(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
           ref_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO: ``L = [−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε)``, 0 ≤ ε < 0.5 (``label_smoothing``).

    Chowdhury et al. 2024. The loss is an unbiased estimator of DPO under symmetric label noise ε.
    TRL 1.16: same formula and default (ε = 0, where it equals DPO); TRL only warns for ε ∉ [0, 0.5),
    dpolab raises (the division by 1−2ε is meaningless there).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (h_c - h_r)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return losses, *rewards(beta, h_c, h_r)


@register("hinge", trl_name="DPOTrainer loss_type='hinge'", f_divergence=True,
          paper="Zhao et al. 2023, SLiC-HF",
          pick_when="A margin loss: stops pushing a pair once βΔ ≥ 1; less over-optimisation on easy pairs.",
          pinned_by=(TRL_DPO_CODE,))
def hinge(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
          ref_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """SLiC hinge: ``L = max(0, 1 − βΔ)`` (β plays the inverse margin 1/δ).

    Zhao et al. 2023 (SLiC-HF), the calibration loss with the reference log-ratio. TRL 1.16: same.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (h_c - h_r))
    return losses, *rewards(beta, h_c, h_r)


@register("ipo", needs_lengths=True, trl_name="DPOTrainer loss_type='ipo'", f_divergence=True,
          paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences",
          pick_when="Small data (a few hundred pairs) or near-deterministic preferences, where DPO "
                    "over-fits: IPO regresses the per-token margin Δ̄ to a finite target 1/(2β).",
          pinned_by=(TRL_DPO_CODE,))
def ipo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor, *, beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor) -> LossOutput:
    """IPO: ``L = (Δ̄ − 1/(2β))²`` with the per-token ``Δ̄ = h_c/n_c − h_r/n_r``; β plays the paper's τ.

    The target 1/(2β) is per token: the optimum puts the difference of the MEAN per-token log-ratios at
    1/(2β) (β = 0.1: 5 nats per token), not the summed Δ. Azar et al. 2023, eq. 17. Deviation: the per-token
    normalisation is not in the paper's equation (there Δ is summed and the target 1/(2τ) is per sequence);
    the authors confirmed to TRL that their results use it. TRL 1.16: same (lengths clamped to ≥ 1).
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta_bar = _per_token(h_c, chosen_lengths) - _per_token(h_r, rejected_lengths)
    losses = (delta_bar - 1 / (2 * beta)) ** 2
    return losses, *rewards(beta, h_c, h_r)


@register("sigmoid_norm", needs_lengths=True, trl_name="DPOTrainer loss_type='sigmoid_norm'", f_divergence=True,
          paper="Length-normalised DPO (as in SimPO's ablations, Meng et al. 2024)",
          pick_when="DPO when chosen answers are systematically longer than rejected ones and you want to "
                    "remove the length incentive; needs a larger β (the margin is per token).",
          pinned_by=(TRL_DPO_CODE,))
def sigmoid_norm(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, *, beta: float, chosen_lengths: Tensor,
                 rejected_lengths: Tensor) -> LossOutput:
    """Length-normalised DPO: ``L = −logσ(βΔ̄)``, ``Δ̄ = h_c/n_c − h_r/n_r``. TRL 1.16: same."""
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta_bar = _per_token(h_c, chosen_lengths) - _per_token(h_r, rejected_lengths)
    return -F.logsigmoid(beta * delta_bar), *rewards(beta, h_c, h_r)


@register("exo_pair", params=("exo_epsilon",), trl_name="DPOTrainer loss_type='exo_pair'", f_divergence=True,
          paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (EXO)",
          pick_when="Mode-seeking alternative to DPO (reverse KL to the preference distribution); pairs data.",
          pinned_by=(TRL_DPO_CODE,))
def exo_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float, exo_epsilon: float = 1e-3) -> LossOutput:
    """EXO-pref: with ``q = σ(βΔ)`` and label smoothing ε > 0 (``exo_epsilon``):
    ``L = q·(log q − log(1−ε)) + (1−q)·(log(1−q) − log ε)``, i.e. KL(q ‖ (1−ε, ε)).

    Ji et al. 2024, eq. 16 with K = 2. TRL 1.16: same formula, but TRL reads ε from ``label_smoothing``
    and refuses its default 0; dpolab names it ``exo_epsilon`` with the paper's 1e-3 as default, so that
    ``label_smoothing`` keeps one meaning (the flip rate of cDPO/robust).
    """
    if not 0.0 < exo_epsilon < 1.0:
        raise ValueError(f"exo_pair needs 0 < exo_epsilon < 1, got {exo_epsilon}")
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (h_c - h_r)
    q_w, q_l = torch.sigmoid(z), torch.sigmoid(-z)
    losses = (q_w * (F.logsigmoid(z) - math.log1p(-exo_epsilon))
              + q_l * (F.logsigmoid(-z) - math.log(exo_epsilon)))
    return losses, *rewards(beta, h_c, h_r)


@register("nca_pair", trl_name="DPOTrainer loss_type='nca_pair'",
          paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards",
          pick_when="When DPO lowers the chosen likelihood too: NCA scores each answer on its own and keeps "
                    "the chosen log-prob from falling.",
          pinned_by=(TRL_DPO_CODE,))
def nca_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """NCA (pairwise): ``L = −logσ(βh_c) − ½·logσ(−βh_c) − ½·logσ(−βh_r)``.

    Chen et al. 2024, the NCA loss for K = 2 responses. TRL 1.16: same.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    r_c, r_r = beta * h_c, beta * h_r
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return losses, *rewards(beta, h_c, h_r)


@register("bco_pair", state=("delta",), trl_name="DPOTrainer loss_type='bco_pair'",
          paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment",
          pick_when="Pairs treated as two independent thumbs (up for chosen, down for rejected); a bridge to "
                    "BCO on unpaired data, and one term of MPO.",
          pinned_by=(TRL_DPO_CODE,))
def bco_pair(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float, delta: float | Tensor = 0.0) -> LossOutput:
    """BCO on pairs: ``L = −logσ(βh_c − δ) − logσ(−(βh_r − δ))``.

    Jung et al. 2024 (the reward shift δ). ``delta`` = 0 by default, which is TRL 1.16's
    ``bco_pair`` exactly. The paper's δ is the running mean of the rewards βh seen so far: the trainer keeps
    it with :func:`dpolab.losses.update_running_mean` (fed the batch's detached rewards, chosen and
    rejected, before the loss) and passes it here; it is treated as a constant (detached).
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    delta = torch.as_tensor(delta, dtype=h_c.dtype, device=h_c.device).detach()
    losses = -F.logsigmoid(beta * h_c - delta) - F.logsigmoid(-(beta * h_r - delta))
    return losses, *rewards(beta, h_c, h_r)


@register("sppo_hard", trl_name="DPOTrainer loss_type='sppo_hard'",
          paper="Wu et al. 2024, Self-Play Preference Optimization (hard-label variant)",
          pick_when="Iterative self-play rounds with a winner and a loser; regresses each log-ratio to ±1/(2β).",
          pinned_by=(TRL_DPO_CODE,))
def sppo_hard(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
              ref_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """SPPO with hard win probabilities (P = 1 for the winner, 0 for the loser):
    ``L = (h_c − 1/(2β))² + (h_r + 1/(2β))²``.

    Wu et al. 2024, eq. 4.7 with P ∈ {0, 1} (the paper estimates soft P with PairRM). TRL 1.16: same.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h_c - 0.5 / beta) ** 2 + (h_r + 0.5 / beta) ** 2
    return losses, *rewards(beta, h_c, h_r)


def _smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@register("aot", params=("label_smoothing",), batch_coupled=True, row_weights=False,
          trl_name="DPOTrainer loss_type='aot'",
          paper="Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport",
          pick_when="Distributional alignment: the chosen log-ratio distribution should dominate the rejected "
                    "one over the batch; needs large batches.",
          pinned_by=(TRL_DPO_CODE,))
def aot(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (paired): sort over the batch ``u = sort(π_c − π_r)`` and ``v = sort(ref_c − ref_r)``, then the
    smoothed sigmoid loss on ``d = u − v``: ``L_i = −(1−ε)·logσ(βd_i) − ε·logσ(−βd_i)``.

    Melnyk et al. 2024 (first-order stochastic dominance via 1-D optimal transport = sorting). Row i of
    the output is the i-th sorted position, not example i; only the mean is meaningful. TRL 1.16: same.
    """
    u, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    v, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    losses = _smoothed_sigmoid(beta * (u - v), label_smoothing)
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return losses, *rewards(beta, h_c, h_r)


@register("aot_unpaired", params=("label_smoothing",), batch_coupled=True, row_weights=False,
          trl_name="DPOTrainer loss_type='aot_unpaired'",
          paper="Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport",
          pick_when="AOT when the chosen and rejected answers of a row are not really a matched pair.",
          pinned_by=(TRL_DPO_CODE,))
def aot_unpaired(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """AOT (unpaired): sort ``h_c`` and ``h_r`` separately over the batch, ``d = sort(h_c) − sort(h_r)``,
    then ``L_i = −(1−ε)·logσ(βd_i) − ε·logσ(−βd_i)``.

    Melnyk et al. 2024. Row i is the i-th sorted position; only the mean is meaningful. TRL 1.16: same
    (despite the name it takes the paired batch layout).
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    hc_sorted, _ = torch.sort(h_c, dim=0)
    hr_sorted, _ = torch.sort(h_r, dim=0)
    losses = _smoothed_sigmoid(beta * (hc_sorted - hr_sorted), label_smoothing)
    return losses, *rewards(beta, h_c, h_r)


@register("apo_zero", trl_name="DPOTrainer loss_type='apo_zero'",
          paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization (APO-zero)",
          pick_when="The chosen answers are better than what the model writes now: raise chosen, lower rejected.",
          pinned_by=(TRL_DPO_CODE,))
def apo_zero(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """APO-zero: ``L = (1 − σ(βh_c)) + σ(βh_r)``. D'Oosterlinck et al. 2024, eq. 7. TRL 1.16: same."""
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (1 - torch.sigmoid(beta * h_c)) + torch.sigmoid(beta * h_r)
    return losses, *rewards(beta, h_c, h_r)


@register("apo_down", trl_name="DPOTrainer loss_type='apo_down'",
          paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization (APO-down)",
          pick_when="The chosen answers are worse than what the model writes now: lower both, the rejected more.",
          pinned_by=(TRL_DPO_CODE,))
def apo_down(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """APO-down: ``L = σ(βh_c) + (1 − σ(βΔ))``. D'Oosterlinck et al. 2024, eq. 8. TRL 1.16: same."""
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.sigmoid(beta * h_c) + (1 - torch.sigmoid(beta * (h_c - h_r)))
    return losses, *rewards(beta, h_c, h_r)


@register("discopop", params=("discopop_tau",), trl_name="DPOTrainer loss_type='discopop'", f_divergence=True,
          paper="Chan et al. 2024, Discovering Preference Optimization Algorithms with LLMs (DiscoPOP / LRML)",
          pick_when="A discovered blend of the logistic and exponential losses; a drop-in for DPO on pairs.",
          pinned_by=(TRL_DPO_CODE,))
def discopop(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float, discopop_tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): ``z = βΔ``, ``m = σ(z/τ)``,
    ``L = (1 − m)·(−logσ(z)) + m·e^{−z}``, τ = 0.05 (``discopop_tau``).

    Chan et al. 2024, eq. 5. The loss is non-convex near z = 0: there dL/dz = −¾ + (1 − ln 2)/(4τ) > 0 for
    τ = 0.05, so at policy = reference its gradient lowers the margin (for z in about (−0.12, 0.08));
    outside that band it raises it. TRL 1.16: same formula and default τ.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    z = beta * (h_c - h_r)
    m = torch.sigmoid(z / discopop_tau)
    losses = (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)
    return losses, *rewards(beta, h_c, h_r)
