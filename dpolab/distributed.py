"""What multi-process runs need beyond Accelerate: sharing precomputed reference log-probs, gathering
full weights from sharded engines (FSDP, DeepSpeed ZeRO-3), and refusing what is not supported there.

Every function here is called by *all* processes (they contain collectives), never by the main one alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dpolab.errors import ConfigError
from dpolab.reference import read_cache, write_cache

log = logging.getLogger("dpolab")
Tensor = torch.Tensor


def engine(accelerator) -> str:
    """'fsdp', 'deepspeed', or 'ddp' (one process counts as ddp: nothing is sharded)."""
    name = str(accelerator.distributed_type).split(".")[-1]
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(name, "ddp")


def check_supported(accelerator, save_every: int, resume: bool, grad_accum: int) -> None:
    """Refuse loudly what dpolab does not do correctly under a sharding engine."""
    kind = engine(accelerator)
    for asked in ("fsdp", "deepspeed"):
        if os.environ.get(f"ACCELERATE_USE_{asked.upper()}", "").lower() == "true" and kind != asked:
            raise ConfigError(f"the launch config asks for {asked.upper()} but Accelerate set up "
                              f"{str(accelerator.distributed_type).split('.')[-1]} (Accelerate enables FSDP and "
                              "DeepSpeed on GPU-class devices only, not on CPU); use a DDP config instead")
    if kind == "ddp":
        return
    if save_every or resume:
        raise ConfigError(f"resumable checkpoints are not supported under {kind.upper()} yet (the optimizer "
                          "state is sharded); pass --save-every 0 and no --resume. final/ is still written "
                          "with full weights.")
    if kind == "deepspeed" and grad_accum != 1:
        raise ConfigError("under DeepSpeed, set gradient_accumulation_steps in its config and keep --grad-accum 1 "
                          "(DeepSpeed scales the loss by its own accumulation count)")


def shared_table(accelerator, cache_dir: Path, key: str, shape: tuple[int, int], compute_share) -> Tensor:
    """The reference log-prob table for ``key``, the same on every process.

    The main process looks in the cache; if it finds the table it is broadcast (no shared file system is
    needed). Otherwise each process computes its share (``compute_share()``: its rows, zeros elsewhere),
    the shares are summed over processes, and the main process writes the cache.
    """
    from accelerate.utils import broadcast, broadcast_object_list

    table = read_cache(cache_dir, key) if accelerator.is_main_process else None
    if accelerator.num_processes == 1:
        if table is None:
            table = compute_share()
            write_cache(cache_dir, key, table)
        return table
    found = broadcast_object_list([table is not None])[0]
    if found:
        buffer = table if table is not None else torch.zeros(shape)
        return broadcast(buffer.to(accelerator.device)).cpu()
    table = accelerator.reduce(compute_share().to(accelerator.device), "sum").cpu()  # rows are disjoint: exact
    if accelerator.is_main_process:
        write_cache(cache_dir, key, table)
    accelerator.wait_for_everyone()
    return table


def full_state_dict(accelerator, policy) -> dict[str, Tensor] | None:
    """The policy model's full weights (keys as the Hugging Face model names them) under a sharding engine,
    gathered on the main process; None when the unwrapped model already holds its full weights."""
    if engine(accelerator) == "ddp":
        return None
    state = accelerator.get_state_dict(policy)  # a collective: FSDP/ZeRO-3 gather the shards
    prefix = "model."  # SequenceLogps holds the model as .model
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if state else None
