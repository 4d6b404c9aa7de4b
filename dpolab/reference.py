"""Reference strategies (SPEC §5), chosen once at setup. Each is called with a batch and returns the
reference's per-sequence log-probs (S,), with no gradient:

- :class:`ModelReference`: a frozen model (a copy of the initial policy, or ``--ref-model``);
- :class:`CachedReference`: log-probs computed once by :func:`precompute` and stored on disk, keyed by
  :func:`cache_key`; no reference model is held while training;
- :class:`NoReference`: zeros, for reference-free losses;
- :class:`dpolab.adapters.AdapterReference`: the policy itself with its LoRA adapters switched off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dpolab.batch import DEFAULT_LAYOUT, DEFAULT_ROW_TOKENS, Batch, make_batch
from dpolab.logps import SequenceLogps
from dpolab.tokenization import Example

log = logging.getLogger("dpolab")
Tensor = torch.Tensor


class ModelReference:
    """A frozen model in eval mode, run under ``no_grad``, on ``device`` (default: where the batch is)."""

    def __init__(self, model: torch.nn.Module, chunk: int = 1024, autocast=nullcontext, device=None,
                 ld_alpha: float | None = None):
        model.eval().requires_grad_(False)
        self.logps = SequenceLogps(model, chunk, ld_alpha)
        self.autocast = autocast  # the policy's precision context, so that policy = reference at step 0
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Tensor:
        where = batch.input_ids.device
        if self.device is not None and torch.device(self.device) != where:
            batch = batch.to(self.device)  # e.g. a reference kept in CPU memory, off the GPU
        with self.autocast():
            return self.logps(**batch.model_inputs()).float().to(where)


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
def compute_table(reference, examples: list[Example], pad_id: int, batch_size: int, device: torch.device,
                  progress: bool = False, rank: int = 0, world: int = 1, layout: str = DEFAULT_LAYOUT,
                  row_tokens: int = DEFAULT_ROW_TOKENS) -> Tensor:
    """Reference log-probs (num_examples, K) in example-index order, of this process's share of the rows.

    Process ``rank`` of ``world`` computes examples rank, rank + world, ...; the other rows stay 0, so the
    sum of every process's table over processes is the whole table. Every process runs the same number
    of batches (a short share repeats its own last example), so a sharded reference's collectives match.
    """
    from tqdm.auto import tqdm

    K = len(examples[0].completion_ids)
    table = torch.zeros(len(examples), K)
    mine = list(range(rank, len(examples), world))
    per_process = math.ceil(len(examples) / world)
    order = mine + [mine[-1] if mine else 0] * (per_process - len(mine))  # padding, never written
    for i in tqdm(range(0, per_process, batch_size), desc="reference log-probs", disable=not progress, leave=False):
        batch = make_batch([examples[j] for j in order[i: i + batch_size]], pad_id, layout, row_tokens).to(device)
        logps = reference(batch).float().cpu().view(-1, K)  # (B, K)
        owned = max(0, min(batch_size, len(mine) - i))
        table[batch.example_ids[:owned].cpu()] = logps[:owned]
    return table


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / f"ref-logps-{key[:24]}.safetensors"


def read_cache(cache_dir: Path, key: str) -> Tensor | None:
    """The cached table for ``key``, or None if there is none (or it is unreadable)."""
    path = cache_path(cache_dir, key)
    if not path.exists():
        return None
    try:
        table = load_file(str(path))["logps"]
        log.info("using cached reference log-probs %s", path)
        return table
    except Exception as e:  # a damaged cache is recomputed, not trusted
        log.warning("ignoring unreadable reference cache %s (%s)", path, e)
        return None


def write_cache(cache_dir: Path, key: str, table: Tensor) -> None:
    """Write the table atomically."""
    path = cache_path(cache_dir, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": table.contiguous()}, str(tmp), metadata={"key": key})
    os.replace(tmp, path)
    log.info("cached reference log-probs in %s", path)


def load_or_compute(cache_dir: Path, key: str, compute) -> Tensor:
    """Return the cached table for ``key``, or compute it, write it atomically, and return it."""
    table = read_cache(cache_dir, key)
    if table is None:
        table = compute()
        write_cache(cache_dir, key, table)
    return table
