"""Independent computations for the end-to-end tests: per-token completion log-probs from one plain forward
pass per sequence (full log_softmax, no dpolab code), and the rows they are computed on."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import preference_rows


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
