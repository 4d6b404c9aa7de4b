"""Training: the training step (one screen), the setup it needs, and the loop.

Devices, processes and precision come from Accelerate's ``Accelerator``, applied once in setup, so
``accelerate launch`` and ``torchrun`` drive this loop unchanged. ``batch_size`` is global (SPEC §6):
each optimizer step takes ``batch_size`` examples, split over processes and then over ``grad_accum``
micro-batches; every micro-batch loss is a *sum* over its examples divided by the examples each process
sees per step, so the summed (and, over processes, averaged) gradient is that of the global mean.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dpolab import builder
from dpolab.config import Config
from dpolab.data.batch import Collate
from dpolab.data.records import Example
from dpolab.errors import ConfigError, Interrupted
from dpolab.evaluation.compare import judged_win_rate
from dpolab.evaluation.metrics import evaluate_examples
from dpolab.evaluation.judges import JudgmentCache, Settings, load_judge
from dpolab.evaluation.task_eval import before_after, task_report
from dpolab.losses import tr_dpo_update_
from dpolab.models import adapters, lean
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.models.logps import SequenceLogps
from dpolab.models.reference import FROZEN_COPY
from dpolab.objective import Objective
from dpolab.tasks import load_task
from dpolab.training import diagnostics, distributed
from dpolab.training.checkpoint import load_checkpoint
from dpolab.training.guard import NonFiniteGuard, StopSignals
from dpolab.training.resume import check_same_data, checkpoints_to_resume, data_digest
from dpolab.training.rundir import RunFiles, check_output_dir
from dpolab.training.step import micro_batches, step_examples, train_step

log = logging.getLogger("dpolab")


@dataclass
class Run:
    """Everything the loop needs, built once by :func:`setup_run` from the config."""

    config: Config
    accelerator: Any
    objective: Objective
    task: Any  # a dpolab.tasks.Task, or None
    judge: Any  # with a task: the judge of the win rate against the reference (dpolab.evaluation.judges)
    tokenizer: Any
    collate: Collate  # examples → batches in the run's layout
    reference_kind: str  # dpolab.models.reference.choose_reference
    train_examples: list[Example]
    eval_examples: list[Example]
    digest: str  # of the tokenised training rows: a resume must see the same ones
    checkpoints: list[Path]  # complete checkpoints to resume from (empty unless --resume)
    policy: Any = None  # SequenceLogps around the model, as Accelerate prepared it
    model: Any = None  # the unwrapped Hugging Face model (with LoRA: the PEFT model)
    optimizer: Any = None
    scheduler: Any = None
    train_ref: Any = None  # reference strategies (SPEC §5)
    eval_ref: Any = None
    synced_ref: Any = None  # TR-DPO's moving reference model, part of the training state
    steps_per_epoch: int = 0
    total_steps: int = 0


@dataclass
class Progress:
    """The training state beyond the weights: what a checkpoint carries besides model and optimizer."""

    step: int = 0
    tokens_seen: float = 0.0
    eval_before: dict = field(default_factory=dict)
    guard: NonFiniteGuard = field(default_factory=lambda: NonFiniteGuard(0))
    last: dict = field(default_factory=dict)  # the metrics of the latest step
    alarms: diagnostics.Alarms = field(default_factory=diagnostics.Alarms)  # raised from the metrics history

    def state(self, objective: Objective, digest: str) -> dict:
        return {"objective": objective.state, "num_tokens": self.tokens_seen, "eval_before": self.eval_before,
                "skipped_steps": self.guard.total, "nonfinite_in_a_row": self.guard.in_a_row, "data_digest": digest}


def check_settings_and_data(config: Config) -> Run:
    """Everything that can refuse the run, before any model is loaded: settings against the disk, the device
    and the processes, the output directory and a resume, the task, the data (rows, then tokenised)."""
    builder.check_environment(config)
    out = Path(config.output_dir)
    accelerator = builder.make_accelerator(config, with_trackers=True)
    world = accelerator.num_processes
    if config.batch_size % (world * config.grad_accum):
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by processes × grad_accum "
                          f"= {world} × {config.grad_accum}")
    objective = builder.objective_for(config, accelerator.gather)
    kind = builder.reference_kind(config, objective)
    distributed.check_supported(accelerator, config.save_every, config.resume, config.grad_accum,
                                frozen_copy=kind == FROZEN_COPY and not config.precompute_ref)
    check_output_dir(out, config.resume, config.overwrite)
    checkpoints = checkpoints_to_resume(out, config)
    task = load_task_or_refuse(config.task)
    if config.judge is not None and task is None:
        raise ConfigError("judge: dpolab train judges answers to a task's held-out prompts; give --task too")
    judge = load_judge(config.judge or f"task:{config.task}", Settings(config.judge_model, config.judge_api_key_env,
                       config.judge_timeout, config.trust_remote_code)) if task is not None else None
    records = builder.read_records(config, objective)  # bad data is refused before the tokenizer or any model
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    train_examples, eval_examples = builder.load_examples(config, objective, tokenizer, records)
    digest = data_digest(train_examples)
    check_same_data(checkpoints, digest)
    steps_per_epoch = len(train_examples) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(train_examples)} training examples is fewer than batch_size {config.batch_size}")
    return Run(config, accelerator, objective, task, judge, tokenizer, builder.collate_for(config, tokenizer), kind,
               train_examples, eval_examples, digest, checkpoints, steps_per_epoch=steps_per_epoch,
               total_steps=config.max_steps or math.ceil(config.epochs * steps_per_epoch))


def build_models(run: Run) -> None:
    """Policy, reference strategy, optimizer and schedule; Accelerate wraps the policy and optimizer."""
    config, accelerator = run.config, run.accelerator
    torch.manual_seed(config.seed)
    model = adapters.load_policy(config.model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                 config.lora_target_modules, config.trust_remote_code, config.allow_pickle_weights,
                                 config.load_in_4bit, config.attn_implementation)
    if config.lean_backward:  # a frozen copy made from it has the same forward; without grad nothing is saved
        lean.make_lean(model)
    run.train_ref, run.eval_ref = builder.build_reference(config, run.reference_kind, model, run.train_examples,
                                                          run.eval_examples, accelerator, run.collate)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = SequenceLogps(model, config.logits_chunk, config.ld_alpha, aligned=config.use_weighting)
    trainable = [p for p in policy.parameters() if p.requires_grad]  # with LoRA: the adapters only
    # The fused kernel (as transformers' Trainer uses) does the whole update in one pass: on the bundled model
    # 0.7 ms a step instead of 4.5 ms for the multi-tensor loop. Other devices keep PyTorch's default.
    fused = True if accelerator.device.type in ("cpu", "cuda") else None
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    from transformers import get_scheduler  # deferred: transformers is a heavy import

    run.scheduler = get_scheduler(config.lr_scheduler, optimizer, num_training_steps=run.total_steps,
                                  num_warmup_steps=config.warmup_steps or int(config.warmup_ratio * run.total_steps))
    run.policy, run.optimizer = accelerator.prepare(policy, optimizer)
    run.model = accelerator.unwrap_model(run.policy).model
    run.synced_ref = run.train_ref.logps.model if config.sync_ref_model else None


def restore(run: Run) -> Progress:
    """The newest checkpoint's state when resuming, else a fresh start."""
    progress = Progress(guard=NonFiniteGuard(run.config.max_nonfinite_steps))
    if run.checkpoints:
        progress.step, extra = load_checkpoint(run.checkpoints[-1], run.model, run.optimizer, run.scheduler,
                                               run.synced_ref)
        run.objective.state.update(extra.get("objective", {}))
        progress.tokens_seen = extra.get("num_tokens", 0.0)
        progress.eval_before = extra.get("eval_before", {})
        progress.guard.total = extra.get("skipped_steps", 0)
        progress.guard.in_a_row = extra.get("nonfinite_in_a_row", 0)
        log.info("resuming from %s", run.checkpoints[-1])
    elif run.config.resume:
        log.info("no checkpoint in %s: starting from the beginning", Path(run.config.output_dir) / "checkpoints")
    return progress


def evaluate_run(run: Run, files: RunFiles, step: int) -> dict[str, float]:
    """Held-out metrics (``eval/…``) of the policy now, logged at ``step``."""
    if not run.eval_examples:
        return {}
    result = evaluate_examples(run.policy, run.eval_ref, run.objective, run.eval_examples, run.config.batch_size,
                               run.accelerator, run.collate, prefix="eval/", progress=run.config.progress)
    files.log(step, result)
    return result


def save(run: Run, files: RunFiles, progress: Progress) -> None:
    """A resumable checkpoint of this step (the main process writes; every process waits)."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        files.save_checkpoint(progress.step, run.model, run.optimizer, run.scheduler,
                              progress.state(run.objective, run.digest), run.synced_ref)
    run.accelerator.wait_for_everyone()


def stop_on_signal(run: Run, files: RunFiles, progress: Progress, signum: int) -> None:
    """SIGTERM/SIGINT: save a checkpoint (where checkpoints are supported) and stop cleanly."""
    if not distributed.checkpoints_supported(run.accelerator):  # FSDP/ZeRO: as --save-every, refused
        raise Interrupted(f"stopped by signal {signum} after step {progress.step}; no checkpoint was saved "
                          f"(resumable checkpoints are not supported under "
                          f"{distributed.engine(run.accelerator).upper()}, see docs/scaling.md)", signum)
    save(run, files, progress)
    raise Interrupted(f"stopped by signal {signum} after step {progress.step}; checkpoint saved in "
                      f"{files.last_saved}; continue with --resume", signum)


def train(config: Config) -> dict:
    """Train a policy as ``config`` says; return the summary also written to ``summary.json``."""
    config = builder.resolve_defaults(config)
    run = check_settings_and_data(config)
    files = RunFiles(Path(config.output_dir), run.accelerator.is_main_process, config.save_total_limit,
                     run.accelerator)
    files.prepare(config.overwrite)  # only now that settings and data are known to be good
    run.accelerator.wait_for_everyone()
    build_models(run)
    progress = restore(run)
    files.start(config, progress.step if config.resume else None, run.checkpoints)
    progress.alarms = diagnostics.replay(diagnostics.Thresholds(
        **{k: getattr(config, f"alarm_{k}") for k in diagnostics.Thresholds._fields}), files.out / "metrics.jsonl")
    if progress.step == 0:
        progress.eval_before = evaluate_run(run, files, 0)
    bar = tqdm(total=run.total_steps, initial=progress.step, desc="dpolab",
               disable=not (config.progress and run.accelerator.is_main_process))
    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    t_start = time.perf_counter()
    with StopSignals() as signals:
        for step in range(progress.step, run.total_steps):
            t0 = time.perf_counter()
            indices = step_examples(len(run.train_examples), step, config.batch_size, config.seed)
            batches = micro_batches(run.train_examples, indices, rank, world, config.grad_accum, run.collate,
                                    run.accelerator.device)
            stats = train_step(run.policy, run.train_ref, run.objective, batches, run.optimizer, run.scheduler,
                               run.accelerator, config.max_grad_norm, config.batch_size // world)
            progress.step = done = step + 1
            if run.synced_ref is not None and done % config.ref_model_sync_steps == 0:  # TR-DPO
                tr_dpo_update_(run.synced_ref.parameters(), run.model.parameters(),
                               ref_model_mixup_alpha=config.ref_model_mixup_alpha)
            progress.tokens_seen += stats["num_tokens"]
            progress.last = stats | {"learning_rate": run.scheduler.get_last_lr()[0],
                                     "epoch": done / run.steps_per_epoch, "num_tokens": progress.tokens_seen,
                                     "tokens_per_second": stats["num_tokens"] / (time.perf_counter() - t0)}
            if done % config.log_every == 0 or done == run.total_steps:
                files.log(done, progress.last)
            progress.alarms.observe(done, progress.last)
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats.get('rewards/accuracies', float('nan')):.2f}",
                            margin=f"{stats['rewards/margins']:.3f}", tok_s=f"{progress.last['tokens_per_second']:.0f}")
            progress.guard.update(bool(stats["skipped"]), done, files.last_saved)
            if signum := signals.requested(run.accelerator):
                bar.close()
                stop_on_signal(run, files, progress, signum)
            if config.eval_every and done % config.eval_every == 0 and done != run.total_steps:
                evaluate_run(run, files, done)
            if config.save_every and done % config.save_every == 0 and done != run.total_steps:
                save(run, files, progress)
    bar.close()
    return finish(run, files, progress, time.perf_counter() - t_start)


def finish(run: Run, files: RunFiles, progress: Progress, runtime: float) -> dict:
    """Held-out metrics after training, the task report, then ``final/``, ``summary.json`` and the plots."""
    eval_after = evaluate_run(run, files, run.total_steps)
    summary = {"steps": run.total_steps, "skipped_steps": progress.guard.total, "train_runtime_seconds": runtime,
               "train": progress.last, "eval_before": progress.eval_before, "eval": eval_after,
               "data": {"digest": run.digest, "train_examples": len(run.train_examples),
                        "eval_examples": len(run.eval_examples)}}
    if run.task is not None and run.accelerator.is_main_process:
        summary |= run_task_report(run.config, run.task, run.judge, run.model, run.tokenizer)
    if "eval/rewards/accuracies" in eval_after:  # paired data (unpaired rows have no pairs to rank)
        summary["eval_reward_accuracy"] = eval_after["eval/rewards/accuracies"]
    summary["diagnostics"] = progress.alarms.after_training(summary, run.total_steps)
    run.accelerator.wait_for_everyone()
    state = distributed.full_state_dict(run.accelerator, run.policy)  # every process: FSDP/ZeRO-3 gather shards
    files.finish(run.model, run.tokenizer, run.config, state, summary, run.objective.state)
    run.accelerator.wait_for_everyone()
    return summary


def load_task_or_refuse(spec: str | None):
    if spec is None:
        return None
    try:
        return load_task(spec)
    except ValueError as e:
        raise ConfigError(f"task: {e}") from None


def run_task_report(config: Config, task, judge, policy, tokenizer) -> dict[str, float]:
    """Task reward of the reference and of the trained policy, same prompts and seeds; KL from samples; the
    judged win rate of the policy against the reference (T = 1, one answer each per prompt)."""
    reference = load_model(config.ref_model or config.model, config.trust_remote_code, config.allow_pickle_weights,
                           attn_implementation=config.attn_implementation)
    reference.to(next(policy.parameters()).device)
    args = dict(num_prompts=config.task_prompts, num_samples=config.task_samples, seed=config.seed,
                max_new_tokens=config.task_max_new_tokens, collate=builder.collate_for(config, tokenizer),
                progress=config.progress)
    before = task_report(reference, reference, tokenizer, task, **args)
    after = task_report(policy, reference, tokenizer, task, **args)
    win = judged_win_rate(policy, reference, tokenizer, list(task.eval_prompts[:config.task_prompts]), judge,
                          JudgmentCache(Path(config.output_dir) / "judgments.jsonl"), 1.0, config.seed,
                          config.task_max_new_tokens, progress=False)
    return before_after(before, after) | {k: win[k] for k in ("win_rate", "win_rate_ci", "lc_win_rate")} | {
        "judge": judge.identity}


