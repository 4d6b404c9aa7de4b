"""What a trained ``final/`` folder records in ``dpolab.json``: the reference it was trained against and the
objective it was trained with (losses, β, every setting a loss or modifier reads, the tokenisation and
batch, the precision, and the objective's state such as BCO's running δ), so that ``dpolab eval``,
``dpolab score`` and ``dpolab task-eval`` measure with the run's own objective unless told otherwise."""

from __future__ import annotations

import json
from pathlib import Path

from dpolab.objective import OBJECTIVE_FIELDS

RECORD = "dpolab.json"
TOKENISATION = ("max_length", "max_prompt_length", "batch_size", "template_mismatch")  # kept for any loss
RECORDED = (*OBJECTIVE_FIELDS, *TOKENISATION, "bf16")


def run_record(config, objective_state: dict) -> dict:
    """What ``final/dpolab.json`` holds: the reference, β and loss (read by people and older dpolab), every
    recorded setting, and the objective's state."""
    reference = config.ref_model or config.model
    if Path(reference).exists():
        reference = str(Path(reference).resolve())
    settings = {k: getattr(config, k) for k in RECORDED}
    return {"reference": reference, "beta": config.beta, "loss": config.loss, "settings": settings,
            "objective_state": dict(objective_state)}


def read_record(model: str) -> dict:
    """The record of a dpolab ``final/`` folder, or {} for any other model."""
    meta = Path(model) / RECORD
    return json.loads(meta.read_text()) if meta.is_file() else {}


def default_reference(model: str) -> str | None:
    """The reference a dpolab ``final/`` folder was trained against, if it says."""
    return read_record(model).get("reference")


def recorded_settings(record: dict, given: dict) -> dict:
    """The settings of a run's record beneath what the user ``given``: all of them, or only the tokenisation
    and batch when the user names another loss (the recorded β and loss settings belong to the recorded loss)."""
    settings = dict(record.get("settings") or {"beta": record.get("beta"), "loss": record.get("loss")})
    settings = {k: v for k, v in settings.items() if v is not None}
    if "loss" in given and given["loss"] != settings.get("loss"):
        settings = {k: v for k, v in settings.items() if k in TOKENISATION}
    return settings


def beta_source(model: str, given: dict, used: dict) -> str:
    """Where the β in use came from, for the line that says so."""
    if "beta" in given:
        return "given"
    return f"recorded in {Path(model) / RECORD}" if "beta" in used else "the loss's default"
