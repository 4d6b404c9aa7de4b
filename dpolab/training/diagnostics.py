"""Alarms: the practitioner's rules of thumb, read off the training curves (docs/diagnostics.md).

Each alarm is a small pure function of the metrics history (the training rows of ``metrics.jsonl``, oldest
first, each a dict with ``step`` and the metric names of SPEC §3), judged at the history's last row, and
returns an :class:`Alarm` (name, step, the evidence, the remedy) or None. The moving means compare windows of
``window`` logged steps. :class:`Alarms` feeds them one step at a time and raises each at most once;
``length_growth`` is judged once, after training, from the task's before/after answer lengths.

Thresholds (each a ``Config`` field ``alarm_<name>``, settable by flag or YAML) are in :class:`Thresholds`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from dpolab.evaluation.metrics import read_metrics

log = logging.getLogger("dpolab")


class Alarm(NamedTuple):
    name: str
    step: int
    message: str  # what was seen, with the numbers
    remedy: str  # what to do about it

    def as_dict(self) -> dict:
        return self._asdict()


class Thresholds(NamedTuple):
    """The settable thresholds; the Config fields are ``alarm_`` + these names, with these defaults."""

    window: int = 5  # logged steps in each moving mean
    patience: int = 50  # optimizer steps before margin_stalled and not_learning can be judged
    logp_drop: float = 0.25  # displacement: nats the mean chosen log-prob falls below its first window
    margin_gain: float = 0.05  # least rise of the mean margin over its first window that counts as growing
    reward_eps: float = 0.01  # not_learning: |mean reward| below this is "near zero"
    loss_tolerance: float = 0.02  # not_learning: the loss within this fraction of its start
    easy_accuracy: float = 0.95  # too_easy: mean reward accuracy at or above this ...
    easy_steps: int = 20  # ... by this optimizer step
    ref_token_logp: float = -5.0  # reference_collapse: mean reference log-prob per chosen token below this
    length_growth: float = 0.2  # length_growth: sampled answers longer by more than this fraction


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return sum(values) / len(values) if values else float("nan")


def _windows(history: list[dict], t: Thresholds) -> tuple[list[dict], list[dict]] | None:
    """(first window, last window), or None while they would overlap."""
    return (history[:t.window], history[-t.window:]) if len(history) >= 2 * t.window else None


def displacement(history: list[dict], t: Thresholds) -> Alarm | None:
    """The chosen log-prob falls while the margin grows: both answers lose probability, the rejected faster,
    and the mass goes to answers in neither (preference displacement)."""
    if (w := _windows(history, t)) is None:
        return None
    first, last = w
    drop = _mean(first, "logps/chosen") - _mean(last, "logps/chosen")
    gain = _mean(last, "rewards/margins") - _mean(first, "rewards/margins")
    if drop > t.logp_drop and gain > t.margin_gain:
        return Alarm("displacement", history[-1]["step"],
                     f"the mean chosen log-prob fell by {drop:.3f} nats ({_mean(first, 'logps/chosen'):.3f} → "
                     f"{_mean(last, 'logps/chosen'):.3f}) while the margin grew by {gain:.3f}: the rejected answers "
                     "fall faster, and probability goes to answers that are in neither",
                     "raise --beta (e.g. ×10), lower --learning-rate, or hold the chosen answers up with RPO "
                     "(--loss sigmoid,sft --loss-weights 1,1) or --loss dpop")
    return None


def _near_zero(rows: list[dict], t: Thresholds) -> bool:
    return all(abs(_mean(rows, k)) < t.reward_eps for k in ("rewards/chosen", "rewards/rejected"))


def not_learning(history: list[dict], t: Thresholds) -> Alarm | None:
    """Chosen and rejected rewards both stay near zero and the loss stays near its start: the policy is the
    reference still."""
    if (w := _windows(history, t)) is None or history[-1]["step"] < t.patience:
        return None
    first, last = w
    loss0, loss = _mean(first, "loss"), _mean(last, "loss")
    if _near_zero(last, t) and abs(loss - loss0) <= t.loss_tolerance * abs(loss0):
        return Alarm("not_learning", history[-1]["step"],
                     f"after {history[-1]['step']} steps the mean rewards are {_mean(last, 'rewards/chosen'):.4f} "
                     f"(chosen) and {_mean(last, 'rewards/rejected'):.4f} (rejected), and the loss moved from "
                     f"{loss0:.4f} to {loss:.4f}: the policy has not left the reference",
                     "raise --learning-rate (DPO on small models takes 1e-5 to 1e-4), lower --beta, or train longer")
    return None


def margin_stalled(history: list[dict], t: Thresholds) -> Alarm | None:
    """The rewards move but the margin does not grow: the reference is mismatched with the data, or the
    labels carry little signal."""
    if (w := _windows(history, t)) is None or history[-1]["step"] < t.patience:
        return None
    first, last = w
    gain = _mean(last, "rewards/margins") - _mean(first, "rewards/margins")
    if gain < t.margin_gain and not _near_zero(last, t):
        return Alarm("margin_stalled", history[-1]["step"],
                     f"after {history[-1]['step']} steps the mean margin moved by {gain:+.4f} (under "
                     f"{t.margin_gain}) although the rewards moved (chosen {_mean(last, 'rewards/chosen'):.4f}, "
                     f"rejected {_mean(last, 'rewards/rejected'):.4f})",
                     "check the labels (dpolab inspect: contradictions, identical pairs), make the pairs on-policy "
                     "(dpolab make-pairs from this model) or revise --beta")
    return None


def too_easy(history: list[dict], t: Thresholds) -> Alarm | None:
    """Reward accuracy near 1 within the first steps: the pairs are trivial or far off-policy (the rejected
    answers are ones the model would never write), so they teach little."""
    step = history[-1]["step"]
    if step > t.easy_steps or len(history) < t.window:
        return None
    acc = _mean(history[-t.window:], "rewards/accuracies")
    if acc >= t.easy_accuracy:
        return Alarm("too_easy", step, f"the mean reward accuracy reached {acc:.3f} by step {step}: the pairs are "
                     "separated almost at once", "use harder, on-policy pairs (dpolab make-pairs, or dpolab iterate): "
                     "answers the model itself writes, judged; check dpolab inspect's off-policy report")
    return None


def reference_collapse(history: list[dict], t: Thresholds) -> Alarm | None:
    """The reference gives the preferred answers near-zero probability, so the implicit reward is dominated by
    the reference term rather than the preference."""
    if len(history) < t.window or "logps/ref_chosen" not in history[-1]:
        return None
    rows = history[-t.window:]
    if _mean(rows, "logps/ref_chosen") == 0.0:  # no reference (reference-free losses)
        return None
    per_token = _mean(rows, "logps/ref_chosen") / max(_mean(rows, "lengths/chosen"), 1e-9)
    if per_token < t.ref_token_logp:
        return Alarm("reference_collapse", history[-1]["step"],
                     f"the reference gives the chosen answers {per_token:.2f} nats per token (a geometric-mean "
                     f"token probability of {math.exp(per_token):.2g}): it would almost never write them",
                     "fine-tune the reference on the chosen answers first (SFT), use a --ref-model that fits the "
                     "data, or a reference-free loss (--loss simpo)")
    return None


def nonfinite(history: list[dict], t: Thresholds) -> Alarm | None:
    """A step was skipped because its loss or gradient was NaN or inf."""
    if history and history[-1].get("skipped"):
        return Alarm("nonfinite", history[-1]["step"], f"step {history[-1]['step']} had a non-finite loss or "
                     "gradient and was skipped (the weights did not change)",
                     "lower --learning-rate, turn off --bf16, or look for extreme rows (dpolab inspect)")
    return None


def length_growth(before: float, after: float, step: int, t: Thresholds) -> Alarm | None:
    """With a task: the trained policy's sampled answers are longer than the reference's (verbosity)."""
    if before > 0 and after > before * (1 + t.length_growth):
        return Alarm("length_growth", step, f"sampled answers grew from {before:.1f} to {after:.1f} tokens on "
                     f"average (+{after / before - 1:.0%})", "the data may prefer longer answers (dpolab inspect: "
                     "length bias): try --loss rdpo, --ld-alpha 0.5 or --loss sigmoid_norm")
    return None


CHECKS: tuple[Callable[[list[dict], Thresholds], Alarm | None], ...] = (
    nonfinite, too_easy, reference_collapse, displacement, not_learning, margin_stalled)


@dataclass
class Alarms:
    """Feeds the checks one logged step at a time; each alarm is raised (logged) at most once."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    history: list[dict] = field(default_factory=list)
    raised: list[Alarm] = field(default_factory=list)

    def observe(self, step: int, metrics: dict) -> list[Alarm]:
        self.history.append({"step": step, **metrics})
        new = []
        for check in CHECKS:
            if any(a.name == check.__name__ for a in self.raised):
                continue
            if (alarm := check(self.history, self.thresholds)) is not None:
                log.warning("alarm %s at step %d: %s. Remedy: %s", alarm.name, alarm.step, alarm.message,
                            alarm.remedy)
                new.append(alarm)
        self.raised += new
        return new

    def after_training(self, summary: dict, step: int) -> list[dict]:
        """The task's length alarm, then every alarm raised, as ``summary.json``'s ``diagnostics``."""
        if "task_length_before" in summary:
            alarm = length_growth(summary["task_length_before"], summary["task_length_after"], step, self.thresholds)
            if alarm is not None:
                log.warning("alarm %s: %s. Remedy: %s", alarm.name, alarm.message, alarm.remedy)
                self.raised.append(alarm)
        return [a.as_dict() for a in self.raised]


def replay(thresholds: Thresholds, metrics_file: Path) -> Alarms:
    """The alarms of a run so far (a resumed run's ``metrics.jsonl``, already cut at its checkpoint)."""
    alarms = Alarms(thresholds)
    for row in read_metrics(metrics_file) if metrics_file.exists() else []:
        if "loss" in row:  # training rows; eval rows carry eval/ names only
            alarms.observe(row["step"], {k: v for k, v in row.items() if k != "step"})
    return alarms


def scan(history: list[dict], thresholds: Thresholds = Thresholds()) -> list[Alarm]:
    """Every alarm a run with this history raised (what the loop computes, step by step)."""
    alarms = Alarms(thresholds)
    for row in history:
        alarms.observe(row["step"], {k: v for k, v in row.items() if k != "step"})
    return alarms.raised
