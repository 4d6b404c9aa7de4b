"""What multi-process runs need beyond Accelerate: gathering full weights from sharded engines (FSDP,
DeepSpeed ZeRO-3), and refusing what is not supported there (precomputed reference log-probs are shared by
:func:`dpolab.models.reference.shared_table`).

Every function here is called by *all* processes (they contain collectives), never by the main one alone.
"""

from __future__ import annotations

import logging
import os

import torch

from dpolab.errors import ConfigError

log = logging.getLogger("dpolab")
Tensor = torch.Tensor


def engine(accelerator) -> str:
    """'fsdp', 'deepspeed', or 'ddp' (one process counts as ddp: nothing is sharded)."""
    name = str(accelerator.distributed_type).split(".")[-1]
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(name, "ddp")


def checkpoints_supported(accelerator) -> bool:
    """Resumable checkpoints hold full tensors; the sharded optimizer state of FSDP and ZeRO is not saved."""
    return engine(accelerator) == "ddp"


def check_supported(accelerator, save_every: int, resume: bool, grad_accum: int, frozen_copy: bool = False) -> None:
    """Refuse loudly what dpolab does not do correctly under a sharding engine. ``frozen_copy``: the run
    would keep a live frozen copy of the initial policy as its reference (no --precompute-ref, no LoRA, no
    --ref-model)."""
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
    if frozen_copy:
        raise ConfigError(f"under {kind.upper()} the reference would be a frozen copy of the policy held whole, "
                          "unsharded, on every device (only the policy is sharded), which defeats sharding; pass "
                          "--precompute-ref (reference log-probs computed once, then no reference in memory), use "
                          "LoRA (--lora-r: the reference is the sharded policy with its adapters off), or name a "
                          "reference explicitly with --ref-model if it fits on every device")
    if kind == "deepspeed" and grad_accum != 1:
        raise ConfigError("under DeepSpeed, set gradient_accumulation_steps in its config and keep --grad-accum 1 "
                          "(DeepSpeed scales the loss by its own accumulation count)")


def full_state_dict(accelerator, policy) -> dict[str, Tensor] | None:
    """The policy model's full weights (keys as the Hugging Face model names them) under a sharding engine,
    gathered on the main process; None when the unwrapped model already holds its full weights.

    FSDP (1 or 2): torch's ``get_model_state_dict`` with ``full_state_dict`` gathers every shard and keeps the
    result on the main process's CPU only (what Accelerate does for FSDP2; calling torch directly also covers
    a model sharded with ``fully_shard`` outside Accelerate, as the CPU test does). DeepSpeed: Accelerate's
    ``get_state_dict`` (ZeRO-3 gathers 16-bit weights)."""
    kind = engine(accelerator)
    if kind == "ddp":
        return None
    if kind == "fsdp":  # a collective: every process takes part
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # deferred: FSDP only

        state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = accelerator.get_state_dict(policy)
    prefix = "model."  # SequenceLogps holds the model as .model
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if state else None
