"""Training: setup helpers, the training step (one screen), the loop, and what a run leaves on disk.

Devices, processes and precision come from Accelerate's ``Accelerator``, applied once in setup, so
``accelerate launch`` and ``torchrun`` drive this loop unchanged. ``batch_size`` is global (SPEC §6):
each optimizer step takes ``batch_size`` examples, split over processes and then over ``grad_accum``
micro-batches; every micro-batch loss is a *sum* over its examples divided by the examples each process
sees per step, so the summed (and, over processes, averaged) gradient is that of the global mean.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dpolab import adapters
from dpolab import metrics as M
from dpolab.batch import Batch, collate
from dpolab.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from dpolab.config import Config
from dpolab.distributed import check_supported, full_state_dict
from dpolab.errors import ConfigError
from dpolab.evaluation import evaluate_examples
from dpolab.logps import SequenceLogps
from dpolab.objective import Objective
from dpolab.setup import (build_objective_for, build_reference, load_examples, load_tokenizer, make_accelerator,
                          resolve_defaults)

log = logging.getLogger("dpolab")


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
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    sums = {k: accelerator.reduce(v.to(accelerator.device), "sum") for k, v in sums.items()}
    num_tokens = sums.pop("num_tokens").item()
    return M.means(sums) | {"grad_norm": float(grad_norm), "num_tokens": num_tokens}


def step_examples(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The dataset indices of optimizer step ``step``: epoch e is a permutation seeded by (seed, e);
    a last incomplete batch of an epoch is skipped."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[k * batch_size: (k + 1) * batch_size].tolist()


def micro_batches(examples, indices: list[int], rank: int, world: int, grad_accum: int, pad_id: int,
                  device) -> list[Batch]:
    """This process's share of one step, cut into ``grad_accum`` micro-batches."""
    share = len(indices) // world
    mine = indices[rank * share: (rank + 1) * share]
    size = share // grad_accum
    return [collate([examples[j] for j in mine[i: i + size]], pad_id).to(device) for i in range(0, share, size)]


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"output directory {out} exists and is not empty; pass --resume to continue the "
                          "run in it, --overwrite to replace it, or choose another --output-dir")
    if overwrite and out.exists():
        for child in out.iterdir():
            if child.name != "ref_cache":  # reference log-probs stay valid: they are keyed by content
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)


def train(config: Config) -> dict:
    """Train a policy as ``config`` says; return the summary also written to ``summary.json``."""
    config = resolve_defaults(config)
    out = Path(config.output_dir)
    accelerator = make_accelerator(config)
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by processes × grad_accum "
                          f"= {world} × {config.grad_accum}")
    check_supported(accelerator, config.save_every, config.resume, config.grad_accum)
    if accelerator.is_main_process:
        prepare_output_dir(out, config.resume, config.overwrite)
    accelerator.wait_for_everyone()
    objective = build_objective_for(config)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    train_examples, eval_examples = load_examples(config, tokenizer)
    steps_per_epoch = len(train_examples) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_examples)} training examples is fewer than batch_size {config.batch_size}")
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)

    torch.manual_seed(config.seed)
    model = adapters.load_policy(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                 config.lora_target_modules, config.trust_remote_code)
    train_ref, eval_ref = build_reference(config, objective, model, train_examples, eval_examples, accelerator,
                                          tokenizer.pad_token_id)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = SequenceLogps(model, config.logits_chunk)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy).model

    start = 0
    checkpoints = list_checkpoints(out / "checkpoints")
    if config.resume and checkpoints:
        start = load_checkpoint(checkpoints[-1], unwrapped, optimizer, scheduler)
        log.info("resuming from %s", checkpoints[-1])
    elif config.resume:
        log.info("no checkpoint in %s: starting from the beginning", out / "checkpoints")
    if accelerator.is_main_process:
        config.save(out / "config.yaml")
    logger = M.MetricsLog(out, start if config.resume else None, accelerator.is_main_process)

    def run_eval(step: int) -> dict[str, float]:
        if not eval_examples:
            return {}
        result = evaluate_examples(policy, eval_ref, objective, eval_examples, config.batch_size, accelerator,
                                   tokenizer.pad_token_id, prefix="eval/")
        if accelerator.is_main_process:
            logger.write(step, result)
        return result

    from tqdm.auto import tqdm

    eval_before = run_eval(0) if start == 0 else {}
    bar = tqdm(total=total_steps, initial=start, desc="dpolab", disable=not (config.progress and
                                                                                  accelerator.is_main_process))
    examples_per_process = config.batch_size // world
    t_start, tokens_seen, last = time.perf_counter(), 0.0, {}
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        indices = step_examples(len(train_examples), step, config.batch_size, config.seed)
        batches = micro_batches(train_examples, indices, rank, world, config.grad_accum, tokenizer.pad_token_id,
                                accelerator.device)
        stats = train_step(policy, train_ref, objective, batches, optimizer, scheduler, accelerator,
                           config.max_grad_norm, examples_per_process)
        tokens_seen += stats["num_tokens"]
        last = stats | {"learning_rate": scheduler.get_last_lr()[0], "epoch": (step + 1) / steps_per_epoch,
                        "num_tokens": tokens_seen, "tokens_per_second": stats["num_tokens"] / (time.perf_counter() - t0)}
        done = step + 1
        if accelerator.is_main_process and (done % config.log_every == 0 or done == total_steps):
            logger.write(done, last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['rewards/accuracies']:.2f}",
                        margin=f"{last['rewards/margins']:.3f}", tok_s=f"{last['tokens_per_second']:.0f}")
        if config.eval_every and done % config.eval_every == 0 and done != total_steps:
            run_eval(done)
        if config.save_every and done % config.save_every == 0 and done != total_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(out / "checkpoints", done, unwrapped, optimizer, scheduler, config.save_total_limit)
    bar.close()
    eval_after = run_eval(total_steps)
    runtime = time.perf_counter() - t_start
    accelerator.wait_for_everyone()
    summary = {"steps": total_steps, "train_runtime_seconds": runtime, "train": last, "eval_before": eval_before,
               "eval": eval_after}
    state = full_state_dict(accelerator, policy)  # every process: FSDP/ZeRO-3 gather the shards
    if accelerator.is_main_process:
        save_final(out, unwrapped, tokenizer, config, state)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.close()
        from dpolab.plots import plot_metrics

        plot_metrics(out / "metrics.jsonl", out / "plots")
    accelerator.wait_for_everyone()
    return summary


def save_final(out: Path, model, tokenizer, config: Config, state_dict=None) -> None:
    """``final/``: a Hugging Face model folder (with LoRA: the adapter) with tokenizer, plus what dpolab
    needs to score with it; with ``merge_on_save`` also ``merged/``, the adapter folded into the base."""
    final = out / "final"
    if adapters.is_peft(model):
        adapters.save_adapter(model, final, state_dict)
    else:
        model.save_pretrained(final, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(final)
    reference = config.ref_model or config.model
    (final / "dpolab.json").write_text(json.dumps({"reference": reference, "beta": config.beta,
                                                   "loss": config.loss}, indent=2))
    if config.merge_on_save:
        adapters.merge(str(final), str(out / "merged"), config.trust_remote_code)
