"""Reference strategies (SPEC §5), chosen once at setup. Each is called with a batch and returns the
reference's per-sequence log-probs (S,), with no gradient:

- :class:`ModelReference`: a frozen model (a copy of the initial policy, or ``--ref-model``);
- :class:`CachedReference`: log-probs computed once by :func:`precompute` and stored on disk, keyed by
  :func:`cache_key`; no reference model is held while training;
- :class:`NoReference`: zeros, for reference-free losses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab.batch import Batch, collate
from dpolab.logps import SequenceLogps
from dpolab.tokenization import Example

log = logging.getLogger("dpolab")
Tensor = torch.Tensor


class ModelReference:
    """A frozen model in eval mode, run under ``no_grad``."""

    def __init__(self, model: torch.nn.Module, chunk: int = 1024, autocast=nullcontext, ld_alpha: float | None = None):
        model.eval().requires_grad_(False)
        self.logps = SequenceLogps(model, chunk, ld_alpha)
        self.autocast = autocast  # the policy's precision context, so that policy = reference at step 0

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Tensor:
        with self.autocast():
            return self.logps(**batch.model_inputs()).float()


class CachedReference:
    """Looks the batch's rows up in a table (num_examples, K) of precomputed reference log-probs."""

    def __init__(self, table: Tensor):
        self.table = table

    def __call__(self, batch: Batch) -> Tensor:
        rows = self.table[batch.example_ids.cpu()]  # (B, K)
        return rows.reshape(-1).to(batch.input_ids.device)  # (S,)


class NoReference:
    """Reference-free: ref log-probs of 0."""

    def __call__(self, batch: Batch) -> Tensor:
        return torch.zeros(batch.num_sequences, device=batch.input_ids.device)


def model_fingerprint(name_or_path: str) -> str:
    """Digest of a local model's weight and config files, or the hub id with its resolved revision."""
    path = Path(name_or_path)
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file())
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        return "local:" + h.hexdigest()
    from transformers import AutoConfig

    revision = getattr(AutoConfig.from_pretrained(name_or_path), "_commit_hash", None) or "unknown"
    return f"hub:{name_or_path}@{revision}"


def cache_key(reference: str, examples: list[Example], settings: dict) -> str:
    """Hash of (reference weights, tokenised data, tokenisation and precision settings)."""
    h = hashlib.sha256()
    h.update(reference.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        h.update(json.dumps([ex.index, ex.prompt_ids, ex.completion_ids]).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_table(reference: ModelReference, examples: list[Example], pad_id: int, batch_size: int,
                  device: torch.device, progress: bool = False) -> Tensor:
    """Reference log-probs of every example: (num_examples, K) in example-index order."""
    from tqdm.auto import tqdm

    K = len(examples[0].completion_ids)
    table = torch.zeros(len(examples), K)
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, desc="reference log-probs", disable=not progress, leave=False):
        chunk = examples[i: i + batch_size]
        batch = collate(chunk, pad_id).to(device)
        table[batch.example_ids.cpu()] = reference(batch).float().cpu().view(-1, K)
    return table


def load_or_compute(cache_dir: Path, key: str, compute) -> Tensor:
    """Return the cached table for ``key``, or compute it, write it atomically, and return it."""
    path = cache_dir / f"ref-logps-{key[:24]}.safetensors"
    if path.exists():
        try:
            tensors = load_file(str(path))
            log.info("using cached reference log-probs %s", path)
            return tensors["logps"]
        except Exception as e:  # a damaged cache is recomputed, not trusted
            log.warning("ignoring unreadable reference cache %s (%s)", path, e)
    table = compute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": table.contiguous()}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    log.info("cached reference log-probs in %s", path)
    return table
