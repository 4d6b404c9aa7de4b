"""Write docs/losses.md from the loss registry: every entry's declaration and docstring, so the page cannot
drift from the code (tests/test_losses_docs.py checks that the committed file equals this output).

    python scripts/gen_loss_docs.py            # rewrite docs/losses.md
    python scripts/gen_loss_docs.py --check    # exit 1 if it is stale
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's dpolab, not an installed one

from dpolab import losses as L  # noqa: E402

OUT = ROOT / "docs" / "losses.md"

INTRO = """\
# Losses

Every loss is a pure function of per-sequence log-probs, registered by name in `dpolab.losses.LOSSES`;
`--loss NAME` (or `--loss a,b --loss-weights 1,0.5`) picks them. This page is generated from the registry by
`scripts/gen_loss_docs.py`; edit the docstrings and declarations, not this file.

Notation: `π_c`, `π_r` are the policy's summed log-probs of the chosen and rejected completions, `ref_c`,
`ref_r` the reference model's, `h = π − ref`, `Δ = h_c − h_r`, `n` the number of completion tokens and
`Δ̄ = h_c/n_c − h_r/n_r`. The implicit reward reported in the metrics is `β·h` (reference-free losses:
`β·π`, or `β·π/n` for the length-normalised ones).

## Which loss?

| your situation | start with |
|---|---|
| pairs (prompt, chosen, rejected), a reference model fits in memory | `sigmoid` (DPO), β = 0.1 |
| thumbs up / thumbs down, no pairs (or very unequal counts of good and bad) | `kto` (or `bco`) |
| tight memory: no room for a reference model | `simpo` (β = 2, γ = 1) or `orpo` (one stage, SFT included) |
| a few hundred pairs, or labels that are almost always right | `ipo` |
| noisy labels (annotators disagree) | `sigmoid` with `label_smoothing` (cDPO) or `robust` |
| chosen answers keep losing likelihood during DPO | `dpop`, `cal_dpo`, `nca_pair`, or `sigmoid,sft` (RPO) |
| DPO makes answers longer | `rdpo`, `sigmoid_norm`, or `ld_alpha` |
| rankings of K > 2 answers per prompt | `plackett_luce` |
| graded scores on pairs (`score_chosen`, `score_rejected`, or `margin`: the score gap) | `odpo` or `rebel` |

A reference loss can run reference-free (`reference_free`): its reference log-probs are then zero.

β, the KL strength: the DPO optimum is `π* ∝ π_ref·exp(r/β)`, so as β → ∞ it tends to the reference and as
β → 0 to the single best answer. The gradient at π = π_ref does not vanish for large β: `∂L/∂Δ = −β·σ(−βΔ)`
is `−β/2` at Δ = 0, so a large β takes large first steps towards a nearby optimum (and the push stops once
βΔ ≫ 1), a small β pushes weakly towards a far one (`tests/test_losses_properties.py::test_dpo_beta_limits`).
IPO's target `1/(2β)` is per token: its Δ̄ is a difference of mean per-token log-ratios.

Each loss's docstring below gives its equation, its paper and every deviation from the paper (or from TRL
1.16 where TRL implements it), and the "pinned by" line names the independent check that fixes its value:
TRL's own loss code run on the same inputs, a closed form or an optimum from the paper's argument, or a
hand-worked number (the table at the end lists them all).

A setting that none of the selected losses or modifiers reads (a `params` entry of another loss, `use_weighting`
with unpaired or ranked data or with a loss that sorts rows over the batch, `bco_running_delta` without a
running δ, `f_divergence_type` with reference-free losses, ...) is refused when it differs from its default,
never silently ignored (`dpolab.losses.unused_settings`, from the declarations below).

`use_weighting` (WPO) is the paper's aligned weight `exp(ā_c)·exp(ā_r)` (eq. 2), as TRL 1.16's
`use_weighting`: ā is the mean per-token log-prob aligned by `log Σ_v p²`, accumulated inside the chunked
LM-head pass (see `wpo_weights` below).

## Declarations

| loss | data | reference | lengths | columns / inputs | params (default) | β default | TRL 1.16 |
|---|---|---|---|---|---|---|---|
"""

TYPICAL_BETA = {
    "sigmoid": "0.01–0.5; 0.1 is the usual start",
    "robust": "as DPO (0.1)",
    "hinge": "0.1–1 (βΔ ≥ 1 ends the push)",
    "ipo": "β is IPO's τ; the per-token target margin is 1/(2β); 0.01–1",
    "simpo": "2.0–2.5 with γ/β ≈ 0.5",
    "alphapo": "as SimPO (≈ 2), α tuned per model",
    "cpo": "0.1",
    "orpo": "β is ORPO's λ, the weight of the odds-ratio term; 0.1",
    "kto": "0.1",
    "rebel": "1 (the authors' η = 1/β = 1); βΔ is regressed onto the raw score gap, so scale β with the scores",
}

def _declaration_row(loss: L.Loss) -> str:
    inputs = list(loss.columns) + [f"{s} (state)" for s in loss.state]
    if loss.needs_kl:
        inputs.append("kl_policy_logps, kl_ref_logps")
    params = ", ".join(f"`{p}` ({d})" for p, d in loss.param_defaults.items()) or "—"
    return (f"| `{loss.name}` | {loss.data} | {'yes' if loss.needs_ref else 'no'} | "
            f"{'yes' if loss.needs_lengths else 'no'} | {', '.join(inputs) or '—'} | {params} | "
            f"{loss.default_beta or 0.1} | {loss.trl_name or '—'} |")


def _section(loss: L.Loss) -> str:
    flags = []
    if loss.f_divergence:
        flags.append("accepts f-divergences")
    if loss.batch_coupled:
        flags.append("batch-coupled (rows depend on each other: accumulate over whole batches)")
    return "\n".join([
        f"### `{loss.name}`",
        "",
        f"- paper: {loss.paper}",
        f"- data: {loss.data}; reference model: {'needed' if loss.needs_ref else 'none'}"
        + (f"; {'; '.join(flags)}" if flags else ""),
        f"- typical β: {TYPICAL_BETA.get(loss.name, f'{loss.default_beta or 0.1} (the default)')}",
        f"- pick it when: {loss.pick_when}",
        f"- TRL 1.16: {loss.trl_name or 'not implemented'}",
        f"- pinned by: {'; '.join(f'{what} (`{test}`)' for what, test in loss.pinned_by)}",
        "",
        "```text",
        loss.doc,
        "```",
        "",
    ])


MODIFIERS = [L.f_divergence_logratios, L.f_divergence_inputs, L.wpo_weights, L.tr_dpo_update_, L.update_running_mean,
             L.kto_weight_advice, L.kto_kl_estimate]


def render() -> str:
    families = [("Paired, with a reference", "paired", True), ("Reference-free", "paired", False),
                ("Ranked", "ranked", True), ("Unpaired", "unpaired", True)]
    parts = [INTRO.rstrip("\n")]
    parts += [_declaration_row(loss) for loss in L.LOSSES.values()]
    parts.append("")
    for title, data, needs_ref in families:
        parts += [f"## {title}", ""]
        parts += [_section(loss) for loss in L.LOSSES.values() if loss.data == data and loss.needs_ref == needs_ref]
    parts += ["## What pins each loss", "", "| loss | independent check | test |", "|---|---|---|"]
    parts += [f"| `{name}` | {what} | `{test}` |" for name, loss in L.LOSSES.items() for what, test in loss.pinned_by]
    parts.append("")
    parts += ["## Modifiers", "",
              "Pure functions the trainer applies around the losses (`from dpolab.losses import ...`).", ""]
    for fn in MODIFIERS:
        parts += [f"### `{fn.__name__}{inspect.signature(fn)}`", "", "```text", inspect.cleandoc(fn.__doc__), "```", ""]
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.exists() and OUT.read_text() == text else 1)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
