"""``dpolab train`` with the policy sharded by FSDP2 (``fully_shard``) on CPU processes over gloo.

Accelerate 1.15 turns an FSDP launch config into FSDP only on GPU-class devices (``AcceleratorState`` sets
``DistributedType.FSDP`` inside its MULTI_GPU/NPU/XPU/... branch; MULTI_CPU is not in it), so on a CPU-only
machine this script does what Accelerate's FSDP2 preparation does, and nothing else: it shards every
decoder layer and then the whole policy with ``fully_shard`` on a one-dimensional mesh of all processes,
points the optimizer at the sharded parameters, and tells dpolab the engine is FSDP. Everything else is
dpolab's own code, unchanged: the training step, KTO/metric gathers, evaluation, the refusals, and
``distributed.full_state_dict`` + ``save_final`` writing ``final/`` from the shards.

Run under torchrun: ``torchrun --nproc_per_node 2 tests/fsdp_cpu.py train --model M --data D ...``
(the arguments are ``dpolab``'s).
"""

from __future__ import annotations

import sys

import torch
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import dpolab.builder
import dpolab.training.distributed
from dpolab import cli

real_make_accelerator = dpolab.builder.make_accelerator


def shard(policy: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """FSDP2 as Accelerate applies it: each transformer block, then the root; the optimizer is rebuilt
    over the new (DTensor) parameters, which replace the old ones in the same order."""
    for layer in policy.model.model.layers:
        fully_shard(layer)
    fully_shard(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    assert all(isinstance(p, DTensor) for p in params)
    optimizer.param_groups[0]["params"] = params
    optimizer.state.clear()  # nothing there yet: prepare comes before the first step
    here, total = sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)
    print(f"fsdp_cpu: rank {torch.distributed.get_rank()} holds {here} of {total} parameters", file=sys.stderr)
    return policy, optimizer


def make_accelerator(config, **kwargs):
    accelerator = real_make_accelerator(config, **kwargs)
    accelerator.prepare = shard
    accelerator.unwrap_model = lambda model, **kwargs: model  # fully_shard keeps the module itself
    return accelerator


if __name__ == "__main__":
    dpolab.builder.make_accelerator = make_accelerator
    dpolab.training.distributed.engine = lambda accelerator: "fsdp"
    sys.exit(cli.main(sys.argv[1:]))
