"""Run guards: preemption signals and non-finite steps (failed writes: :func:`dpolab.errors.writing`).

:class:`StopSignals` turns SIGTERM and SIGINT into a flag the loop reads between optimizer steps, so the
run saves a checkpoint and stops cleanly instead of dying mid-step (the preemption path).
:class:`NonFiniteGuard` counts steps skipped for a non-finite loss or gradient and stops the run after
``patience`` of them in a row.
"""

from __future__ import annotations

import signal
import threading

import torch

from dpolab.errors import TrainingError

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
