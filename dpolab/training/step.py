"""The training step, on one screen, and the examples each step takes.

``batch_size`` is global (SPEC §6): each optimizer step takes ``batch_size`` examples, split over processes
and then over ``grad_accum`` micro-batches; every micro-batch loss is a *sum* over its examples divided by the
examples each process sees per step, so the summed (and, over processes, averaged) gradient is that of the
global mean.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from dpolab.data.batch import Batch, Collate
from dpolab.evaluation import metrics as M
from dpolab.objective import Objective


def train_step(policy, reference, objective: Objective, micro_batches: list[Batch], optimizer, scheduler,
               accelerator, max_grad_norm: float, examples_per_process: int) -> dict[str, float]:
    """One optimizer step over ``micro_batches``: log-probs → reference → loss → backward → step."""
    policy.train()
    sums = None
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with nullcontext() if last else accelerator.no_sync(policy):  # all-reduce once per step
            policy_logps = policy(**batch.model_inputs())  # (S,) summed completion log-probs
            ref_logps = reference(batch)  # (S,) no grad
            out = objective(policy_logps, ref_logps, batch)  # per-example losses (B,)
            accelerator.backward(out.losses.sum() / examples_per_process)
        sums = M.add(sums, M.example_sums(out) | {"num_tokens": torch.tensor(float(batch.num_tokens))})
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), max_grad_norm or float("inf"))
    sums = {k: accelerator.reduce(v.to(accelerator.device), "sum") for k, v in sums.items()}
    finite = math.isfinite(float(grad_norm)) and math.isfinite(sums["loss"].item())
    if finite:  # a non-finite loss or gradient never reaches the weights
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    num_tokens = sums.pop("num_tokens").item()
    return M.means(sums) | {"grad_norm": float(grad_norm), "num_tokens": num_tokens, "skipped": float(not finite)}


def step_examples(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The dataset indices of optimizer step ``step``: epoch e is a permutation seeded by (seed, e);
    a last incomplete batch of an epoch is skipped."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size: (k + 1) * batch_size].tolist()


def micro_batches(examples, indices: list[int], rank: int, world: int, grad_accum: int, collate: Collate,
                  device) -> list[Batch]:
    """This process's share of one step, cut into ``grad_accum`` micro-batches by ``collate``."""
    share = len(indices) // world
    mine = indices[rank * share: (rank + 1) * share]
    size = share // grad_accum
    return [collate([examples[j] for j in mine[i: i + size]]).to(device) for i in range(0, share, size)]
