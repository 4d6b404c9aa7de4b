"""Paired losses with a reference whose margin βΔ is shifted, penalised or regressed by something beyond the
pair's order: a score gap from the data (odpo, rebel), the lengths (rdpo), the chosen log-prob (dpop), or
absolute targets for each log-ratio (cal_dpo).

Notation (SPEC §1): ``h = π − ref``, ``Δ = h_c − h_r``, ``n`` completion tokens; every tensor is (B,). The
``margin`` data column is the score gap ``s_c − s_r`` (``score_chosen − score_rejected``, or an explicit
``margin`` column; see :class:`dpolab.data.Record`). Not in TRL 1.16; tests/test_losses_properties.py pins
each of them by a property its paper states (docs/losses.md lists which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpolab.losses.registry import LossOutput, Tensor, register, rewards

ODPO_TRANSFORMS = ("log", "identity")


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> tuple[Tensor, Tensor]:
    return pc - rc, pr - rr  # h_c, h_r: (B,)


def _score_gap(margin: Tensor, like: Tensor) -> Tensor:
    return margin.detach().to(device=like.device, dtype=torch.promote_types(like.dtype, torch.float32))


def odpo_offset(score_gap: Tensor, alpha: float, transform: str) -> Tensor:
    """ODPO's offset ``Δ_r = α·f(s_c − s_r)``, f = log (the paper's default) or the identity.

    The chosen answer is the better scored one, so the gap must be > 0 for ``log`` (log 0 = −∞ would make the
    loss 0 whatever the policy, a reversed pair would be NaN) and ≥ 0 for ``identity``; other rows are
    refused with a ValueError naming the value, never clamped (the ODPO authors drop tied pairs from the data).

    >>> odpo_offset(torch.tensor([1.0, 4.0]), 0.5, "log").tolist()  # 0.5·log 1, 0.5·log 4 = log 2
    [0.0, 0.6931471824645996]
    """
    if transform not in ODPO_TRANSFORMS:
        raise ValueError(f"odpo_transform must be one of {', '.join(ODPO_TRANSFORMS)}, got {transform!r}")
    bad = score_gap <= 0 if transform == "log" else score_gap < 0
    if bool(bad.any()):
        raise ValueError(odpo_gap_problem(float(score_gap[bad][0]), odpo_transform=transform))
    return alpha * (torch.log(score_gap) if transform == "log" else score_gap)


def odpo_gap_problem(score_gap: float, *, odpo_alpha: float = 1.0, odpo_transform: str = "log") -> str | None:
    """ODPO's ``margin_check``: why a row's score gap cannot give an offset, or None.

    >>> odpo_gap_problem(0.0) is not None, odpo_gap_problem(0.0, odpo_transform="identity")
    (True, None)
    """
    if score_gap > 0 or (score_gap == 0 and odpo_transform == "identity"):
        return None
    need = "> 0" if odpo_transform == "log" else ">= 0"
    return (f"odpo with odpo_transform={odpo_transform!r} needs a score gap (score_chosen − score_rejected, or the "
            f"margin column) {need} in every row, got {score_gap}: drop tied or reversed pairs"
            + (", or use odpo_transform='identity'" if odpo_transform == "log" else ""))


@register("odpo", columns=("margin",), params=("odpo_alpha", "odpo_transform"), f_divergence=True,
          margin_check=odpo_gap_problem,
          paper="Amini et al. 2024, Direct Preference Optimization with an Offset (ODPO)",
          pick_when="Pairs with graded scores (score_chosen, score_rejected): demand a larger margin where the "
                    "score gap is larger, so strongly preferred pairs are pushed further apart.",
          pinned_by=(("optimisation against the calculus root: the optimum margin exceeds the offset and DPO's",
            'tests/test_losses_properties.py::test_odpo_optimum_margin_exceeds_the_offset_and_dpos'),
           ('hand-worked values and the refusal of gaps log cannot take',
            'tests/test_losses.py::test_odpo_hand')))
def odpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
         ref_rejected_logps: Tensor, *, beta: float, margin: Tensor, odpo_alpha: float = 1.0,
         odpo_transform: str = "log") -> LossOutput:
    """ODPO: ``L = −logσ(βΔ − Δ_r)`` with the offset ``Δ_r = α·f(s_c − s_r)`` (:func:`odpo_offset`);
    α = ``odpo_alpha`` (1.0, the authors' default), f = ``odpo_transform``: ``log`` (the paper's choice) or
    ``identity``. The ``margin`` column is the score gap s_c − s_r, treated as a constant.

    Amini et al. 2024 (the offset loss, and the authors' code, rycolab/odpo ``trainers.py``:
    ``−logsigmoid(β·logits − α·log(r_c − r_r))``). A pair is fitted once βΔ exceeds its offset: at βΔ = Δ_r
    the loss is still ln 2, as DPO's at Δ = 0. Deviation: none in the formula; rows whose gap f cannot take
    (≤ 0 for log, < 0 for identity) are refused instead of giving −∞ or NaN. Not in TRL 1.16.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    offset = odpo_offset(_score_gap(margin, h_c), odpo_alpha, odpo_transform).to(h_c.dtype)
    return -F.logsigmoid(beta * (h_c - h_r) - offset), *rewards(beta, h_c, h_r)


@register("rdpo", needs_lengths=True, params=("rdpo_alpha",), f_divergence=True,
          paper="Park et al. 2024, Disentangling Length from Quality in Direct Preference Optimization (R-DPO)",
          pick_when="DPO is making answers longer: a longer chosen answer needs α per extra token less margin, "
                    "so of two equally good answers the shorter is preferred.",
          pinned_by=(('optimisation: the tabular optimum prefers the shorter answer by exp(−α·Δn/β)',
            'tests/test_losses_optimum.py::test_rdpo_tabular_optimum_prefers_the_shorter_answer'),
           ('hand-worked values',
            'tests/test_losses.py::test_rdpo_hand'),
           ('policy = reference with n_c ≠ n_r',
            'tests/test_losses.py::test_value_when_policy_equals_reference')))
def rdpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
         ref_rejected_logps: Tensor, *, beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor,
         rdpo_alpha: float = 0.01) -> LossOutput:
    """Length-regularised DPO: ``L = −logσ(βΔ + α·(n_c − n_r))`` (α = ``rdpo_alpha``).

    Park et al. 2024: the regulariser ``+α·(|y_w| − |y_l|)`` inside the sigmoid. A longer chosen answer
    needs a smaller margin, so the implicit reward β·h + α·n is what Bradley–Terry fits and the tabular
    optimum is ``π_ref·exp((r − α·n)/β)/Z``: of two equally good answers the shorter is preferred by exactly
    ``exp(−α·(n₁ − n₂)/β)``. (dpolab had the sign reversed before, which favoured the longer answer.)
    The default 0.01 is a starting point; the paper tunes α per model. Not in TRL 1.16.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    length_gap = (chosen_lengths - rejected_lengths).to(h_c.dtype)
    return -F.logsigmoid(beta * (h_c - h_r) + rdpo_alpha * length_gap), *rewards(beta, h_c, h_r)


@register("dpop", params=("dpop_lambda",),
          paper="Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive",
          pick_when="Pairs that differ by few tokens (maths, edits), where DPO lowers the chosen likelihood.",
          pinned_by=(("optimisation along training: the chosen log-prob stays above the reference's where DPO's falls",
            'tests/test_losses_properties.py::test_dpop_keeps_the_chosen_log_prob_above_the_reference_where_dpo_lets_it_fall'),))
def dpop(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
         ref_rejected_logps: Tensor, *, beta: float, dpop_lambda: float = 50.0) -> LossOutput:
    """DPO-Positive: ``L = −logσ(β·(Δ − λ·max(0, ref_c − π_c)))`` (λ = ``dpop_lambda``, 50 in the paper).

    Pal et al. 2024: the penalty is active only while the policy's chosen log-prob is below the
    reference's, so training keeps ``π_c ≥ ref_c`` where plain DPO lets it fall. Deviation: none. Not in
    TRL 1.16.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    penalty = torch.relu(ref_chosen_logps - policy_chosen_logps)  # max(0, −h_c)
    return -F.logsigmoid(beta * (h_c - h_r - dpop_lambda * penalty)), *rewards(beta, h_c, h_r)


@register("cal_dpo",
          paper="Xiao et al. 2024, Cal-DPO: Calibrated Direct Preference Optimization for Language Model Alignment",
          pick_when="Keep implicit rewards on an absolute scale (chosen up, rejected down), e.g. for reasoning "
                    "data where DPO lets both likelihoods fall.",
          pinned_by=(('calculus and optimisation: the optimum h_c = −h_r = 1/(2β) + σ(−Δ)/2',
            'tests/test_losses_properties.py::test_cal_dpo_optimum_by_calculus'),))
def cal_dpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
            ref_rejected_logps: Tensor, *, beta: float) -> LossOutput:
    """Cal-DPO: ``L = −logσ(h_c − h_r) + (h_c − 1/(2β))² + (h_r + 1/(2β))²``.

    Xiao et al. 2024: the contrastive term carries no β; β only sets the calibration targets
    ±1/(2β) (the log-ratios of rewards ±½ at temperature β). The optimum of one pair is not exactly the
    targets: setting the gradient to 0 gives ``h_c = −h_r = 1/(2β) + σ(−Δ)/2`` with ``Δ = 1/β + σ(−Δ)``
    (β = 0.1: h_c = 5 + 2.3e-5; β = 1: h_c = 0.613). Deviation: the authors' released code weights the
    calibration term by ½ (and averages it over the batch); dpolab follows the paper's equation. Not in
    TRL 1.16.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    target = 1 / (2 * beta)
    losses = -F.logsigmoid(h_c - h_r) + (h_c - target) ** 2 + (h_r + target) ** 2
    return losses, *rewards(beta, h_c, h_r)


@register("rebel", columns=("margin",), default_beta=1.0,
          paper="Gao et al. 2024, REBEL: Reinforcement Learning via Regressing Relative Rewards",
          pick_when="Pairs with real-valued reward scores (a reward model, a verifier): regress the margin onto "
                    "the score gap instead of only ordering the pair; the pair may come in either order.",
          pinned_by=(('optimisation: least squares regresses βΔ onto the score gap, optimum π_ref·exp(r/β)/Z',
            'tests/test_losses_optimum.py::test_rebel_tabular_optimum_regresses_the_margin_onto_the_score_gap'),
           ('hand-worked values and gradient',
            'tests/test_losses.py::test_rebel_hand')))
def rebel(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
          ref_rejected_logps: Tensor, *, beta: float, margin: Tensor) -> LossOutput:
    """REBEL: ``L = ((h_c − h_r)/η − (s_c − s_r))²`` with η = 1/β, i.e. ``L = (β·Δ − (s_c − s_r))²``; the
    ``margin`` column is the score gap s_c − s_r (any sign), treated as a constant.

    Gao et al. 2024, eq. 1 (the regression of Algorithm 1), and the authors' code (ZhaolinGao/REBEL,
    ``reg_diff = ratio_logprob − η·(r_c − r_r)``, loss ``reg_diff²``: the same up to the factor η²).
    Least squares puts βΔ at the mean score gap of each pair, so with gaps r(y) − r(y') the optimum is
    ``π_ref·exp(r/β)/Z``, the KL-regularised one. Default β = 1 (the authors' η = 1). Deviation: the paper
    regresses against the previous iterate π_θt on pairs it sampled (online, repeated); dpolab regresses
    against the fixed reference on the given pairs, one REBEL step offline (``sync_ref_model`` moves the
    reference, closer to the paper's iterates). Not in TRL 1.16.
    """
    h_c, h_r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    score_gap = _score_gap(margin, h_c).to(h_c.dtype)
    return (beta * (h_c - h_r) - score_gap) ** 2, *rewards(beta, h_c, h_r)
