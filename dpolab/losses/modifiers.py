"""Modifiers the trainer applies around the losses: f-divergences, WPO weights, TR-DPO reference updates
and BCO's running reward mean. All pure functions of tensors. (Several losses at once are combined by
:class:`dpolab.objective.Objective`; LD-DPO's token weights are applied inside the log-prob pass,
:func:`dpolab.models.logps.ld_weights`.)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F

from dpolab.losses.registry import Loss, Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def f_divergence_logratios(logratios: Tensor, f_divergence_type: str = "reverse_kl",
                           f_alpha_divergence_coef: float = 0.5) -> Tensor:
    """f-DPO: replace a log-ratio h = π − ref by f'(e^h), the derivative of the f-divergence's generator.

    reverse KL: ``h`` (DPO); forward KL: ``1 − e^{−h}``; Jensen–Shannon: ``log 2 + logσ(h)``;
    α-divergence: ``(e^{(α−1)h} − 1)/(α−1)`` (α = ``f_alpha_divergence_coef``; α = 1 falls back to h).
    Wang et al. 2023, Beyond Reverse KL (f-DPO). As TRL 1.16: the exponent (α−1)h is clamped at 80
    (11 in float16) and computed in float32. Only losses declared ``f_divergence`` accept the result (see
    :func:`f_divergence_inputs`).
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        a = f_alpha_divergence_coef
        if abs(a - 1.0) < 1e-6:
            return logratios
        t = (a - 1.0) * logratios
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (a - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")


def f_divergence_inputs(loss: Loss, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                        ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, f_divergence_type: str,
                        f_alpha_divergence_coef: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four paired inputs to give ``loss`` under f-DPO: ``(f(h_c), f(h_r), 0, 0)``.

    Reference-free losses (``sft`` in RPO, say) and ``reverse_kl`` get their inputs unchanged. A reference
    loss not declared ``f_divergence`` raises: its value depends on h beyond the chosen-rejected difference,
    where f-DPO's β·log Z(x) does not cancel (TRL 1.16 refuses the same set). The rewards such a call
    returns are β·f(h); report the metrics from the raw log-ratios (TRL reports β·h).
    """
    if f_divergence_type == "reverse_kl" or not loss.needs_ref:
        return policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    if not loss.f_divergence:
        raise ValueError(f"loss {loss.name!r} has no f-divergence form; use f_divergence_type='reverse_kl'")
    f_c = f_divergence_logratios(policy_chosen_logps - ref_chosen_logps, f_divergence_type, f_alpha_divergence_coef)
    f_r = f_divergence_logratios(policy_rejected_logps - ref_rejected_logps, f_divergence_type,
                                 f_alpha_divergence_coef)
    return f_c, f_r, torch.zeros_like(f_c), torch.zeros_like(f_r)


def wpo_weights(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
                rejected_lengths: Tensor, *, chosen_log_sum_sq_probs: Tensor | None = None,
                rejected_log_sum_sq_probs: Tensor | None = None) -> Tensor:
    """WPO pair weights ``w = exp(ā_c)·exp(ā_r)``, detached, to multiply each per-example loss by.

    ``ā = (π − S)/n``: the policy's mean token log-prob, "aligned" by subtracting ``S = Σ_t log Σ_v p_t(v)²``
    (per token, the log of the sum of squared next-token probabilities, summed over the completion).
    With ``S`` given this is TRL 1.16's ``use_weighting`` exactly; without it (S = 0) it is the paper's plain
    weight ``exp(π/n)``, the geometric-mean token probability. Zhou et al. 2024, Weighted Preference
    Optimization, eq. 2. Multiply before the mean (and before combining). TRL refuses WPO with
    ``aot``/``aot_unpaired`` (sorting breaks the pairing); so does dpolab (``row_weights``).

    dpolab's trainer (``use_weighting``) trains with the aligned weight, TRL 1.16's: the log-prob function
    (``SequenceLogps(..., aligned=True)``) accumulates π − S per sequence inside its chunked LM-head pass and
    passes that as the log-probs here, with no ``S``.
    """
    s_c = 0.0 if chosen_log_sum_sq_probs is None else chosen_log_sum_sq_probs
    s_r = 0.0 if rejected_log_sum_sq_probs is None else rejected_log_sum_sq_probs
    with torch.no_grad():
        a_c = (policy_chosen_logps - s_c) / chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1.0)
        a_r = (policy_rejected_logps - s_r) / rejected_lengths.to(policy_rejected_logps.dtype).clamp(min=1.0)
        return torch.exp(a_c) * torch.exp(a_r)  # (B,)


@torch.no_grad()
def tr_dpo_update_(ref_params: Iterable[Tensor], policy_params: Iterable[Tensor], *,
                   ref_model_mixup_alpha: float = 0.6) -> None:
    """In-place :func:`tr_dpo_update` over two parameter lists in the same order (no extra memory)."""
    for ref, pol in zip(ref_params, policy_params, strict=True):
        ref.mul_(1 - ref_model_mixup_alpha).add_(pol.detach().to(ref.device, ref.dtype), alpha=ref_model_mixup_alpha)


def update_running_mean(mean: Tensor | float, count: int, values: Tensor) -> tuple[Tensor, int]:
    """The exact mean of all values seen so far: ``m' = m + (Σv − k·m)/(count + k)`` for k new values.

    BCO's δ: feed it each batch's detached rewards β·h (paired: chosen and rejected together) before
    calling the loss, and pass the new mean as ``delta``. Under data parallelism gather the values from every
    process first. Returns ``(new_mean, new_count)``; store both with the checkpoint.
    """
    values = values.detach().flatten()
    k = values.numel()
    if k == 0:
        return torch.as_tensor(mean), count
    mean = torch.as_tensor(mean, dtype=values.dtype, device=values.device)
    return mean + (values.sum() - k * mean) / (count + k), count + k
