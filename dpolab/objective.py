"""The objective: registry losses bound, once at setup, to their hyper-parameters, weights and modifiers.

It turns per-sequence log-probs (S,) into per-example losses (B,) by reading each loss's declaration
(paired, ranked or unpaired data; lengths; columns; KL pairs; state; f-divergence), and never branches on
a loss name. Sequence ``s`` of a batch is completion ``s % K`` of example ``s // K``:
paired data has K = 2 (chosen, rejected); ranked data K answers best first; unpaired data K = 1, or 2 when
the loss needs KTO's mismatched pairs (the row's own completion, then another row's completion).

This module also owns the rule "which setting reaches which loss": a loss's own ``params`` (declared in
the registry), the modifier settings of :data:`MODIFIER_SETTINGS`, :func:`unused_settings` (no option is
accepted and ignored), and :data:`OBJECTIVE_FIELDS`, every config field the objective reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple, Sequence

import torch

from dpolab.errors import ConfigError
from dpolab.losses import (LOSSES, Loss, f_divergence_inputs, get_loss, kto_kl_estimate, update_running_mean,
                           wpo_weights)

if TYPE_CHECKING:  # annotations only
    from dpolab.data.batch import Batch

Tensor = torch.Tensor


@dataclass
class Output:
    losses: Tensor  # (B,) Σ_k w_k · loss_k per example
    chosen_rewards: Tensor  # (B,) reward of the chosen (best) completion (SPEC §1); unpaired: (n_desirable,)
    rejected_rewards: Tensor  # (B,) of the rejected (worst) completion; unpaired: (n_undesirable,)
    chosen_logps: Tensor  # policy log-probs matching chosen_rewards, detached
    rejected_logps: Tensor
    paired: bool = True  # chosen_rewards[i] and rejected_rewards[i] belong to the same example
    kl: Tensor | None = None  # KTO's batch KL estimate
    ref_chosen_logps: Tensor | None = None  # reference log-probs matching chosen_logps (0 with no reference)
    ref_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None  # completion tokens matching chosen_logps
    rejected_lengths: Tensor | None = None


@dataclass
class Objective:
    losses: list[Loss]
    weights: list[float]
    beta: float
    params: list[dict]  # per loss: its hyper-parameters by name
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False  # WPO
    running_delta: bool = False  # BCO's δ as the running mean of rewards (else 0)
    gather: Callable[[Tensor], Tensor] = lambda t: t  # across processes, for batch statistics
    state: dict = field(default_factory=lambda: {"delta_mean": 0.0, "delta_count": 0})

    @property
    def data(self) -> str:
        return self.losses[0].data

    @property
    def needs_ref(self) -> bool:
        return any(loss.needs_ref for loss in self.losses)

    @property
    def needs_kl(self) -> bool:
        return any(loss.needs_kl for loss in self.losses)

    @property
    def columns(self) -> set[str]:
        return {c for loss in self.losses for c in loss.columns}

    def __call__(self, policy_logps: Tensor | tuple[Tensor, Tensor], ref_logps: Tensor, batch: Batch) -> Output:
        """``policy_logps``: (S,), or with WPO ``(logps, aligned)`` as ``SequenceLogps(..., aligned=True)``
        returns them; ``ref_logps`` (S,)."""
        policy_logps, aligned = policy_logps if isinstance(policy_logps, tuple) else (policy_logps, None)
        K = batch.num_completions
        P, R, L = policy_logps.view(-1, K), ref_logps.view(-1, K), batch.lengths.view(-1, K)  # (B, K)
        h = (P - R).detach()
        if self.data == "unpaired":
            return self._unpaired(P, R, h, batch)
        delta = self._delta(self.beta * h) if any("delta" in loss.state for loss in self.losses) else None
        total, reported = 0.0, None
        for loss, w, params in zip(self.losses, self.weights, self.params):
            kwargs = dict(params, beta=self.beta)
            if "margin" in loss.columns:
                kwargs["margin"] = batch.margins
            if "delta" in loss.state:
                kwargs["delta"] = delta
            if loss.data == "ranked":
                out = loss(P, R, **kwargs)
            else:
                if loss.needs_lengths:
                    kwargs.update(chosen_lengths=L[:, 0], rejected_lengths=L[:, 1])
                inputs = (P[:, 0], P[:, 1], R[:, 0], R[:, 1])
                if self.f_divergence_type != "reverse_kl":
                    inputs = f_divergence_inputs(loss, *inputs, f_divergence_type=self.f_divergence_type,
                                                 f_alpha_divergence_coef=self.f_alpha_divergence_coef)
                out = loss(*inputs, **kwargs)
            total = total + w * out[0]
            if loss.own_reward and reported is None:
                reported = out[1].detach(), out[2].detach()
        if self.use_weighting:  # WPO: the aligned log-probs already hold −Σ log Σ_v p², so no S here
            if aligned is None:
                raise ValueError("use_weighting (WPO) needs the policy's aligned log-probs: "
                                 "SequenceLogps(model, aligned=True)")
            A = aligned.view(-1, K)
            total = total * wpo_weights(A[:, 0], A[:, 1], L[:, 0], L[:, 1])
        # SPEC §1: the first listed loss's own reward (SimPO's β·π/n, ...), else the implicit reward β·h of the
        # best and the worst completion (never β·f(h) under f-DPO: f replaces h inside the loss only).
        chosen, rejected = reported or (self.beta * h[:, 0], self.beta * h[:, -1])
        return Output(total, chosen, rejected, P[:, 0].detach(), P[:, -1].detach(), ref_chosen_logps=R[:, 0].detach(),
                      ref_rejected_logps=R[:, -1].detach(), chosen_lengths=L[:, 0], rejected_lengths=L[:, -1])

    def _unpaired(self, P: Tensor, R: Tensor, h: Tensor, batch: Batch) -> Output:
        labels = batch.labels.to(P.device)
        # KTO's KL pairs from every process, so that z is the same global-batch estimate on each of them.
        kl_pairs = (self.gather(P[:, 1].detach()), self.gather(R[:, 1])) if self.needs_kl else None
        kl = kto_kl_estimate(*kl_pairs) if kl_pairs else None
        delta = self._delta(self.beta * h[:, 0]) if any("delta" in loss.state for loss in self.losses) else None
        total = 0.0
        for loss, w, params in zip(self.losses, self.weights, self.params):
            kwargs = dict(params, beta=self.beta)
            if loss.needs_kl:
                kwargs.update(kl_policy_logps=kl_pairs[0], kl_ref_logps=kl_pairs[1])
            if "delta" in loss.state:
                kwargs["delta"] = delta
            total = total + w * loss(P[:, 0], R[:, 0], labels, **kwargs)[0]
        r, logp, ref = self.beta * h[:, 0], P[:, 0].detach(), R[:, 0].detach()
        n = batch.lengths.view(-1, P.shape[1])[:, 0]  # (B,) tokens of each row's own completion
        return Output(total, r[labels], r[~labels], logp[labels], logp[~labels], paired=False, kl=kl,
                      ref_chosen_logps=ref[labels], ref_rejected_logps=ref[~labels], chosen_lengths=n[labels],
                      rejected_lengths=n[~labels])

    def _delta(self, rewards: Tensor) -> Tensor | float:
        """BCO's δ: the running mean of every reward seen so far (while training), or 0."""
        if not self.running_delta:
            return 0.0
        if torch.is_grad_enabled():  # evaluation reads δ without moving it
            mean, count = update_running_mean(self.state["delta_mean"], self.state["delta_count"],
                                              self.gather(rewards.flatten()))
            self.state.update(delta_mean=float(mean), delta_count=int(count))
        return self.state["delta_mean"]


def build_objective(names: list[str], weights: list[float] | None, beta: float, settings: dict,
                    gather: Callable[[Tensor], Tensor] | None = None) -> Objective:
    """Bind each named loss to the values of its declared ``params`` (and the modifiers) in ``settings``."""
    losses = [get_loss(n) for n in names]
    params = []
    for loss in losses:
        missing = [p for p in loss.params if p not in settings]
        if missing:
            raise ConfigError(f"loss {loss.name!r} needs settings {missing} that the config does not have")
        params.append({p: settings[p] for p in loss.params})
    f_type = settings.get("f_divergence_type", "reverse_kl")
    if f_type != "reverse_kl":
        bad = [loss.name for loss in losses if loss.needs_ref and not loss.f_divergence]
        if bad:
            raise ConfigError(f"f_divergence_type {f_type} does not apply to {', '.join(bad)} (see docs/losses.md)")
    return Objective(losses, list(weights) if weights else [1.0] * len(losses), beta, params,
                     f_divergence_type=f_type,
                     f_alpha_divergence_coef=settings.get("f_alpha_divergence_coef", 0.5),
                     use_weighting=settings.get("use_weighting", False),
                     running_delta=settings.get("bco_running_delta", False),
                     gather=gather or (lambda t: t))


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


# Every config field the objective reads: the losses and their weights, β, each loss's hyper-parameters (the
# registry's ``params``) and the modifiers, but TR-DPO's, which move the reference during training only. A run
# records them in final/ (dpolab.models.record); `dpolab eval` takes them as flags.
REFERENCE_UPDATES = ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")
OBJECTIVE_FIELDS = ("loss", "loss_weights", "beta", *sorted({p for loss in LOSSES.values() for p in loss.params}),
                    *(s.name for s in MODIFIER_SETTINGS if s.name not in REFERENCE_UPDATES))
