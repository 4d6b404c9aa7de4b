"""The direct alignment losses: pure functions of per-sequence log-probs, found through one registry.

Notation (SPEC §1): ``π_c, π_r`` are the policy's summed completion log-probs, ``ref_c, ref_r`` the
reference's, ``h = π − ref`` the log-ratios and ``Δ = h_c − h_r``. Every tensor argument has shape (B,).

Registry contract. ``LOSSES[name]`` is a :class:`Loss`: calling it calls the loss function, and its fields
declare what the function needs, so the trainer reads declarations and never branches on a name:

- ``data``: ``"paired"`` functions take ``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
  ref_rejected_logps, *, beta, **extras)``; ``"ranked"`` ones take ``(policy_logps, ref_logps, *, beta,
  ...)`` of shape (B, K), best completion first; ``"unpaired"`` ones take ``(policy_logps, ref_logps,
  labels, *, beta, ...)``. All return ``(losses, chosen_rewards, rejected_rewards)``, each of shape (B,)
  (for unpaired data, the rewards of the desirable and the undesirable rows).
- ``needs_ref``: False for reference-free losses; the trainer then builds no reference at all.
- ``needs_lengths``: the function takes ``chosen_lengths`` and ``rejected_lengths`` (completion tokens).
- ``columns``: per-row data columns it takes as keyword tensors of shape (B,) (e.g. ``margin``).
- ``params``: hyper-parameters it takes as keywords; each is a field of :class:`dpolab.config.Config`
  with the same name, so the trainer binds them once at setup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = tuple[Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class Loss:
    """A registry entry: the loss function and the declaration of what it needs."""

    name: str
    fn: Callable[..., LossOutput]
    data: str = "paired"  # "paired" | "ranked" | "unpaired"
    needs_ref: bool = True
    needs_lengths: bool = False
    columns: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    paper: str = ""
    trl_name: str | None = None  # the name TRL 1.16 gives the same formula, if it has it
    default_beta: float | None = None  # the paper's β when it differs from the global default
    extra: dict = field(default_factory=dict)

    def __call__(self, *args, **kwargs) -> LossOutput:
        return self.fn(*args, **kwargs)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip()


LOSSES: dict[str, Loss] = {}


def register(name: str, **declaration) -> Callable:
    """Add a loss function to :data:`LOSSES` under ``name`` with its declaration (see module docstring)."""

    def add(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = Loss(name=name, fn=fn, **declaration)
        return fn

    return add


def get_loss(name: str) -> Loss:
    """The registry entry for ``name``; the one place a loss name is looked up."""
    try:
        return LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(LOSSES))
        raise KeyError(f"unknown loss {name!r}; known losses: {known}") from None


def _rewards(beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor) -> tuple[Tensor, Tensor]:
    """Implicit rewards r = β·h (SPEC §1), detached: they are reported, never differentiated."""
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@register("sigmoid", params=("label_smoothing",), trl_name="sigmoid",
          paper="Rafailov et al. 2023, Direct Preference Optimization (cDPO: Mitchell 2023)")
def sigmoid(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO: ``L = −logσ(βΔ)``; with label smoothing ε > 0, conservative DPO:
    ``L = −(1−ε)·logσ(βΔ) − ε·logσ(−βΔ)``, where ``Δ = (π_c − ref_c) − (π_r − ref_r)``.

    Rafailov et al. 2023, eq. 7; cDPO from the authors' note on noisy labels (ε = assumed flip rate).
    Deviation from TRL 1.16: TRL's ``sigmoid`` ignores ``label_smoothing``; here it is honoured.
    """
    h_c = policy_chosen_logps - ref_chosen_logps
    h_r = policy_rejected_logps - ref_rejected_logps
    logits = beta * (h_c - h_r)  # (B,)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return (losses, *_rewards(beta, h_c, h_r))
