"""The metrics of SPEC §3, under the field's names, where they are written, and their mean over a dataset.

Per micro-batch we keep *sums* over examples; sums add across micro-batches and processes exactly, and
one division at the end gives the mean over every example of the step (or of the evaluation set).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

if TYPE_CHECKING:  # annotations only
    from dpolab.data.batch import Collate
    from dpolab.data.records import Example
    from dpolab.objective import Objective, Output

Tensor = torch.Tensor


def example_sums(out: Output) -> dict[str, Tensor]:
    """Per-batch sums of the per-example quantities (all detached), with the counts that divide them."""
    one = out.losses.new_ones(())
    sums = {
        "loss": out.losses.detach().sum(),
        "count": one * out.losses.numel(),
        "rewards/chosen": out.chosen_rewards.sum(),
        "rewards/rejected": out.rejected_rewards.sum(),
        "logps/chosen": out.chosen_logps.sum(),
        "logps/rejected": out.rejected_logps.sum(),
        "count/chosen": one * out.chosen_rewards.numel(),
        "count/rejected": one * out.rejected_rewards.numel(),
    }
    if out.ref_chosen_logps is not None:  # for the reference-collapse diagnostic (dpolab.training.diagnostics)
        sums |= {"logps/ref_chosen": out.ref_chosen_logps.sum(), "logps/ref_rejected": out.ref_rejected_logps.sum(),
                 "lengths/chosen": out.chosen_lengths.float().sum(),
                 "lengths/rejected": out.rejected_lengths.float().sum()}
    if out.paired:
        margins = out.chosen_rewards - out.rejected_rewards
        sums["rewards/margins"] = margins.sum()
        sums["rewards/accuracies"] = (margins > 0).float().sum()  # strict: ties count as wrong
    if out.kl is not None:
        sums["kl"] = out.kl * out.losses.numel()  # example-weighted, like the other means
    return sums


KEYS = ("loss", "count", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "count/chosen",
        "count/rejected", "logps/ref_chosen", "logps/ref_rejected", "lengths/chosen", "lengths/rejected",
        "rewards/margins", "rewards/accuracies")


def zeros(paired: bool = True, kl: bool = False) -> dict[str, Tensor]:
    keys = KEYS if paired else KEYS[:12]
    return {k: torch.zeros((), dtype=torch.float64) for k in keys + (("kl",) if kl else ())}


def add(total: dict[str, Tensor] | None, sums: dict[str, Tensor]) -> dict[str, Tensor]:
    if total is None:
        return {k: v.detach().double() for k, v in sums.items()}
    return {k: total[k] + sums[k].double() for k in total}


def means(total: dict[str, Tensor], prefix: str = "") -> dict[str, float]:
    """Divide each sum by its count: chosen and rejected quantities by their own counts (unpaired data)."""
    n = total["count"].item()
    out = {}
    for k, v in total.items():
        if k.startswith("count"):
            continue
        side = "chosen" if k.endswith("chosen") else "rejected" if k.endswith("rejected") else None
        denom = total[f"count/{side}"].item() if side else n
        out[prefix + k] = v.item() / denom if denom else float("nan")
    if "rewards/margins" not in total:  # unpaired: the gap between the desirable and undesirable means
        out[prefix + "rewards/margins"] = out[prefix + "rewards/chosen"] - out[prefix + "rewards/rejected"]
    return out


class MetricsLog:
    """Appends one JSON object per logged step to ``metrics.jsonl`` and hands the same values, under the same
    names, to ``mirror(values, step)``: the experiment trackers (Accelerate's ``Accelerator.log``)."""

    def __init__(self, out_dir: Path, resume_step: int | None = None,
                 mirror: Callable[[dict, int], None] | None = None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():  # drop lines written after the checkpoint
            keep = [line for line in self.path.read_text().splitlines() if _step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self.mirror = mirror

    def write(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.mirror is not None:
            self.mirror(dict(metrics), step)


def _step(line: str) -> float:
    """The step of a metrics line; a line cut short by a crash counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TRACKERS = ("tensorboard", "wandb", "mlflow")


def trackers(report_to: str) -> list[str]:
    """The trackers of a --report-to value ("none": no tracker).

    >>> trackers("tensorboard, wandb"), trackers("none")
    (['tensorboard', 'wandb'], [])
    """
    names = [t.strip() for t in report_to.split(",") if t.strip()]
    return [] if names == ["none"] else names


@torch.no_grad()
def evaluate_examples(policy, reference, objective: Objective, examples: list[Example], batch_size: int,
                      accelerator, collate: Collate, prefix: str = "eval/", progress: bool = False) -> dict[str, float]:
    """Mean metrics over every example, in global batches of ``batch_size`` as in training: batch i holds
    examples [i·B, (i+1)·B) and process r takes every N-th of them (r, r + N, ...), so the metrics (KTO's
    batch KL estimate included) do not depend on the number of processes, up to summation order.

    Every process runs the same number of batches of the same size, because a forward under FSDP and the
    KL estimate's gather are collectives: where a process's share of the last batch is short, it is padded
    with copies of an example, which are masked out of the gathered KL pairs and of the metric sums.
    """
    was_training, gather = policy.training, objective.gather
    policy.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    per_step = -(-batch_size // world) * world  # examples per global batch
    total = None
    try:
        for i in tqdm(range(0, len(examples), per_step), desc="evaluating", unit="batch", leave=False,
                      disable=not (progress and accelerator.is_main_process)):
            chunk = examples[i: i + per_step]
            size = -(-len(chunk) // world)  # every process's batch size
            mine = chunk[rank::world]
            real = len(mine)
            batch = collate(mine + [chunk[0]] * (size - real)).to(accelerator.device)
            if world > 1:  # KL pairs of padding rows leave the gathered estimate
                keep = accelerator.gather((torch.arange(size) < real).float().to(accelerator.device)) > 0
                objective.gather = lambda t, keep=keep: accelerator.gather(t)[keep]
            out = objective(policy(**batch.model_inputs()), reference(batch), batch)
            total = add(total, example_sums(first_examples(out, batch, real)))
    finally:
        objective.gather = gather
    if total is None:  # no examples at all; every process still joins the reduction
        total = zeros(objective.data != "unpaired", objective.needs_kl)
    total = {k: accelerator.reduce(v.to(accelerator.device), "sum") for k, v in total.items()}
    policy.train(was_training)
    return means(total, prefix)


def first_examples(out: Output, batch, n: int) -> Output:
    """The part of ``out`` that belongs to the batch's first ``n`` examples (the rest is padding). Unpaired
    outputs list the desirable and the undesirable examples apart, each in batch order."""
    if n == len(out.losses):
        return out
    n_c, n_r = (n, n) if out.paired else (int(batch.labels[:n].sum()), n - int(batch.labels[:n].sum()))
    cut = {f: getattr(out, f)[:n_c if "chosen" in f else n_r] for f in ("chosen_rewards", "rejected_rewards",
           "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_lengths",
           "rejected_lengths") if getattr(out, f) is not None}
    return replace(out, losses=out.losses[:n], **cut)
