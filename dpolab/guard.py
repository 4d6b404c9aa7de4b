"""Run guards: preemption signals, non-finite steps, failed writes.

:class:`StopSignals` turns SIGTERM and SIGINT into a flag the loop reads between optimizer steps, so the
run saves a checkpoint and stops cleanly instead of dying mid-step (the preemption path).
:class:`NonFiniteGuard` counts steps skipped for a non-finite loss or gradient and stops the run after
``patience`` of them in a row.
:func:`writing` turns a write that fails (a full disk, a quota, a vanished mount) into one clear message
naming the file and the checkpoint that is still intact.
"""

from __future__ import annotations

import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from dpolab.errors import TrainingError

# What a failed write raises: Python's own files (OSError, with errno ENOSPC, EDQUOT, EFBIG, ...), torch.save
# (RuntimeError from its zip writer, e.g. "[enforce fail at inline_container.cc] unexpected pos ..."), and
# safetensors (SafetensorError "Error while serializing: I/O error: ..."), as each does when the kernel
# refuses a write.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


@contextmanager
def writing(path: Path | str, last_checkpoint: str | None, partial: Path | None = None):
    """Run a write of ``path``; if it fails, remove the ``partial`` folder it was written into and stop with
    one paragraph: what could not be written and why, the free space there, and which checkpoint is intact.
    The original exception is kept as the cause."""
    try:
        yield
    except WRITE_ERRORS as e:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise TrainingError(write_failure(path, e, last_checkpoint)) from e


def write_failure(path: Path | str, e: BaseException, last_checkpoint: str | None) -> str:
    if isinstance(e, OSError):
        reason = e.strerror or str(e)
    elif isinstance(e, SafetensorError):
        reason = f"safetensors: {str(e).strip()}"
    else:
        reason = f"torch could not write it ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
    free = ""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            free = f" ({shutil.disk_usage(parent).free / 1e6:.0f} MB free on that file system)"
            break
    where = (f"the previous checkpoint, {last_checkpoint}, is intact: free space and continue with --resume"
             if last_checkpoint else "no checkpoint was saved before this (see --save-every)")
    return f"could not write {path}: {reason}{free}. Stopped; {where}"


class StopSignals:
    """Context manager: while inside, SIGTERM/SIGINT set ``self.signum`` instead of killing the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = 0
        self._old = {}

    def _handle(self, signum, frame):
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # handlers only work there
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)

    def requested(self, accelerator) -> int:
        """The signal number if any process received one (all processes agree), else 0."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor(float(self.signum), device=accelerator.device)
        return int(accelerator.reduce(flag, "max").item())


class NonFiniteGuard:
    def __init__(self, patience: int):
        self.patience = patience
        self.in_a_row = 0
        self.total = 0

    def update(self, skipped: bool, step: int, last_checkpoint: str | None) -> None:
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += skipped
        if self.patience and self.in_a_row >= self.patience:
            where = f"the last checkpoint, {last_checkpoint}, is intact" if last_checkpoint else "no checkpoint was saved"
            raise TrainingError(
                f"stopped at step {step}: the loss or the gradient was not finite (NaN or inf) in {self.in_a_row} "
                f"steps in a row, so none of them changed the weights; {where}. Lower --learning-rate, turn "
                "off --bf16, or check the data for extreme rows; --max-nonfinite-steps sets how many are allowed")
