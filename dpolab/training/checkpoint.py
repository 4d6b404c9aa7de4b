"""Resumable checkpoints: ``checkpoints/step-N/`` holds weights (safetensors), optimizer and scheduler
state, RNG states and the step. The data position follows from the step (the order of every epoch is a
seeded permutation), so resuming replays exactly the batches an uninterrupted run would see.

A checkpoint is written into a temporary folder and renamed into place; ``state.json`` is written last,
so a folder without it is incomplete and ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from dpolab.errors import WRITE_ERRORS, DpolabError, TrainingError, write_failure

STEP = re.compile(r"^step-(\d+)$")


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, optimizer, scheduler, keep: int,
                    extra: dict | None = None, reference: torch.nn.Module | None = None) -> Path:
    """Write ``root/step-{step}`` atomically and keep only the newest ``keep`` checkpoints. A reference
    that training moves (TR-DPO) is saved too, and ``extra``: JSON state of the run (the objective's running
    statistics, the token count)."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        save_file(_rng_state(), str(tmp / "rng.safetensors"))
        if reference is not None:
            save_model(reference, str(tmp / "reference.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "extra": extra or {}}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except WRITE_ERRORS as e:  # a full disk: OSError, torch's RuntimeError or a SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        raise TrainingError(write_failure(final, e, str(previous[-1]) if previous else None)) from e
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    """``state.json`` of a checkpoint: the step and the run's extra state."""
    return json.loads((path / "state.json").read_text())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights training changes: all of them, or with LoRA only the adapters (the frozen base is
    reloaded from the model folder on resume, so a checkpoint stays small)."""
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler,
                    reference: torch.nn.Module | None = None) -> tuple[int, dict]:
    """Restore everything saved by :func:`save_checkpoint`; return the step it was taken at and ``extra``."""
    state = load_file(str(path / "model.safetensors"))
    missing = set(trainable_state(model)) - set(state)
    if missing:
        raise DpolabError(f"checkpoint {path} does not match the model: no weights for {sorted(missing)[:3]}")
    model.load_state_dict(state, strict=False)
    if reference is not None:
        load_model(reference, str(path / "reference.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(load_file(str(path / "rng.safetensors")))
    state = json.loads((path / "state.json").read_text())
    return state["step"], state.get("extra", {})
