"""Reference-free paired losses: no reference model is built at all.

They keep the four-tensor paired signature so that the trainer calls every paired loss the same way, but
never read ``ref_chosen_logps`` / ``ref_rejected_logps``. Each but ``sft`` declares ``own_reward``: the
reward it returns is the one it optimises (SimPO β·π/n, AlphaPO β·r_α, ORPO the log-odds, CPO β·π), and
that is the reward the metrics report (SPEC §1), as TRL's CPOTrainer does for CPO and SimPO.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dpolab.losses.registry import TRL_DPO_CODE, LossOutput, Tensor, register, rewards, token_mean_nll


def _mean_logp(logps: Tensor, lengths: Tensor) -> Tensor:
    return logps / lengths.to(logps.dtype).clamp(min=1.0)  # π/n: (B,)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − eˣ)`` for x ≤ 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@register("simpo", needs_ref=False, needs_lengths=True, own_reward=True, params=("simpo_gamma",), default_beta=2.0,
          trl_name="CPOTrainer loss_type='simpo' with cpo_alpha=0",
          paper="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward",
          pick_when="Tight memory (no reference model) on paired data; strong on chat benchmarks; needs β ≈ 2.",
          pinned_by=(("TRL 1.16's CPOTrainer loss code (value and gradient)",
            'tests/test_losses_trl.py::test_cpo_trainer_losses'),))
def simpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
          ref_rejected_logps: Tensor | None = None, *, beta: float, chosen_lengths: Tensor,
          rejected_lengths: Tensor, simpo_gamma: float = 1.0) -> LossOutput:
    """SimPO: ``L = −logσ(β·(π_c/n_c − π_r/n_r) − γ)`` (γ = ``simpo_gamma``); defaults β = 2.0, γ = 1.0.

    Meng et al. 2024 (γ/β = 0.5 as the paper recommends). TRL 1.16 has SimPO only in the
    experimental CPOTrainer, whose ``loss_type='simpo'`` defaults to β = 0.1, γ = 0.5 and adds CPO's NLL
    term (cpo_alpha = 1.0): that is CPO-SimPO, here ``simpo`` + ``sft`` combined. dpolab's ``simpo`` is the
    paper's loss with the paper's defaults; with TRL's cpo_alpha = 0 and the same β, γ the two agree.
    """
    m_c = _mean_logp(policy_chosen_logps, chosen_lengths)
    m_r = _mean_logp(policy_rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(beta * (m_c - m_r) - simpo_gamma)
    return losses, *rewards(beta, m_c, m_r)


@register("cpo", needs_ref=False, needs_lengths=True, own_reward=True, params=("label_smoothing", "cpo_alpha"),
          batch_coupled=True, trl_name="CPOTrainer loss_type='sigmoid'",
          paper="Xu et al. 2024, Contrastive Preference Optimization (CPO)",
          pick_when="Tight memory on paired data where the chosen answers are good references (e.g. "
                    "translation): a preference term plus likelihood on the chosen answers.",
          pinned_by=(("TRL 1.16's CPOTrainer loss code (value and gradient)",
            'tests/test_losses_trl.py::test_cpo_trainer_losses'),))
def cpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None, *, beta: float, chosen_lengths: Tensor,
        rejected_lengths: Tensor, label_smoothing: float = 0.0, cpo_alpha: float = 1.0) -> LossOutput:
    """CPO: ``L = −(1−ε)·logσ(β(π_c − π_r)) − ε·logσ(−β(π_c − π_r)) + λ·NLL(y_c)`` (λ = ``cpo_alpha``).

    Xu et al. 2024, eq. 3 (ε = 0) plus the behaviour-cloning term. NLL(y_c) is the mean negative
    log-likelihood per token over ALL chosen completion tokens of the batch, −Σπ_c/Σn_c (row i carries
    −π_c·B/Σn_c so that the mean is exact); it couples rows, so accumulate gradients over whole batches.
    TRL 1.16: same formula and defaults (β = 0.1, cpo_alpha = 1.0, label smoothing as cDPO).
    """
    z = beta * (policy_chosen_logps - policy_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    if cpo_alpha != 0:
        losses = losses + cpo_alpha * token_mean_nll(policy_chosen_logps, chosen_lengths)
    return losses, *rewards(beta, policy_chosen_logps, policy_rejected_logps)


@register("orpo", needs_ref=False, needs_lengths=True, own_reward=True, batch_coupled=True, trl_name="ORPOTrainer",
          paper="Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model",
          pick_when="One stage instead of SFT then DPO, with tight memory (no reference): SFT on the chosen "
                    "answers plus an odds-ratio penalty on the rejected.",
          pinned_by=(("TRL 1.16's ORPOTrainer loss code (value and gradient)",
            'tests/test_losses_trl.py::test_orpo_matches_trl_with_one_token_prompts'),))
def orpo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
         ref_rejected_logps: Tensor | None = None, *, beta: float, chosen_lengths: Tensor,
         rejected_lengths: Tensor) -> LossOutput:
    """ORPO: ``L = NLL(y_c) − λ·logσ(log odds(y_c) − log odds(y_r))``, with ``p̄ = exp(π/n)``,
    ``odds(y) = p̄/(1 − p̄)``; λ is ``beta`` (0.1), as in TRL.

    Hong et al. 2024, eqs. 4 and 7. NLL(y_c) is the mean per token over all chosen completion tokens of the
    batch (see ``cpo``). log odds(y) = π/n − log(1 − e^{π/n}). Parameter name: TRL 1.16's ORPOTrainer
    calls λ ``beta`` (default 0.1) and so does dpolab. Deviation: TRL 1.16 computes the NLL over the prompt
    AND the completion tokens (its labels are every attended token); dpolab, like the paper's L_SFT on the
    response, uses completion tokens only. The two agree when the prompt is a single token.

    Rewards: the log-odds ``log odds(y_c)`` and ``log odds(y_r)``, whose difference is what the odds-ratio
    term pushes up (TRL 1.16 reports β·π/n instead; the ranking of a pair is the same, the margins differ).
    """
    m_c = _mean_logp(policy_chosen_logps, chosen_lengths).float()
    m_r = _mean_logp(policy_rejected_logps, rejected_lengths).float()
    log_odds = (m_c - m_r) - (log1mexp(m_c) - log1mexp(m_r))
    losses = token_mean_nll(policy_chosen_logps, chosen_lengths) - beta * F.logsigmoid(log_odds).to(m_c.dtype)
    odds_c, odds_r = m_c - log1mexp(m_c), m_r - log1mexp(m_r)  # log odds(y) = log p̄ − log(1 − p̄)
    return losses, *rewards(1.0, odds_c.to(policy_chosen_logps.dtype), odds_r.to(policy_chosen_logps.dtype))


def alphapo_reward(mean_logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape ``r_α = (1 − p̄^{−α})/α`` with ``p̄ = exp(π/n)``; α → 0 gives log p̄ = π/n."""
    if alpha == 0:
        return mean_logps
    return -torch.expm1(-alpha * mean_logps) / alpha


@register("alphapo", needs_ref=False, needs_lengths=True, own_reward=True, params=("simpo_gamma", "alphapo_alpha"),
          default_beta=2.0, trl_name="CPOTrainer loss_type='alphapo' (alpha=...)",
          paper="Gupta et al. 2025, AlphaPO: Reward Shape Matters for LLM Alignment",
          pick_when="SimPO with a reshaped reward: α > 0 curbs likelihood displacement (chosen log-probs "
                    "falling) at the cost of a slower margin.",
          pinned_by=(("TRL 1.16's CPOTrainer loss code (value and gradient)",
            'tests/test_losses_trl.py::test_cpo_trainer_losses'),))
def alphapo(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
            ref_rejected_logps: Tensor | None = None, *, beta: float, chosen_lengths: Tensor,
            rejected_lengths: Tensor, simpo_gamma: float = 1.0, alphapo_alpha: float = 0.25) -> LossOutput:
    """AlphaPO: ``L = −logσ(β·(r_α(y_c) − r_α(y_r)) − γ)``, ``r_α(y) = (1 − p̄(y)^{−α})/α``,
    ``p̄(y) = exp(π(y)/|y|)``; α = ``alphapo_alpha``, γ = ``simpo_gamma``.

    Gupta et al. 2025: SimPO's length-normalised log reward replaced by an α-power (α-divergence) shape;
    α = 0 is SimPO exactly. Reference-free like SimPO, though SPEC lists it among the reference losses.
    TRL 1.16 computes the same in CPOTrainer (``loss_type='alphapo'`` = simpo with cpo_alpha = 0 and the
    reward shape ``alpha``), but its ``alpha`` defaults to 0 (plain SimPO) and β to 0.1. dpolab names the
    parameter ``alphapo_alpha`` (``alpha`` alone is ambiguous in a flat config) and defaults to α = 0.25,
    β = 2.0, γ = 1.0 as starting points in the range the paper explores; tune α per model.
    """
    m_c = _mean_logp(policy_chosen_logps, chosen_lengths)
    m_r = _mean_logp(policy_rejected_logps, rejected_lengths)
    r_c, r_r = alphapo_reward(m_c, alphapo_alpha), alphapo_reward(m_r, alphapo_alpha)
    losses = -F.logsigmoid(beta * (r_c - r_r) - simpo_gamma)
    return losses, *rewards(beta, r_c, r_r)


@register("sft", needs_ref=False, needs_lengths=True, batch_coupled=True, trl_name="DPOTrainer loss_type='sft'",
          paper="Supervised fine-tuning NLL on the chosen answers (RPO: Pang et al. 2024; MPO: Wang et al. 2024)",
          pick_when="Never alone on preference data; combined with a preference loss (sigmoid,sft = RPO) to "
                    "keep the chosen likelihood up.",
          pinned_by=(TRL_DPO_CODE,))
def sft(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None, *, beta: float, chosen_lengths: Tensor,
        rejected_lengths: Tensor) -> LossOutput:
    """SFT: the mean NLL per token over ALL chosen completion tokens of the batch, ``−Σπ_c / Σn_c``.

    Row i carries ``−π_c[i]·B/Σn_c``, so the mean over rows is that token mean exactly (one value per row
    keeps the paired shape for combining). The rejected answers are not used. TRL 1.16: same (it expands the
    scalar token mean to every row; the mean and its gradient are identical).
    """
    losses = token_mean_nll(policy_chosen_logps, chosen_lengths)
    return losses, *rewards(beta, policy_chosen_logps, policy_rejected_logps)
