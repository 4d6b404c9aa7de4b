"""Reference strategies (SPEC §5), chosen once at setup. Each is called with a batch and returns the
reference's per-sequence log-probs (S,), with no gradient:

- :class:`ModelReference`: a frozen model (a copy of the initial policy, or ``--ref-model``);
- :class:`CachedReference`: log-probs computed once by :func:`precompute` and stored on disk, keyed by
  :func:`cache_key`; no reference model is held while training;
- :class:`NoReference`: zeros, for reference-free losses;
- :class:`dpolab.models.adapters.AdapterReference`: the policy itself with its LoRA adapters switched off.

:func:`choose_reference` is the one place the strategy is decided; training, evaluation, scoring and the
multi-process checks all ask it.
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
from tqdm.auto import tqdm

from dpolab.data.batch import Batch, Collate
from dpolab.data.records import Example
from dpolab.errors import writing
from dpolab.models.loading import base_of, is_adapter_dir
from dpolab.models.logps import SequenceLogps

log = logging.getLogger("dpolab")
Tensor = torch.Tensor


NONE, REF_MODEL, ADAPTERS, FROZEN_COPY = "none", "ref_model", "adapters", "frozen_copy"


def choose_reference(needs_ref: bool, reference_free: bool, ref_model: str | None, lora: bool) -> str:
    """Which reference a run measures against (SPEC §5): ``none`` (no loss needs one, or reference-free),
    ``ref_model`` (a model of its own), ``adapters`` (LoRA: the policy with its adapters off, or an
    adapter's starting copy), else ``frozen_copy`` of the initial policy. ``--precompute-ref`` then computes
    the chosen one's log-probs once and drops it (with no copy: the initial policy serves).

    >>> choose_reference(True, False, None, lora=True), choose_reference(True, True, "ref", lora=False)
    ('adapters', 'none')
    """
    if not needs_ref or reference_free:
        return NONE
    if ref_model:
        return REF_MODEL
    return ADAPTERS if lora else FROZEN_COPY


class ModelReference:
    """A frozen model in eval mode, run under ``no_grad``, on ``device`` (default: where the batch is)."""

    def __init__(self, model: torch.nn.Module, chunk: int = 256, autocast=nullcontext, device=None,
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
    """Digest of a local model's weight and config files (or of its one GGUF file), or the hub id with its resolved revision."""
    path = Path(name_or_path)
    h = hashlib.sha256()
    if path.is_dir() or path.is_file():  # a folder, or one file (a GGUF model)
        files = ([path] if path.is_file() else
                 sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".json") and p.is_file()))
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        return "local:" + h.hexdigest()
    from transformers import AutoConfig  # deferred: transformers is a heavy import

    revision = getattr(AutoConfig.from_pretrained(name_or_path), "_commit_hash", None) or "unknown"
    return f"hub:{name_or_path}@{revision}"


def reference_identity(name: str) -> str:
    """What the precompute cache key names as the reference: an adapter is only meaningful with its base."""
    if is_adapter_dir(name):
        return model_fingerprint(name) + "+" + model_fingerprint(base_of(name))
    return model_fingerprint(name)


def cache_key(reference: str, examples: list[Example], settings: dict) -> str:
    """Hash of (reference weights, tokenised data, tokenisation and precision settings)."""
    h = hashlib.sha256()
    h.update(reference.encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for ex in examples:
        h.update(json.dumps([ex.index, ex.prompt_ids, ex.completion_ids]).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_table(reference, examples: list[Example], collate: Collate, batch_size: int, device: torch.device,
                  progress: bool = False, rank: int = 0, world: int = 1) -> Tensor:
    """Reference log-probs (num_examples, K) in example-index order, of this process's share of the rows.

    Process ``rank`` of ``world`` computes examples rank, rank + world, ...; the other rows stay 0, so the
    sum of every process's table over processes is the whole table. Every process runs the same number
    of batches (a short share repeats its own last example), so a sharded reference's collectives match.
    """
    K = len(examples[0].completion_ids)
    table = torch.zeros(len(examples), K)
    mine = list(range(rank, len(examples), world))
    per_process = math.ceil(len(examples) / world)
    order = mine + [mine[-1] if mine else 0] * (per_process - len(mine))  # padding, never written
    for i in tqdm(range(0, per_process, batch_size), desc="reference log-probs", disable=not progress, leave=False):
        batch = collate([examples[j] for j in order[i: i + batch_size]]).to(device)
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


def shared_table(accelerator, cache_dir: Path, key: str, shape: tuple[int, int], compute_share) -> Tensor:
    """The reference log-prob table for ``key``, the same on every process.

    The main process looks in the cache; if it finds the table it is broadcast (no shared file system is
    needed). Otherwise each process computes its share (``compute_share()``: its rows, zeros elsewhere),
    the shares are summed over processes, and the main process writes the cache.
    """
    from accelerate.utils import broadcast, broadcast_object_list  # deferred: accelerate is a heavy import

    table = read_cache(cache_dir, key) if accelerator.is_main_process else None
    if accelerator.num_processes == 1:
        if table is None:
            table = compute_share()
            with writing(cache_dir, None):
                write_cache(cache_dir, key, table)
        return table
    found = broadcast_object_list([table is not None])[0]
    if found:
        buffer = table if table is not None else torch.zeros(shape)
        return broadcast(buffer.to(accelerator.device)).cpu()
    table = accelerator.reduce(compute_share().to(accelerator.device), "sum").cpu()  # rows are disjoint: exact
    if accelerator.is_main_process:
        with writing(cache_dir, None):
            write_cache(cache_dir, key, table)
    accelerator.wait_for_everyone()
    return table
