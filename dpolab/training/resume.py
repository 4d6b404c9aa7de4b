"""Every rule of ``--resume`` in one place: which checkpoint a run continues from, which settings may change
(those that decide what is logged, saved, evaluated or allowed, never the weights' trajectory), and that the
training rows are the ones the checkpoint was trained on. What a checkpoint holds is
:mod:`dpolab.training.checkpoint`'s; the metrics log drops the lines written after it
(:class:`dpolab.evaluation.metrics.MetricsLog`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dpolab.errors import ConfigError
from dpolab.losses import LOSSES
from dpolab.training.checkpoint import list_checkpoints, read_state

if TYPE_CHECKING:  # annotations only
    from dpolab.config import Config


# Settings that may change between a run and its --resume: they decide what is logged, saved, evaluated or
# allowed, never the weights' trajectory. Every other setting must match the run's config.yaml, or the
# resumed run would silently differ from the uninterrupted one. (eval_data and eval_split only pick the
# held-out rows; a change that alters the training rows is caught by the data digest.)
RUN_CONTROL = {"output_dir", "resume", "overwrite", "progress", "eval_data", "eval_split", "eval_every", "save_every",
               "save_total_limit", "log_every", "max_nonfinite_steps", "task", "task_prompts", "task_samples",
               "task_max_new_tokens", "merge_on_save", "ref_cache_dir", "trust_remote_code", "allow_pickle_weights",
               "ignore_columns", "skip_invalid"}
LENGTH = {"max_steps", "epochs"}  # may grow only when the schedule does not depend on the total steps


def resume_conflicts(saved: dict, current: dict) -> list[str]:
    """The settings of ``current`` that differ from the ``saved`` config.yaml in a way that changes training,
    as "name (saved → current)"; empty when the run can continue exactly."""
    out = []
    for name, now in current.items():
        if name in RUN_CONTROL or name not in saved:
            continue
        before = saved[name]
        if name in ("model", "ref_model", "data") and before and now and Path(before).exists() and Path(now).exists():
            before, now = str(Path(before).resolve()), str(Path(now).resolve())
        if before == now:
            continue
        if name in LENGTH and saved.get("lr_scheduler") == current.get("lr_scheduler") == "constant":
            continue  # a constant learning rate: more steps continue the same run exactly
        out.append(f"{name} ({before!r} → {now!r})")
    return out


def data_digest(examples) -> str:
    """A digest of the tokenised training rows, so a resume notices data that changed under the same name."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.prompt_ids, ex.completion_ids, ex.label, ex.margin]).encode())
    return h.hexdigest()[:16]


def check_resume_settings(saved_config: Path, config: Config) -> None:
    """Refuse a --resume whose settings would not continue the saved run exactly (see RUN_CONTROL)."""
    if not saved_config.is_file():
        return
    conflicts = resume_conflicts(yaml.safe_load(saved_config.read_text()) or {}, config.to_dict())
    if conflicts:
        raise ConfigError(f"cannot resume: {', '.join(conflicts)} differ from {saved_config}, so the run would not "
                          "continue the same trajectory. Resume with the saved values, or start a new run (another "
                          "--output-dir, or --overwrite). Logging, saving and evaluation settings may change; "
                          "--max-steps and --epochs only with --lr-scheduler constant (other schedules are spread "
                          "over the total steps)")


def checkpoints_to_resume(out: Path, config: Config) -> list[Path]:
    """The complete checkpoints a ``--resume`` run may continue from (newest last), after refusing settings
    that would not continue the saved run exactly; empty without ``--resume``. Needs no data or model."""
    checkpoints = list_checkpoints(out / "checkpoints") if config.resume else []
    if checkpoints:
        check_resume_settings(out / "config.yaml", config)
    return checkpoints


def check_same_data(checkpoints: list[Path], digest: str) -> None:
    """Refuse a resume whose tokenised training rows differ from the ones its checkpoint was trained on."""
    if checkpoints and read_state(checkpoints[-1]).get("extra", {}).get("data_digest", digest) != digest:
        raise ConfigError(f"cannot resume from {checkpoints[-1]}: the training rows differ from the ones it was "
                          "trained on (same settings, but the data file's content or the rows kept changed)")


def continue_run(config: Config, out: Path) -> tuple[dict | None, Config]:
    """How a command of several runs (sweep, iterate) takes up the run directory ``out``: ``(summary, config)``
    with the summary of a finished run (kept, not retrained), else ``(None, the config to train)``, which
    resumes a stopped run from its newest checkpoint or trains afresh where there is none (``overwrite``:
    always afresh). Reference log-probs are precomputed where a frozen reference would be used, so every run
    of the command shares one content-keyed cache (``ref_cache_dir``)."""
    summary_file = out / "summary.json"
    if summary_file.is_file() and not config.overwrite:
        return json.loads(summary_file.read_text()), config
    uses_ref = any(LOSSES[n].needs_ref for n in config.loss_names) and not config.reference_free
    stopped = not config.overwrite and bool(list_checkpoints(out / "checkpoints"))
    return None, dataclasses.replace(config, output_dir=str(out), resume=stopped, overwrite=not stopped,
                                     precompute_ref=config.precompute_ref or (uses_ref and not config.sync_ref_model))
