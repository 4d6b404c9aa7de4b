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
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dpolab import adapters
from dpolab import metrics as M
from dpolab.batch import DEFAULT_LAYOUT, DEFAULT_ROW_TOKENS, Batch, make_batch
from dpolab import distributed
from dpolab.checkpoint import (data_digest, list_checkpoints, load_checkpoint, read_state, resume_conflicts,
                               save_checkpoint)
from dpolab.config import Config
from dpolab.errors import ConfigError, Interrupted
from dpolab.evaluation import evaluate_examples
from dpolab.guard import NonFiniteGuard, StopSignals, writing
from dpolab.logps import SequenceLogps
from dpolab.losses import tr_dpo_update_
from dpolab.objective import Objective
from dpolab.setup import (build_objective_for, build_reference, load_examples, load_model, load_tokenizer,
                          make_accelerator, read_records,
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


def micro_batches(examples, indices: list[int], rank: int, world: int, grad_accum: int, pad_id: int,
                  device, layout: str = DEFAULT_LAYOUT, row_tokens: int = DEFAULT_ROW_TOKENS) -> list[Batch]:
    """This process's share of one step, cut into ``grad_accum`` micro-batches in the given layout."""
    share = len(indices) // world
    mine = indices[rank * share: (rank + 1) * share]
    size = share // grad_accum
    return [make_batch([examples[j] for j in mine[i: i + size]], pad_id, layout, row_tokens).to(device)
            for i in range(0, share, size)]


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output directory {out} is a file")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise ConfigError(f"output directory {out} exists and is not empty; pass --resume to continue the "
                          "run in it, --overwrite to replace it, or choose another --output-dir")


def prepare_output_dir(out: Path, overwrite: bool) -> None:
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
    objective = build_objective_for(config, accelerator.gather)
    frozen_copy = objective.needs_ref and not (config.reference_free or config.precompute_ref or config.ref_model
                                               or config.lora_r or adapters.is_adapter_dir(config.model))
    distributed.check_supported(accelerator, config.save_every, config.resume, config.grad_accum, frozen_copy)
    check_output_dir(out, config.resume, config.overwrite)
    checkpoints = list_checkpoints(out / "checkpoints") if config.resume else []
    if checkpoints:
        check_resume_settings(out / "config.yaml", config)
    task = load_task_or_refuse(config.task)
    records = read_records(config)  # bad data is refused before the tokenizer or any model is loaded
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    train_examples, eval_examples = load_examples(config, tokenizer, records)
    digest = data_digest(train_examples)
    if checkpoints and read_state(checkpoints[-1]).get("extra", {}).get("data_digest", digest) != digest:
        raise ConfigError(f"cannot resume from {checkpoints[-1]}: the training rows differ from the ones it was "
                          "trained on (same settings, but the data file's content or the rows kept changed)")
    if accelerator.is_main_process:  # only now that settings and data are known to be good
        with writing(out, None):
            prepare_output_dir(out, config.overwrite)
    accelerator.wait_for_everyone()
    steps_per_epoch = len(train_examples) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_examples)} training examples is fewer than batch_size {config.batch_size}")
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)

    torch.manual_seed(config.seed)
    model = adapters.load_policy(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                 config.lora_target_modules, config.trust_remote_code, config.allow_pickle_weights,
                                 config.load_in_4bit)
    train_ref, eval_ref = build_reference(config, objective, model, train_examples, eval_examples, accelerator,
                                          tokenizer.pad_token_id)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = SequenceLogps(model, config.logits_chunk, config.ld_alpha)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=int(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy).model

    # TR-DPO moves the reference, so it is part of the training state.
    synced_ref = train_ref.logps.model if config.sync_ref_model else None
    start, tokens_seen, extra = 0, 0.0, {}
    guard = NonFiniteGuard(config.max_nonfinite_steps)
    if checkpoints:
        start, extra = load_checkpoint(checkpoints[-1], unwrapped, optimizer, scheduler, synced_ref)
        objective.state.update(extra.get("objective", {}))
        tokens_seen = extra.get("num_tokens", 0.0)
        guard.total, guard.in_a_row = extra.get("skipped_steps", 0), extra.get("nonfinite_in_a_row", 0)
        log.info("resuming from %s", checkpoints[-1])
    elif config.resume:
        log.info("no checkpoint in %s: starting from the beginning", out / "checkpoints")
    saved: list[str] = [str(checkpoints[-1])] if checkpoints else []
    last_saved = lambda: saved[-1] if saved else None  # noqa: E731 — named in every write failure
    if accelerator.is_main_process:
        with writing(out / "config.yaml", last_saved()):
            config.save(out / "config.yaml")
        with writing(out / "metrics.jsonl", last_saved()):
            logger = M.MetricsLog(out, start if config.resume else None, accelerator.is_main_process)

    def log_metrics(step: int, values: dict[str, float]) -> None:
        if accelerator.is_main_process:
            with writing(out / "metrics.jsonl", last_saved()):
                logger.write(step, values)

    def run_eval(step: int) -> dict[str, float]:
        if not eval_examples:
            return {}
        result = evaluate_examples(policy, eval_ref, objective, eval_examples, config.batch_size, accelerator,
                                   tokenizer.pad_token_id, prefix="eval/", layout=config.layout,
                                   row_tokens=config.row_tokens)
        log_metrics(step, result)
        return result

    from tqdm.auto import tqdm

    eval_before = run_eval(0) if start == 0 else extra.get("eval_before", {})
    bar = tqdm(total=total_steps, initial=start, desc="dpolab", disable=not (config.progress and
                                                                                  accelerator.is_main_process))
    examples_per_process = config.batch_size // world

    def save(step: int) -> None:
        state = {"objective": objective.state, "num_tokens": tokens_seen, "eval_before": eval_before,
                 "skipped_steps": guard.total, "nonfinite_in_a_row": guard.in_a_row, "data_digest": digest}
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            saved.append(str(save_checkpoint(out / "checkpoints", step, unwrapped, optimizer, scheduler,
                                             config.save_total_limit, state, synced_ref)))
        accelerator.wait_for_everyone()

    t_start, last = time.perf_counter(), {}
    with StopSignals() as signals:
        for step in range(start, total_steps):
            t0 = time.perf_counter()
            indices = step_examples(len(train_examples), step, config.batch_size, config.seed)
            batches = micro_batches(train_examples, indices, rank, world, config.grad_accum,
                                    tokenizer.pad_token_id, accelerator.device, config.layout, config.row_tokens)
            stats = train_step(policy, train_ref, objective, batches, optimizer, scheduler, accelerator,
                               config.max_grad_norm, examples_per_process)
            done = step + 1
            if synced_ref is not None and done % config.ref_model_sync_steps == 0:
                tr_dpo_update_(synced_ref.parameters(), unwrapped.parameters(),
                               ref_model_mixup_alpha=config.ref_model_mixup_alpha)
            tokens_seen += stats["num_tokens"]
            last = stats | {"learning_rate": scheduler.get_last_lr()[0], "epoch": done / steps_per_epoch,
                            "num_tokens": tokens_seen,
                            "tokens_per_second": stats["num_tokens"] / (time.perf_counter() - t0)}
            if done % config.log_every == 0 or done == total_steps:
                log_metrics(done, last)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last.get('rewards/accuracies', float('nan')):.2f}",
                            margin=f"{last['rewards/margins']:.3f}", tok_s=f"{last['tokens_per_second']:.0f}")
            guard.update(bool(stats["skipped"]), done, saved[-1] if saved else None)
            if signum := signals.requested(accelerator):
                bar.close()
                if not distributed.checkpoints_supported(accelerator):  # FSDP/ZeRO: as --save-every, refused
                    raise Interrupted(f"stopped by signal {signum} after step {done}; no checkpoint was saved "
                                      f"(resumable checkpoints are not supported under "
                                      f"{distributed.engine(accelerator).upper()}, see docs/scaling.md)", signum)
                save(done)
                raise Interrupted(f"stopped by signal {signum} after step {done}; checkpoint saved in "
                                  f"{saved[-1]}; continue with --resume", signum)
            if config.eval_every and done % config.eval_every == 0 and done != total_steps:
                run_eval(done)
            if config.save_every and done % config.save_every == 0 and done != total_steps:
                save(done)
    bar.close()
    eval_after = run_eval(total_steps)
    runtime = time.perf_counter() - t_start
    summary = {"steps": total_steps, "skipped_steps": guard.total, "train_runtime_seconds": runtime,
               "train": last, "eval_before": eval_before, "eval": eval_after}
    if task is not None and accelerator.is_main_process:
        summary |= run_task_report(config, task, unwrapped, tokenizer)
    if "eval/rewards/accuracies" in eval_after:  # paired data (unpaired rows have no pairs to rank)
        summary["eval_reward_accuracy"] = eval_after["eval/rewards/accuracies"]
    accelerator.wait_for_everyone()
    state = distributed.full_state_dict(accelerator, policy)  # every process: FSDP/ZeRO-3 gather the shards
    if accelerator.is_main_process:
        with writing(out / "final", last_saved(), partial=out / ".final.tmp"):
            save_final(out, unwrapped, tokenizer, config, state)
        with writing(out / "summary.json", last_saved()):
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            logger.close()
        from dpolab.plots import plot_metrics

        with writing(out / "plots", last_saved()):
            plot_metrics(out / "metrics.jsonl", out / "plots")
    accelerator.wait_for_everyone()
    return summary


def check_resume_settings(saved_config: Path, config: Config) -> None:
    """Refuse a --resume whose settings would not continue the saved run exactly (see RUN_CONTROL)."""
    import yaml

    if not saved_config.is_file():
        return
    conflicts = resume_conflicts(yaml.safe_load(saved_config.read_text()) or {}, config.to_dict())
    if conflicts:
        raise ConfigError(f"cannot resume: {', '.join(conflicts)} differ from {saved_config}, so the run would not "
                          "continue the same trajectory. Resume with the saved values, or start a new run (another "
                          "--output-dir, or --overwrite). Logging, saving and evaluation settings may change; "
                          "--max-steps and --epochs only with --lr-scheduler constant (other schedules are spread "
                          "over the total steps)")


def load_task_or_refuse(spec: str | None):
    if spec is None:
        return None
    from dpolab.tasks import load_task

    try:
        return load_task(spec)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None


def run_task_report(config: Config, task, policy, tokenizer) -> dict[str, float]:
    """Task reward of the reference and of the trained policy, same prompts and seeds; KL from samples."""
    from dpolab.task_eval import before_after, task_report

    reference = load_model(config.ref_model or config.model, config.trust_remote_code, config.allow_pickle_weights)
    reference.to(next(policy.parameters()).device)
    args = dict(num_prompts=config.task_prompts, num_samples=config.task_samples, seed=config.seed,
                max_new_tokens=config.task_max_new_tokens, layout=config.layout, row_tokens=config.row_tokens)
    before = task_report(reference, reference, tokenizer, task, **args)
    after = task_report(policy, reference, tokenizer, task, **args)
    return before_after(before, after)


def save_final(out: Path, model, tokenizer, config: Config, state_dict=None) -> None:
    """``final/``: a Hugging Face model folder (with LoRA: the adapter) with tokenizer, plus what dpolab
    needs to score with it; with ``merge_on_save`` also ``merged/``, the adapter folded into the base.
    Written beside and renamed into place, so a crash never leaves a half-written ``final/``."""
    final, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if adapters.is_peft(model):
        adapters.save_adapter(model, tmp, state_dict)
    else:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    reference = config.ref_model or config.model
    if Path(reference).exists():
        reference = str(Path(reference).resolve())
    (tmp / "dpolab.json").write_text(json.dumps({"reference": reference, "beta": config.beta,
                                                 "loss": config.loss}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if config.merge_on_save:
        adapters.merge(str(final), str(out / "merged"), config.trust_remote_code, config.allow_pickle_weights)
