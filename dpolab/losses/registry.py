"""The loss registry: one :class:`Loss` entry per name, declaring what its function needs.

``LOSSES[name]`` is a :class:`Loss`; calling it calls the loss function. Its fields declare what the
function needs, so the trainer reads declarations and never branches on a name:

- ``data``: ``"paired"`` functions take ``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
  ref_rejected_logps, *, beta, **extras)``; ``"ranked"`` ones take ``(policy_logps, ref_logps, *, beta)``
  of shape (B, K), best completion first; ``"unpaired"`` ones take ``(policy_logps, ref_logps, labels, *,
  beta, ...)`` with ``labels`` a bool tensor (True = desirable). All return ``(losses, chosen_rewards,
  rejected_rewards)``: ``losses`` is (B,); the rewards are (B,) for paired and ranked data (ranked: the best
  and the worst completion), and for unpaired data (n_desirable,) and (n_undesirable,).
- ``needs_ref``: False for reference-free losses; the trainer then builds no reference at all. Paired
  reference-free functions keep the four-tensor signature so every paired loss is called the same way;
  they do not read ``ref_*`` (pass zeros, or the real values when combined with a reference loss).
- ``needs_lengths``: the function takes ``chosen_lengths`` and ``rejected_lengths`` (completion tokens, (B,)).
- ``needs_kl``: the function takes ``kl_policy_logps`` and ``kl_ref_logps`` (B,): log-probs of mismatched
  (prompt, completion) pairs, for KTO's KL estimate. They are detached inside.
- ``columns``: per-row data columns it takes as keyword tensors of shape (B,) (e.g. ``margin``).
- ``params``: hyper-parameters it takes as keywords; each is a field of the flat config with the same name,
  so the trainer binds them once at setup. :attr:`Loss.param_defaults` reads their defaults.
- ``state``: keyword inputs the trainer maintains across steps (``delta``, BCO's running reward mean,
  see :func:`dpolab.losses.update_running_mean`); the function's default is used when absent.
- ``f_divergence``: the loss only depends on the log-ratios through quantities where f-DPO's log Z(x)
  cancels, so :func:`dpolab.losses.f_divergence_logratios` may replace h before calling it.
- ``batch_coupled``: a row's value depends on other rows of the batch (a token-level mean over the batch,
  sorting, a batch KL estimate): gradient accumulation changes the result unless micro-batches are whole.
- ``row_weights``: row i of ``losses`` belongs to example i, so per-example weights (WPO) may multiply it;
  False where rows are sorted over the batch (``aot``), so row i is a rank, not an example.
- ``own_reward``: the loss optimises a reward of its own (SimPO's β·π/n, AlphaPO's shaped reward, ORPO's
  log-odds, CPO's β·π), returned as its second and third outputs; the metrics report it instead of β·h
  (SPEC §1). With several losses, the first listed loss that declares one sets the reported reward.
- ``margin_check``: for losses reading the ``margin`` column, ``(margin, **params) → str | None``: why a
  row's value cannot be used (ODPO's log of a gap ≤ 0), so the builder refuses the row, naming it, before any
  model is loaded.
- ``label_advice``: for unpaired losses, ``(n_desirable, n_undesirable, **params) → str | None``, a warning
  when the label balance makes the loss's parameters a poor fit (KTO's weights), given at setup.
- ``pinned_by``: the independent checks that pin the loss, as (what it is checked against, "file::test"):
  TRL's code, a closed form, an optimisation, calculus; docs/losses.md lists them and a test checks that
  every loss has one and that each test exists.
- ``paper``, ``trl_name`` (the TRL 1.16 trainer/loss with the same formula, if any), ``default_beta`` (the
  paper's β when it differs from 0.1), ``pick_when`` (one line of advice for the docs).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

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
    needs_kl: bool = False
    columns: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    f_divergence: bool = False
    batch_coupled: bool = False
    row_weights: bool = True
    own_reward: bool = False
    margin_check: Callable[..., str | None] | None = None
    pinned_by: tuple[tuple[str, str], ...] = ()
    label_advice: Callable[..., str | None] | None = None
    paper: str = ""
    trl_name: str | None = None  # the TRL 1.16 trainer/loss computing the same formula, if any
    default_beta: float | None = None  # the paper's β when it differs from the global default
    pick_when: str = ""
    extra: dict = field(default_factory=dict)

    def __call__(self, *args, **kwargs) -> LossOutput:
        return self.fn(*args, **kwargs)

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.fn.__doc__ or "")

    @property
    def param_defaults(self) -> dict:
        """``{param: default}`` read from the function's signature (the single source of the defaults)."""
        sig = inspect.signature(self.fn).parameters
        return {p: sig[p].default for p in self.params}


LOSSES: dict[str, Loss] = {}
# The check that pins most of TRL's DPOTrainer losses (a ``pinned_by`` entry).
TRL_DPO_CODE = ("TRL 1.16's DPOTrainer loss code on the same log-probs (value and gradient)",
                "tests/test_losses_trl.py::test_dpo_trainer_losses")


def register(name: str, **declaration) -> Callable:
    """Add a loss function to :data:`LOSSES` under ``name`` with its declaration (see module docstring)."""

    def add(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        sig = inspect.signature(fn).parameters
        for p in (*declaration.get("params", ()), *declaration.get("state", ())):
            if p not in sig or sig[p].kind is not inspect.Parameter.KEYWORD_ONLY:
                raise TypeError(f"loss {name!r} declares {p!r}, which is not a keyword-only argument of {fn.__name__}")
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


def rewards(beta: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """Implicit rewards r = β·h (SPEC §1), detached: they are reported, never differentiated."""
    return beta * chosen.detach(), beta * rejected.detach()


def token_mean_nll(policy_chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Per-example values whose batch mean is the NLL per token over ALL chosen tokens: −Σπ_c / Σn_c.

    Row i gets ``−π_c[i] · B / Σn_c``; the gradient of the mean wrt π_c[i] is −1/Σn_c for every token,
    exactly that of a cross-entropy averaged over the batch's chosen tokens (TRL's ``sft`` and CPO's NLL).
    """
    B = policy_chosen_logps.shape[0]
    total_tokens = chosen_lengths.to(policy_chosen_logps.dtype).sum().clamp(min=1.0)
    return -policy_chosen_logps * (B / total_tokens)  # (B,)
