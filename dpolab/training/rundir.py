"""What a run leaves on disk (SPEC §6) and how it is written: the output directory, ``config.yaml``,
``metrics.jsonl`` (and TensorBoard), ``checkpoints/step-N/``, ``final/``, ``summary.json`` and ``plots/``.

Only the main process writes. Every write goes through :func:`dpolab.errors.writing`, so a full disk or
another write failure stops the run with one paragraph naming the file and the checkpoint that is intact.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dpolab.errors import ConfigError, writing
from dpolab.evaluation import metrics as M
from dpolab.evaluation.plots import plot_metrics
from dpolab.models import adapters
from dpolab.models.record import RECORD, run_record
from dpolab.training.card import render_card
from dpolab.training.checkpoint import save_checkpoint

if TYPE_CHECKING:  # annotations only
    from dpolab.config import Config


class RunFiles:
    """The output directory of one run, written by the main process (the others hold a no-op)."""

    def __init__(self, out: Path, main: bool, keep_checkpoints: int, accelerator=None):
        self.out, self.main, self.keep = out, main, keep_checkpoints
        self.accelerator = accelerator  # its trackers (--report-to) receive what metrics.jsonl receives
        self.saved: list[str] = []  # checkpoints written or resumed from, oldest first
        self.metrics: M.MetricsLog | None = None

    @property
    def last_saved(self) -> str | None:
        """The newest checkpoint: named in every write failure as the one that is intact."""
        return self.saved[-1] if self.saved else None

    def prepare(self, overwrite: bool) -> None:
        if self.main:
            with writing(self.out, None):
                prepare_output_dir(self.out, overwrite)

    def start(self, config: Config, resume_step: int | None, checkpoints: list[Path]) -> None:
        """``config.yaml`` and the metrics log; a resumed log drops lines written after its checkpoint."""
        self.saved = [str(checkpoints[-1])] if checkpoints else []
        if not self.main:
            return
        with writing(self.out / "config.yaml", self.last_saved):
            config.save(self.out / "config.yaml")  # the training settings
        mirror = None
        if self.accelerator is not None and self.accelerator.log_with:
            try:
                self.accelerator.init_trackers("dpolab", config=tracker_config(config))
            except Exception as e:  # the tracker's own set-up (a server, a store, a login) refused
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                raise ConfigError(f"report_to {config.report_to}: a tracker could not start ({first}); fix its "
                                  "settings or remove it from --report-to") from None
            mirror = lambda values, step: self.accelerator.log(values, step=step)  # noqa: E731
        with writing(self.out / "metrics.jsonl", self.last_saved):
            self.metrics = M.MetricsLog(self.out, resume_step, mirror)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.main:
            with writing(self.out / "metrics.jsonl", self.last_saved):
                self.metrics.write(step, values)

    def save_checkpoint(self, step: int, model, optimizer, scheduler, state: dict, reference=None) -> None:
        self.saved.append(str(save_checkpoint(self.out / "checkpoints", step, model, optimizer, scheduler,
                                              self.keep, state, reference)))

    def finish(self, model, tokenizer, config: Config, state_dict, summary: dict, objective_state: dict) -> None:
        """``final/`` (atomically), ``summary.json`` and the plots."""
        if not self.main:
            return
        card = render_card(config.training_settings(), config.training_defaults(), summary, adapters.is_peft(model))
        with writing(self.out / "final", self.last_saved, partial=self.out / ".final.tmp"):
            save_final(self.out, model, tokenizer, config, state_dict, objective_state, card)
        with writing(self.out / "summary.json", self.last_saved):
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.metrics.mirror is not None:  # not end_training(): it also destroys the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()
        with writing(self.out / "plots", self.last_saved):
            plot_metrics(self.out / "metrics.jsonl", self.out / "plots", summary.get("diagnostics", ()))


def tracker_config(config: Config) -> dict:
    """The run's settings as trackers store them (numbers, strings and booleans; anything else as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in config.training_settings().items()}


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is a file")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"output directory {out} exists and is not empty; pass --resume to continue the "
                          "run in it, --overwrite to replace it, or choose another --output-dir")


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        for child in out.iterdir():
            if child.name != "ref_cache":  # reference log-probs stay valid: they are keyed by content
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def save_final(out: Path, model, tokenizer, config: Config, state_dict=None, objective_state: dict | None = None,
               card: str | None = None) -> None:
    """``final/``: a Hugging Face model folder (with LoRA: the adapter) with tokenizer, the model ``card``
    (``README.md``), and ``dpolab.json``, what ``dpolab eval`` and ``score`` need to measure with the run's own
    reference and objective; with ``merge_on_save`` also ``merged/``, the adapter folded into the base.
    Written beside and renamed into place, so a crash never leaves a half-written ``final/``."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapters.is_peft(model):
        adapters.save_adapter(model, tmp, state_dict)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    (tmp / RECORD).write_text(json.dumps(run_record(config, objective_state or {}), indent=2))
    if card is not None:  # the model card, README.md (PEFT writes a stub of its own: replaced)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if config.merge_on_save:
        adapters.merge(str(final), str(out / "merged"), config.trust_remote_code, config.allow_pickle_weights)
