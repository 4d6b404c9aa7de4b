"""The rules a :class:`dpolab.config.Config`'s values must satisfy, checked by ``Config.validate`` before any
heavy work: pure functions of the values (no disk, no device; dpolab.builder.check_environment does those).
Each takes the config ``c`` and raises :class:`ConfigError` with the reason."""

from __future__ import annotations

from dpolab.errors import ConfigError
from dpolab.evaluation.metrics import TRACKERS, trackers
from dpolab.losses import LOSSES
from dpolab.objective import unused_settings


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def check_objective(c, defaults: dict) -> None:
    """The losses, β and the settings that reach them (dpolab.objective owns which setting reaches which)."""
    names = c.loss_names
    for n in names:
        _need(n in LOSSES, f"loss: unknown loss {n!r}; known: {', '.join(sorted(LOSSES))}")
    if c.loss_weights is not None:
        _need(len(c.loss_weights) == len(names),
              f"loss_weights has {len(c.loss_weights)} values for {len(names)} losses ({c.loss})")
    if c.beta is None:
        c.beta = LOSSES[names[0]].default_beta or 0.1
    _need(c.beta > 0, f"beta must be > 0, got {c.beta}")
    _need(0 <= c.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {c.label_smoothing}")
    _need(len({LOSSES[n].data for n in names}) == 1, f"losses {c.loss} need different kinds of data")
    _need(0 < c.exo_epsilon < 1, f"exo_epsilon must be in (0, 1), got {c.exo_epsilon}")
    _need(c.ld_alpha is None or 0 <= c.ld_alpha <= 1, f"ld_alpha must be in [0, 1], got {c.ld_alpha}")
    _need(c.ld_alpha is None or LOSSES[names[0]].data == "paired", "ld_alpha (LD-DPO) applies to paired losses")
    _need(min(c.desirable_weight, c.undesirable_weight) > 0, "KTO's weights must be > 0")
    if c.f_divergence_type != "reverse_kl":
        bad = [n for n in names if LOSSES[n].needs_ref and not LOSSES[n].f_divergence]
        _need(not bad, f"f_divergence_type {c.f_divergence_type} does not apply to {', '.join(bad)}")
    unused = unused_settings([LOSSES[n] for n in names], vars(c), defaults)
    _need(not unused, "; ".join(unused))  # no option is accepted and ignored


def check_ranges(c) -> None:
    """Optimisation, tokenisation, run control and sampling values in their ranges."""
    _need(c.learning_rate > 0, f"learning_rate must be > 0, got {c.learning_rate}")
    _need(0 <= c.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {c.warmup_ratio}")
    _need(c.batch_size >= 1 and c.grad_accum >= 1, "batch_size and grad_accum must be ≥ 1")
    _need(c.batch_size % c.grad_accum == 0, f"batch_size {c.batch_size} is not divisible by grad_accum {c.grad_accum}")
    _need(c.epochs > 0, f"epochs must be > 0, got {c.epochs}")
    _need(c.max_steps is None or c.max_steps >= 1, f"max_steps must be ≥ 1, got {c.max_steps}")
    _need(0 <= c.eval_split < 1, f"eval_split must be in [0, 1), got {c.eval_split}")
    _need(c.max_prompt_length >= 1 and c.max_length > c.max_prompt_length,
          f"max_length ({c.max_length}) must exceed max_prompt_length ({c.max_prompt_length}) ≥ 1")
    _need(c.logits_chunk >= 1, "logits_chunk must be ≥ 1")
    _need(c.row_tokens >= 0, f"row_tokens must be ≥ 0, got {c.row_tokens}")
    _need(c.layout == "packed" or c.row_tokens == 0,
          f"row_tokens sets the rows of --layout packed; it does nothing with --layout {c.layout}")
    _need(min(c.eval_every, c.save_every, c.lora_r, c.max_nonfinite_steps) >= 0,
          "eval_every, save_every, lora_r and max_nonfinite_steps must be ≥ 0")
    _need(c.save_total_limit >= 1 and c.log_every >= 1, "save_total_limit and log_every must be ≥ 1")
    _need(not (c.resume and c.overwrite), "resume and overwrite contradict each other: pick one")
    _need(0 <= c.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {c.lora_dropout}")
    _need(min(c.task_prompts, c.task_samples, c.task_max_new_tokens) >= 1,
          "task_prompts, task_samples and task_max_new_tokens must be ≥ 1")
    _need(min(c.num_prompts, c.num_samples, c.max_new_tokens) >= 1,
          "num_prompts, num_samples and max_new_tokens must be ≥ 1")
    _need(c.temperature >= 0, f"temperature must be ≥ 0, got {c.temperature}")
    _need(c.judge_timeout > 0, f"judge_timeout must be > 0, got {c.judge_timeout}")
    _need(c.temperatures is None or (c.temperatures and min(c.temperatures) >= 0),
          f"temperatures must be ≥ 0, got {c.temperatures}")
    _need(c.warmup_steps >= 0, f"warmup_steps must be ≥ 0, got {c.warmup_steps}")
    _need(c.rounds >= 1, f"rounds must be ≥ 1, got {c.rounds}")
    _need(c.prompts_per_round >= 0, f"prompts_per_round must be ≥ 0 (0: every prompt), got {c.prompts_per_round}")
    bad = [t for t in trackers(c.report_to) if t not in TRACKERS]
    _need(not bad, f"report_to: unknown tracker {', '.join(bad)}; known: {', '.join(TRACKERS)}, or none")
    check_alarms(c)


def check_alarms(c) -> None:
    """The alarms' thresholds in their ranges (dpolab.training.diagnostics)."""
    _need(min(c.alarm_window, c.alarm_patience, c.alarm_easy_steps) >= 1,
          "alarm_window, alarm_patience and alarm_easy_steps must be ≥ 1")
    _need(min(c.alarm_logp_drop, c.alarm_margin_gain, c.alarm_reward_eps, c.alarm_loss_tolerance,
              c.alarm_length_growth) >= 0, "alarm_logp_drop, alarm_margin_gain, alarm_reward_eps, "
          "alarm_loss_tolerance and alarm_length_growth must be ≥ 0")
    _need(0 < c.alarm_easy_accuracy <= 1, f"alarm_easy_accuracy must be in (0, 1], got {c.alarm_easy_accuracy}")


def check_reference(c) -> None:
    """Reference settings against the losses (whether the run has a reference at all, and TR-DPO's)."""
    uses_ref = any(LOSSES[n].needs_ref for n in c.loss_names) and not c.reference_free
    _need(uses_ref or c.ref_model is None,
          f"--ref-model was given but {'reference_free' if c.reference_free else c.loss} uses no reference model")
    _need(uses_ref or not c.precompute_ref, "precompute_ref needs a loss that uses a reference model")
    _need(uses_ref or c.ref_device is None, "ref_device is set but the loss uses no reference model")
    _need(0 < c.ref_model_mixup_alpha <= 1 and c.ref_model_sync_steps >= 1,
          "ref_model_mixup_alpha must be in (0, 1] and ref_model_sync_steps ≥ 1")
    if c.sync_ref_model:
        _need(not c.lora_r or c.ref_model, "sync_ref_model (TR-DPO) needs a reference model of its own; "
                                           "with LoRA the reference is the policy with adapters off")
        _need(uses_ref, "sync_ref_model (TR-DPO) needs a loss with a reference model")
        _need(not c.precompute_ref, "sync_ref_model (TR-DPO) updates the reference, so it cannot be "
                                    "precomputed: drop --precompute-ref")
