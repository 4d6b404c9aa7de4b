"""Modifiers the trainer applies around the losses: combinations, f-divergences, WPO weights, LD-DPO
log-probs, TR-DPO reference updates and BCO's running reward mean. All pure functions of tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from dpolab.losses.registry import LOSSES, Loss, Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def combine(per_example_losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_k w_k · mean(loss_k)``: several losses at once (RPO = sigmoid + sft; MPO = sigmoid + bco_pair +
    sft). Each ``loss_k`` is (B,) (unpaired: (B,) too); the result is a scalar. TRL 1.16's ``loss_weights``.
    """
    if len(per_example_losses) != len(weights):
        raise ValueError(f"{len(per_example_losses)} losses but {len(weights)} weights")
    return sum(w * loss.mean() for loss, w in zip(per_example_losses, weights))


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


class Setting(NamedTuple):
    """A setting that a modifier (not a loss's own ``params``) reads, and when: ``applies(losses, settings)``
    reads only the selected losses' declarations and the other settings, never a loss name."""

    name: str
    applies: Callable[[Sequence[Loss], Mapping[str, Any]], bool]
    needs: str  # what makes it apply, for the error message


def _uses_ref(losses: Sequence[Loss], settings: Mapping[str, Any]) -> bool:
    return any(loss.needs_ref for loss in losses) and not settings.get("reference_free")


MODIFIER_SETTINGS = (
    Setting("use_weighting", lambda ls, s: all(x.data == "paired" and x.row_weights for x in ls),
            "paired losses whose row i is example i (WPO weights each pair; a loss that sorts rows over the "
            "batch has no pair per row)"),
    Setting("ld_alpha", lambda ls, s: all(x.data == "paired" for x in ls),
            "paired losses (LD-DPO down-weights a pair's tokens past its shorter answer)"),
    Setting("f_divergence_type", lambda ls, s: any(x.needs_ref and x.f_divergence for x in ls),
            "a loss with a reference model that accepts f-divergences"),
    Setting("f_alpha_divergence_coef", lambda ls, s: s.get("f_divergence_type") == "alpha_divergence",
            "f_divergence_type alpha_divergence"),
    Setting("bco_running_delta", lambda ls, s: any("delta" in x.state for x in ls),
            "a loss that keeps a running δ (state 'delta')"),
    Setting("unpair", lambda ls, s: all(x.data == "unpaired" for x in ls),
            "a loss on unpaired rows (pairs are then split into a desirable and an undesirable row)"),
    Setting("reference_free", lambda ls, s: any(x.needs_ref for x in ls),
            "a loss with a reference model (the others never build one)"),
    Setting("sync_ref_model", _uses_ref, "a loss with a reference model (TR-DPO moves it)"),
    Setting("ref_model_mixup_alpha", lambda ls, s: bool(s.get("sync_ref_model")), "sync_ref_model (TR-DPO)"),
    Setting("ref_model_sync_steps", lambda ls, s: bool(s.get("sync_ref_model")), "sync_ref_model (TR-DPO)"),
)


def unused_settings(losses: Sequence[Loss], settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """One message per setting that differs from its default although nothing selected reads it, so that no
    option is accepted and silently ignored: a hyper-parameter no selected loss declares in ``params``, or a
    :data:`MODIFIER_SETTINGS` entry whose condition fails. Read from the declarations only.

    >>> unused_settings([LOSSES["ipo"]], {"label_smoothing": 0.1}, {"label_smoothing": 0.0})[0][:55]
    'label_smoothing = 0.1 has no effect with --loss ipo: no'
    """
    chosen = ",".join(loss.name for loss in losses)
    messages = []
    params = sorted({p for loss in LOSSES.values() for p in loss.params})
    for p in params:
        if p in settings and settings[p] != defaults.get(p) and not any(p in loss.params for loss in losses):
            readers = ", ".join(n for n, loss in LOSSES.items() if p in loss.params)
            messages.append(f"{p} = {settings[p]!r} has no effect with --loss {chosen}: no selected loss takes "
                            f"it (losses that do: {readers})")
    for setting in MODIFIER_SETTINGS:
        value = settings.get(setting.name, defaults.get(setting.name))
        if value != defaults.get(setting.name) and not setting.applies(losses, settings):
            readers = [n for n, loss in LOSSES.items() if setting.applies([loss], settings)]
            messages.append(f"{setting.name} = {value!r} has no effect with --loss {chosen}: it needs "
                            f"{setting.needs}" + (f" (losses that qualify: {', '.join(readers)})" if readers else ""))
    return messages


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


def ld_pair_logps(chosen_token_logps: Tensor, chosen_mask: Tensor, rejected_token_logps: Tensor,
                  rejected_mask: Tensor, *, ld_alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO sequence log-probs: tokens up to the pair's public length ``l_p = min(n_c, n_r)`` count fully,
    later ("verbose") tokens are scaled by α: ``π̂ = Σ_{t ≤ l_p} log p_t + α·Σ_{t > l_p} log p_t``.

    Liu et al. 2024, Length Desensitization in DPO (LD-DPO). Inputs: per-token log-probs (B, T_c), (B, T_r)
    aligned with their completion masks (1 on completion tokens, which may start after a prompt or padding;
    t counts completion tokens only). Apply it to the policy AND the reference token log-probs with the same
    α (a precomputed reference must be computed with it), then call any paired loss on the results.
    α = 1 gives the plain sums; α = 0 drops the verbose tail. TRL 1.16: same (``ld_alpha``).
    """
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    pos_c = chosen_mask.cumsum(-1)  # (B, T_c): 1-based position among completion tokens
    pos_r = rejected_mask.cumsum(-1)
    shared = torch.minimum(pos_c[:, -1], pos_r[:, -1]).unsqueeze(-1)  # (B, 1)

    def weighted(token_logps: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        m = mask.to(token_logps.dtype)
        scale = torch.where(pos <= shared, 1.0, ld_alpha).to(token_logps.dtype)
        return (token_logps * m * scale).sum(-1)  # (B,)

    return weighted(chosen_token_logps, chosen_mask, pos_c), weighted(rejected_token_logps, rejected_mask, pos_r)


def tr_dpo_update(ref_params: Mapping[str, Tensor], policy_params: Mapping[str, Tensor], *,
                  ref_model_mixup_alpha: float = 0.6) -> dict[str, Tensor]:
    """TR-DPO soft reference update, as new tensors: ``ref ← α·π + (1 − α)·ref`` for every parameter.

    Gorbatovski et al. 2024, Learn Your Reference Model for Real Good Alignment (TR-DPO); α = 1 is the hard
    update (copy the policy). The trainer calls it every ``ref_model_sync_steps`` (τ, 512) optimizer steps.
    Inputs: two state dicts (or ``named_parameters()`` mappings) with the same keys; non-float entries
    (buffers of ints) are copied from the policy. TRL 1.16: same α (``ref_model_mixup_alpha`` = 0.6) and τ.
    """
    if ref_params.keys() != policy_params.keys():
        raise ValueError("reference and policy parameters have different names")
    a = ref_model_mixup_alpha
    out = {}
    for k, ref in ref_params.items():
        pol = policy_params[k].detach().to(ref.device)
        out[k] = a * pol.to(ref.dtype) + (1 - a) * ref.detach() if ref.is_floating_point() else pol.clone()
    return out


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
