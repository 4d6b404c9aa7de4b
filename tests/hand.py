"""Independent computations for the end-to-end tests: per-token completion log-probs from one plain forward
pass per sequence (full log_softmax, no dpolab code), and the rows they are computed on."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import preference_rows

Tensor = torch.Tensor


def uneven_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose answers differ in length (by 2 to 6 words, the longer one alternating), so that length
    terms (LD-DPO, per-token means) matter."""
    rows = preference_rows(n, seed)
    for i, r in enumerate(rows):
        key = "rejected" if i % 2 else "chosen"
        r[key] += " and the" * (i % 3 + 1)
    return rows


@functools.lru_cache(maxsize=8)
def load(model_dir: str, weights: str | None = None):
    """A model in eval mode; ``weights``: a checkpoint's model.safetensors loaded over it."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if weights is not None:
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
        assert not unexpected
    return model


@functools.lru_cache(maxsize=8)
def tokenizer(model_dir: str):
    return AutoTokenizer.from_pretrained(model_dir)


def completion_log_softmax(model_dir, prompt: str, completion: str, weights: str | None = None):
    """(next-token log-probs at the positions predicting each completion token (n, V), float64, the tokens):
    plain-text tokenisation of SPEC §4 (prompt with special tokens, completion without, then EOS)."""
    tok, model = tokenizer(str(model_dir)), load(str(model_dir), None if weights is None else str(weights))
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        lp = model(torch.tensor([p + c])).logits[0].double().log_softmax(-1)  # (T, V)
    return lp[len(p) - 1: len(p) - 1 + len(c)], torch.tensor(c)


def token_logps(model_dir, prompt: str, completion: str, weights: str | None = None) -> torch.Tensor:
    """log p(token) of every completion token (EOS appended), float64, from one full forward pass."""
    lp, c = completion_log_softmax(model_dir, prompt, completion, weights)
    return lp.gather(-1, c[:, None]).squeeze(-1)  # (n,)


def aligned_logps(model_dir, prompt: str, completion: str) -> torch.Tensor:
    """WPO's aligned sum Σ_t (log p_t − log Σ_v p_t(v)²), written out from the full distribution."""
    lp, c = completion_log_softmax(model_dir, prompt, completion)
    sum_sq = torch.log((lp.exp() ** 2).sum(-1))  # (n,)
    return (lp.gather(-1, c[:, None]).squeeze(-1) - sum_sq).sum()


def pair_aligned(model_dir, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """WPO's aligned sums of the chosen and of the rejected answers, (B,) each."""
    return (torch.stack([aligned_logps(model_dir, r["prompt"], r["chosen"]) for r in rows]),
            torch.stack([aligned_logps(model_dir, r["prompt"], r["rejected"]) for r in rows]))


def pair_logps(model_dir, rows: list[dict], weights: str | Path | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Per row: (chosen token log-probs, rejected token log-probs)."""
    w = None if weights is None else str(weights)
    return [(token_logps(model_dir, r["prompt"], r["chosen"], w), token_logps(model_dir, r["prompt"], r["rejected"], w))
            for r in rows]


# ---- independent implementations the trainer's code is checked against (TRL-shaped, padded tensors)

def combine(per_example_losses: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ_k w_k · mean(loss_k)``: several losses at once (RPO = sigmoid + sft; MPO = sigmoid + bco_pair +
    sft). Each ``loss_k`` is (B,) (unpaired: (B,) too); the result is a scalar. TRL 1.16's ``loss_weights``.
    """
    if len(per_example_losses) != len(weights):
        raise ValueError(f"{len(per_example_losses)} losses but {len(weights)} weights")
    return sum(w * loss.mean() for loss, w in zip(per_example_losses, weights))


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
