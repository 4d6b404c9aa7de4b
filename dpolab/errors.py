"""User-facing errors. The command line prints them as one paragraph and exits non-zero, no traceback.

:func:`writing` turns a write that fails (a full disk, a quota, a vanished mount) into one such paragraph,
naming the file and the checkpoint that is still intact.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class DpolabError(Exception):
    """A mistake in what the user gave us (settings, files, data), explained in its message."""


class ConfigError(DpolabError):
    """An unknown key, a value of the wrong type, or an impossible combination of settings."""


class DataError(DpolabError):
    """A data file or row that cannot be used; the message names the file, the line and the field."""


class TrainingError(DpolabError):
    """Training cannot go on (e.g. non-finite losses in a row); the last checkpoint is intact."""


class Interrupted(DpolabError):
    """SIGTERM or SIGINT arrived: a checkpoint was saved and the run stopped cleanly."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


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


class JudgeError(DpolabError):
    """A judge that cannot be built (unknown name, missing model) or that failed while judging (bad output,
    an endpoint down); the message says how many pairs were judged before it stopped."""
