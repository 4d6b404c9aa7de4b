"""The method advisor of ``dpolab inspect``: a loss, β and a learning-rate range, with the reasons.

It follows the method-selection table practitioners use (e.g. the DPO-family chapter's decision table: a
large amount of preference pairs → DPO; only thumbs up/down → KTO; a tight memory budget → SimPO, which
needs no reference model; very small data, within a few hundred examples (under 1,000) → IPO; chasing the
ceiling → online methods), in that order of precedence, and then what the audit found: a length bias →
a length-controlled loss (``rdpo``, ``--ld-alpha``, ``sigmoid_norm``); off-policy pairs → on-policy pairs
from the model itself (``dpolab make-pairs``, iterated); duplicates, contradictions or identical pairs →
fix the data first ("data quality matters much more than the method").
"""

from __future__ import annotations

FEW_PAIRS = 1000  # "fewer than 1,000 data examples" → IPO
LENGTH_BIAS = 0.2  # share of chosen-longer pairs minus share of chosen-shorter ones, in size, above this
OFF_POLICY_TOKEN_LOGP = -2.0  # the reference's mean log-prob per chosen token below this: off-policy pairs
BYTES_PER_PARAMETER = 16 + 4  # fp32 AdamW training (weights, gradient, two moments) + an fp32 reference copy


def learning_rates(num_parameters: int | None) -> tuple[float, float]:
    """A learning-rate range by model size: DPO wants low rates on large models (5e-7 for a 7B model in the
    DPO recipes; Zephyr, Tülu), and far higher ones on tiny models (1e-4 to 2e-4 on the bundled 0.86M one)."""
    if num_parameters is None:  # unknown: the range of DPO recipes for 1B to 7B models
        return 5e-7, 5e-6
    if num_parameters >= 1e9:
        return 5e-7, 1e-6
    if num_parameters >= 1e8:
        return 1e-6, 5e-6
    if num_parameters >= 1e7:
        return 5e-6, 5e-5
    return 5e-5, 2e-4


def memory_needed(num_parameters: int) -> int:
    """Bytes a full fine-tune with a frozen reference copy needs for weights and optimizer (activations aside)."""
    return num_parameters * BYTES_PER_PARAMETER


def advise(kind: str, pairs: int, chosen_longer_fraction: float | None = None,
           chosen_shorter_fraction: float | None = None, ref_token_logp: float | None = None,
           num_parameters: int | None = None, memory_available: int | None = None, problems: int = 0) -> dict:
    """``{"loss", "beta", "learning_rate": [low, high], "reasons": [...], "also": [...]}`` for data of ``kind``
    (paired, unpaired or ranked) with ``pairs`` rows; the rest from the audit and the model."""
    reasons, also = [], []
    tight = (num_parameters is not None and memory_available is not None
             and memory_needed(num_parameters) > 0.8 * memory_available)
    biased = (chosen_longer_fraction is not None
              and abs(chosen_longer_fraction - chosen_shorter_fraction) > LENGTH_BIAS)
    if kind == "unpaired":
        loss, beta = "kto", 0.1
        reasons.append("the rows are thumbs up/down (prompt, completion, label), not pairs: KTO fits that data")
    elif tight:
        loss, beta = "simpo", 2.0
        reasons.append(f"memory is tight: a full fine-tune with a reference copy needs about "
                       f"{memory_needed(num_parameters) / 2**30:.1f} GiB of the {memory_available / 2**30:.1f} GiB "
                       "here; SimPO needs no reference model (or keep DPO with --lora-r, --precompute-ref)")
    elif kind == "ranked":
        loss, beta = "plackett_luce", 0.1
        reasons.append("the rows rank several answers: Plackett-Luce uses the whole ranking")
    elif pairs < FEW_PAIRS:
        loss, beta = "ipo", 0.1
        reasons.append(f"only {pairs} pairs (under {FEW_PAIRS}): IPO's bounded target overfits less on small data")
    elif biased:
        loss, beta = "rdpo", 0.1
        reasons.append(f"length bias: the chosen answer is longer in {chosen_longer_fraction:.0%} of the pairs and "
                       f"shorter in {chosen_shorter_fraction:.0%}, so DPO learns the length as much as the preference; "
                       "R-DPO regularises the length (or --ld-alpha 0.5, or --loss sigmoid_norm)")
    else:
        loss, beta = "sigmoid", 0.1
        reasons.append(f"{pairs} preference pairs: DPO is the general first choice")
    if biased and loss != "rdpo":
        also.append(f"length bias (chosen longer in {chosen_longer_fraction:.0%} of the pairs, shorter in "
                    f"{chosen_shorter_fraction:.0%}): consider --loss rdpo, --ld-alpha 0.5 or --loss sigmoid_norm")
    if ref_token_logp is not None and ref_token_logp < OFF_POLICY_TOKEN_LOGP:
        also.append(f"off-policy pairs: the model gives the chosen answers {ref_token_logp:.2f} nats per token; "
                    "make on-policy pairs from it (dpolab make-pairs, round after round with dpolab iterate), or "
                    "fine-tune on the chosen answers first")
    if problems:
        also.insert(0, f"{problems} duplicate, contradictory, identical or empty rows: fix the data first (data "
                       "quality matters much more than the method)")
    if beta == 0.1:
        reasons.append("β 0.1, the usual start (0.05 to 0.5 works in practice); raise it if the displacement alarm "
                       "fires (docs/default-task.md: β 2 on the bundled model)")
    lr = learning_rates(num_parameters)
    reasons.append(f"learning rate {lr[0]:g} to {lr[1]:g}: " + (
        f"for a model of {num_parameters / 1e6:.1f}M parameters" if num_parameters else
        "the range of DPO recipes for 1B to 7B models (give --model for one fitted to its size)"))
    also.append("pick the setting by held-out task reward where you have one; watch the alarms while training "
                "(docs/diagnostics.md)")
    return {"loss": loss, "beta": beta, "learning_rate": list(lr), "reasons": reasons, "also": also}
