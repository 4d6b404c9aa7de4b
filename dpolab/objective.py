"""The objective: registry losses bound, once at setup, to their hyper-parameters and weights.

It turns per-sequence log-probs (S,) into per-example losses (B,) by reading each loss's declaration
(paired or ranked data, lengths, extra columns); it never branches on a loss name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpolab.batch import Batch
from dpolab.errors import ConfigError
from dpolab.losses import Loss, get_loss

Tensor = torch.Tensor


@dataclass
class Output:
    losses: Tensor  # (B,) Σ_k w_k · loss_k per example
    chosen_rewards: Tensor  # (B,) detached, from the first loss
    rejected_rewards: Tensor  # (B,)
    chosen_logps: Tensor  # (B,) policy log-prob of the chosen (best) completion, detached
    rejected_logps: Tensor  # (B,) of the rejected (worst) completion


@dataclass
class Objective:
    losses: list[Loss]
    weights: list[float]
    beta: float
    params: list[dict]  # per loss: its hyper-parameters by name

    @property
    def data(self) -> str:
        return self.losses[0].data

    @property
    def needs_ref(self) -> bool:
        return any(loss.needs_ref for loss in self.losses)

    @property
    def columns(self) -> set[str]:
        return {c for loss in self.losses for c in loss.columns}

    def __call__(self, policy_logps: Tensor, ref_logps: Tensor, batch: Batch) -> Output:
        K = batch.num_completions
        P = policy_logps.view(-1, K)  # (B, K)
        R = ref_logps.view(-1, K)  # (B, K)
        L = batch.lengths.view(-1, K)  # (B, K)
        total, rewards = 0.0, None
        for loss, w, params in zip(self.losses, self.weights, self.params):
            kwargs = dict(params, beta=self.beta)
            if "margin" in loss.columns:
                kwargs["margin"] = batch.margins
            if loss.data == "ranked":
                out = loss(P, R, **kwargs)
            else:
                if loss.needs_lengths:
                    kwargs.update(chosen_lengths=L[:, 0], rejected_lengths=L[:, 1])
                out = loss(P[:, 0], P[:, 1], R[:, 0], R[:, 1], **kwargs)
            total = total + w * out[0]
            rewards = rewards or out[1:]
        return Output(total, rewards[0], rewards[1], P[:, 0].detach(), P[:, -1].detach())


def build_objective(names: list[str], weights: list[float] | None, beta: float, settings: dict) -> Objective:
    """Bind each named loss to the values of its declared ``params`` found in ``settings``."""
    losses = [get_loss(n) for n in names]
    if losses[0].data == "unpaired":
        raise ConfigError(f"loss {names[0]!r} trains on unpaired data, which this trainer does not support yet")
    params = []
    for loss in losses:
        missing = [p for p in loss.params if p not in settings]
        if missing:
            raise ConfigError(f"loss {loss.name!r} needs settings {missing} that the config does not have")
        params.append({p: settings[p] for p in loss.params})
    return Objective(losses, list(weights) if weights else [1.0] * len(losses), beta, params)
