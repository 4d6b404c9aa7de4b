"""Ranked data: K ≥ 2 completions per prompt, best first, all scored in one forward pass."""

from __future__ import annotations

import torch

from dpolab.losses.registry import LossOutput, Tensor, register, rewards


@register("plackett_luce", data="ranked",
          paper="Rafailov et al. 2023, Direct Preference Optimization, App. A.3 (Plackett–Luce)",
          pick_when="Rankings of K > 2 answers per prompt (or scored lists): uses every answer in one pass; "
                    "with K = 2 it is DPO.",
          pinned_by=(('optimisation over all 6 rankings of K = 3: the optimum π_ref·exp(r/β)/Z',
            'tests/test_losses_optimum.py::test_plackett_luce_k3_population_minimiser_is_the_closed_form'),
           ('K = 2 equals sigmoid',
            'tests/test_losses.py::test_plackett_luce_with_two_equals_sigmoid')))
def plackett_luce(policy_logps: Tensor, ref_logps: Tensor, *, beta: float) -> LossOutput:
    """DPO under the Plackett–Luce model: with ``z_k = β·h_k`` (k = 1 best … K worst),
    ``L = −Σ_{k=1}^{K−1} [z_k − log Σ_{j=k}^{K} exp(z_j)]`` (logsumexp over the answers not yet placed).

    Rafailov et al. 2023, App. A.3. K = 2 gives −logσ(βΔ) = ``sigmoid``. Inputs are (B, K); the
    rewards returned are those of the best and of the worst completion. Not in TRL 1.16.
    """
    h = policy_logps - ref_logps  # (B, K)
    z = beta * h
    tail_lse = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)  # (B, K): log Σ_{j≥k} exp(z_j)
    losses = -(z - tail_lse)[:, :-1].sum(-1)  # (B,): the last term is always 0
    return losses, *rewards(beta, h[:, 0], h[:, -1])
