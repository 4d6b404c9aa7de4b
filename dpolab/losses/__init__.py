"""The direct alignment losses: pure functions of per-sequence log-probs, found through one registry.

Notation (SPEC §1): ``π_c, π_r`` are the policy's summed completion log-probs, ``ref_c, ref_r`` the
reference's, ``h = π − ref`` the log-ratios, ``Δ = h_c − h_r`` and ``Δ̄ = h_c/n_c − h_r/n_r``.

``LOSSES[name]`` is a :class:`Loss` whose fields declare what the function needs (see
:mod:`dpolab.losses.registry` for the contract). The modules by family:

- :mod:`~dpolab.losses.paired`: paired losses with a reference (sigmoid … discopop);
- :mod:`~dpolab.losses.margins`: paired losses with an offset, a length or likelihood term, or a
  regression target (odpo, rdpo, dpop, cal_dpo, rebel);
- :mod:`~dpolab.losses.reference_free`: simpo, cpo, orpo, alphapo, sft;
- :mod:`~dpolab.losses.ranked`: plackett_luce;
- :mod:`~dpolab.losses.unpaired`: kto, bco and the KTO weight advice;
- :mod:`~dpolab.losses.modifiers`: f-divergences, WPO, TR-DPO, running mean.
"""

from dpolab.losses.registry import LOSSES, Loss, LossOutput, get_loss, register, token_mean_nll  # noqa: I001
from dpolab.losses import paired, margins, ranked, reference_free, unpaired  # noqa: F401  (they register their losses)
from dpolab.losses.modifiers import (
    F_DIVERGENCES,
    f_divergence_inputs,
    f_divergence_logratios,
    tr_dpo_update_,
    update_running_mean,
    wpo_weights,
)
from dpolab.losses.paired import sigmoid
from dpolab.losses.unpaired import KTOWeightAdvice, kto_kl_estimate, kto_weight_advice

__all__ = [
    "LOSSES", "Loss", "LossOutput", "get_loss", "register", "token_mean_nll", "sigmoid",
    "F_DIVERGENCES", "f_divergence_inputs", "f_divergence_logratios", "tr_dpo_update_", "update_running_mean",
    "wpo_weights",
    "KTOWeightAdvice", "kto_kl_estimate", "kto_weight_advice",
]
