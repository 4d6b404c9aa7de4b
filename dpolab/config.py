"""One flat, typed config. Each field's ``help`` is its docstring: it gives the flag, the YAML key and the
``--help`` text. Unknown keys and invalid values are refused here, before any model is loaded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpolab import validation
from dpolab.data.batch import DEFAULT_LAYOUT, DEFAULT_ROW_TOKENS, LAYOUTS
from dpolab.errors import ConfigError


# Fields of the sampling, scoring and judging commands only; a training run takes every other field.
NOT_TRAINING = ("prompts", "reward", "output", "num_prompts", "num_samples", "temperature", "max_new_tokens",
                "prompt", "response", "adapter", "temperatures", "rounds", "prompts_per_round", "pairs", "ref_update",
                "keep_pairs")


def opt(default: Any, help: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Config:
    # --- what to train
    model: str | None = opt(None, "Policy to train: a Hugging Face model folder or hub name. "
                                  "Unset: the bundled tiny model (the embedded default).")
    ref_model: str | None = opt(None, "Frozen reference model. Unset: in training a frozen copy of the initial "
                                      "policy; elsewhere the reference a dpolab final/ folder records.")
    data: str | None = opt(None, "Preference data: a .jsonl/.json/.csv/.parquet file, a saved dataset folder, "
                                 "or a hub dataset name (name or name:split). Unset: the bundled dataset.")
    eval_data: str | None = opt(None, "Held-out preference data, in any form --data takes.")
    eval_split: float = opt(0.05, "Fraction of --data held out for evaluation when --eval-data is unset; "
                                  "0 turns it off.")
    output_dir: str = opt("runs/dpolab", "Where the run writes config, metrics, checkpoints, final model, plots.")
    task: str | None = opt(None, "A task (built-in name or module:function) whose reward scores sampled "
                                 "answers of the reference and of the trained policy on held-out prompts.")
    task_prompts: int = opt(200, "Held-out task prompts to score.")
    task_samples: int = opt(4, "Answers sampled per task prompt (temperature 1).")
    task_max_new_tokens: int = opt(64, "Longest sampled answer in tokens.")
    # --- the objective
    loss: str = opt("sigmoid", "Loss name, or comma-separated names combined with --loss-weights "
                               "(see docs/losses.md).")
    loss_weights: list[float] | None = opt(None, "Comma-separated weights, one per --loss name (default all 1).")
    beta: float | None = opt(None, "β: strength of the KL anchor to the reference (the reward temperature); "
                                   "default 0.1, or the loss's own (SimPO: 2.0).")
    label_smoothing: float = opt(0.0, "ε: assumed label-noise rate (cDPO, robust DPO); 0 ≤ ε < 0.5.")
    reference_free: bool = opt(False, "Use ref log-probs of 0 with a reference loss: no reference model.")
    # --- loss hyper-parameters (docs/losses.md); each is bound to the losses that declare it
    exo_epsilon: float = opt(1e-3, "EXO's ε in (0, 1) (exo_pair).")
    discopop_tau: float = opt(0.05, "DiscoPOP's temperature τ (discopop).")
    rdpo_alpha: float = opt(0.01, "R-DPO's length penalty α per token of n_c − n_r (rdpo).")
    odpo_alpha: float = opt(1.0, "ODPO's offset scale α: the offset is α·f(score_chosen − score_rejected) (odpo).")
    odpo_transform: str = opt("log", "ODPO's f of the score gap: log (the paper's; every gap must be > 0) or "
                                     "identity (gaps ≥ 0) (odpo).", choices=("log", "identity"))
    dpop_lambda: float = opt(50.0, "DPO-Positive's penalty weight λ (dpop).")
    simpo_gamma: float = opt(1.0, "Target reward margin γ (simpo, alphapo).")
    alphapo_alpha: float = opt(0.25, "AlphaPO's reward-shape α; 0 gives SimPO (alphapo).")
    cpo_alpha: float = opt(1.0, "Weight of CPO's NLL term on the chosen answers (cpo).")
    desirable_weight: float = opt(1.0, "KTO's λ_D, the weight of desirable rows (kto).")
    undesirable_weight: float = opt(1.0, "KTO's λ_U, the weight of undesirable rows (kto).")
    bco_running_delta: bool = opt(False, "BCO's δ as the running mean of the rewards (the paper); off: δ = 0.")
    unpair: bool = opt(False, "Turn each preference pair into a desirable and an undesirable row, for "
                              "unpaired losses (kto, bco).")
    # --- modifiers
    f_divergence_type: str = opt("reverse_kl", "f-DPO: the divergence to the reference (reverse_kl is DPO).",
                                 choices=("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"))
    f_alpha_divergence_coef: float = opt(0.5, "α of the alpha_divergence.")
    use_weighting: bool = opt(False, "WPO: weight each pair's loss by exp(ā_c)·exp(ā_r), ā the policy's mean "
                                     "per-token log-prob aligned by log Σ_v p(v)² (the paper's eq. 2, as TRL 1.16's "
                                     "use_weighting).")
    ld_alpha: float | None = opt(None, "LD-DPO: scale log-probs of completion tokens beyond the shorter "
                                       "answer's length by α in [0, 1].")
    sync_ref_model: bool = opt(False, "TR-DPO: move the reference towards the policy every "
                                      "--ref-model-sync-steps steps.")
    ref_model_mixup_alpha: float = opt(0.6, "TR-DPO's α: ref ← α·policy + (1 − α)·ref.")
    ref_model_sync_steps: int = opt(512, "TR-DPO's τ: optimizer steps between reference updates.")
    # --- optimisation
    learning_rate: float = opt(1e-6, "Peak learning rate of AdamW.")
    lr_scheduler: str = opt("cosine", "Decay after warm-up.", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = opt(0.1, "Fraction of the optimizer steps spent in linear warm-up.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Clip the gradient's global norm to this; 0 turns clipping off.")
    batch_size: int = opt(8, "Preference examples per optimizer step over all processes (global).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step on each process; divides --batch-size.")
    epochs: float = opt(1.0, "Passes over the training data (ignored when --max-steps is set).")
    max_steps: int | None = opt(None, "Optimizer steps to run; overrides --epochs.")
    seed: int = opt(42, "Seed for initialisation order, data order, the held-out split and sampling.")
    # --- tokenisation
    max_length: int = opt(512, "Longest prompt + completion in tokens; completions are cut from the right.")
    max_prompt_length: int = opt(256, "Longest prompt in tokens; prompts are cut from the left.")
    skip_invalid: bool = opt(False, "Drop and count invalid rows instead of stopping at the first one.")
    ignore_columns: str | None = opt(None, "Comma-separated extra data columns (e.g. id,source) to drop from every "
                                           "row; any other column that SPEC §4 does not name is an error.")
    # --- reference, memory, precision
    precompute_ref: bool = opt(False, "Compute reference log-probs once, cache them on disk, and train "
                                      "with no reference model in memory.")
    ref_cache_dir: str | None = opt(None, "Where precomputed reference log-probs are cached "
                                          "(default: OUTPUT_DIR/ref_cache).")
    ref_device: str | None = opt(None, "Device of a reference model (a frozen copy or --ref-model), e.g. cpu to "
                                       "keep it off the accelerator. Unset: the policy's device.")
    bf16: bool = opt(False, "bfloat16 autocast for forward and backward (weights and optimizer stay fp32).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    lean_backward: bool = opt(True, "Keep fewer activations for backward in Llama-form SwiGLU MLPs and RMSNorms "
                                    "(dpolab.models.lean: the same forward bit for bit, the product silu(gate)·up "
                                    "and the normalised input recomputed in backward); off: autograd keeps all.")
    logits_chunk: int = opt(256, "Completion tokens per chunk when turning hidden states into log-probs (a "
                                 "chunk's logits: chunk × vocabulary fp32 values, recomputed in backward).")
    layout: str = opt(DEFAULT_LAYOUT, "How examples become model rows; all give the same log-probs. packed: "
                                      "examples side by side in shared rows, each prompt processed once for all "
                                      "its completions, no padding inside rows (fastest); prefix: one row per "
                                      "example, [prompt | completion_1 | ... | completion_K]; padded: one "
                                      "right-padded row per completion (works with every attention kernel, "
                                      "e.g. flash_attention_2).", choices=tuple(LAYOUTS))
    row_tokens: int = opt(DEFAULT_ROW_TOKENS, "Token budget of a packed row (--layout packed); 0: as long as the "
                                              "micro-batch's longest example, which keeps the attention cost of "
                                              "a row (quadratic in its length under a dense mask) at one "
                                              "example's.")
    attn_implementation: str | None = opt(None, "Attention kernel the models run with, as transformers names it "
                                                "(sdpa, eager, flex_attention, flash_attention_2, ...). Unset: "
                                                "the model's default (sdpa for most). The prefix and packed layouts "
                                                "need one that takes their mask (sdpa, eager, or flex_attention, "
                                                "which skips masked blocks but trains on GPUs only); any other "
                                                "needs --layout padded.")
    trust_remote_code: bool = opt(False, "Allow model code from the model folder or hub (off: safer).")
    allow_pickle_weights: bool = opt(False, "Also load weights from pickle files (.bin/.pt), which can run "
                                            "code when loaded; off: safetensors only.")
    # --- adapters (LoRA through PEFT); 0 = full fine-tuning
    lora_r: int = opt(0, "LoRA rank; 0 trains all weights. The reference is then the model with its adapters "
                         "off: no second copy. (A PEFT adapter folder as --model trains that adapter further.)")
    lora_alpha: float = opt(16.0, "LoRA scaling α.")
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: str = opt("all-linear", "Comma-separated module names, or all-linear.")
    merge_on_save: bool = opt(False, "With LoRA: also write OUTPUT_DIR/merged, the adapter folded into the base "
                                     "weights (a plain Hugging Face model); final/ keeps the adapter.")
    load_in_4bit: bool = opt(False, "QLoRA: load the frozen base in 4-bit NF4 (bitsandbytes, double quantisation, "
                                    "bf16 compute) and train LoRA adapters on it; needs --lora-r (or an adapter "
                                    "as --model), a CUDA GPU and the bitsandbytes package, and is refused "
                                    "without them. final/ holds the adapter; merging loads the base in full "
                                    "precision.")
    # --- run control
    eval_every: int = opt(0, "Evaluate every N optimizer steps (0: only before and after training).")
    save_every: int = opt(500, "Save a resumable checkpoint every N optimizer steps (0: never).")
    save_total_limit: int = opt(2, "Keep only the newest N checkpoints.")
    log_every: int = opt(1, "Write metrics every N optimizer steps.")
    resume: bool = opt(False, "Continue from the newest complete checkpoint in --output-dir.")
    overwrite: bool = opt(False, "Replace an existing non-empty --output-dir.")
    progress: bool = opt(True, "Show a progress bar.")
    max_nonfinite_steps: int = opt(3, "Stop after this many steps in a row with a NaN/inf loss or gradient "
                                      "(each is skipped, never applied); 0: never stop.")
    # --- alarms while training (dpolab.training.diagnostics, docs/diagnostics.md)
    alarm_window: int = opt(5, "Alarms: logged steps in each moving mean the alarms compare.")
    alarm_patience: int = opt(50, "Alarms: optimizer steps before margin_stalled and not_learning can be raised.")
    alarm_logp_drop: float = opt(0.25, "Alarm displacement: nats the mean chosen log-prob must fall below its "
                                       "first window's while the margin grows.")
    alarm_margin_gain: float = opt(0.05, "Alarms: the least rise of the mean reward margin over its first "
                                         "window that counts as growing (displacement, margin_stalled).")
    alarm_reward_eps: float = opt(0.01, "Alarm not_learning: mean rewards below this in size are near zero.")
    alarm_loss_tolerance: float = opt(0.02, "Alarm not_learning: the loss within this fraction of its start.")
    alarm_easy_accuracy: float = opt(0.95, "Alarm too_easy: mean reward accuracy at or above this by step "
                                           "--alarm-easy-steps.")
    alarm_easy_steps: int = opt(20, "Alarm too_easy: the step by which a near-perfect accuracy counts as early.")
    alarm_ref_token_logp: float = opt(-5.0, "Alarm reference_collapse: the reference's mean log-prob per chosen "
                                            "token below this (nats).")
    alarm_length_growth: float = opt(0.2, "Alarm length_growth (with --task): sampled answers longer than the "
                                          "reference's by more than this fraction.")
    # --- the sampling and scoring commands (make-pairs, task-eval, score, merge)
    prompts: str | None = opt(None, "Prompts to sample from: JSONL with a 'prompt' field, or .txt with one prompt "
                                    "per line.")
    reward: str | None = opt(None, "Reward of a sampled answer: module:function taking (prompt, completion) → "
                                   "float, or a built-in task name.")
    output: str | None = opt(None, "Where the command writes its result (make-pairs: a JSONL file of pairs; "
                                   "merge: a model folder; inspect: a folder for inspect.json and lengths.png, "
                                   "default runs/inspect).")
    num_prompts: int = opt(200, "Held-out task prompts to score.")
    num_samples: int = opt(4, "Answers sampled per prompt.")
    temperature: float = opt(1.0, "Sampling temperature (0: greedy).")
    max_new_tokens: int = opt(64, "Longest sampled answer in tokens.")
    prompt: str | None = opt(None, "The prompt of the answer to score.")
    response: str | None = opt(None, "The answer to score.")
    adapter: str | None = opt(None, "A PEFT adapter folder (adapter_config.json), e.g. a LoRA run's final/.")
    # --- judges (dpolab compare, sweep, and train --task): dpolab.evaluation.judges
    judge: str | None = opt(None, "Who judges which of two answers is better: task:NAME (a task's reward), "
                                  "module:function (pointwise (prompt, completion) -> float, or pairwise "
                                  "(prompt, a, b) -> preference), reward_model:PATH, llm:PATH (a local chat "
                                  "model, both orders), endpoint:BASE_URL (OpenAI-compatible). Unset: the "
                                  "task's reward.")
    judge_model: str = opt("default", "Model name sent to an endpoint judge.")
    judge_api_key_env: str = opt("OPENAI_API_KEY", "Environment variable holding an endpoint judge's key "
                                                   "(none set: no Authorization header).")
    judge_timeout: float = opt(30.0, "Seconds an endpoint judge may take per request (each tried 3 times).")
    temperatures: list[float] | None = opt(None, "Comma-separated sampling temperatures of dpolab compare "
                                                 "(0: greedy). Unset: 0,1.")
    # --- online and iterative DPO (dpolab iterate): dpolab.training.iterate
    rounds: int = opt(3, "Rounds of sample → judge → pair → train → evaluate.")
    prompts_per_round: int = opt(0, "Prompts sampled per round: 0, the whole prompt set every round (iterative "
                                    "DPO); N, the next N of a seeded shuffle (online DPO: one batch a round).")
    pairs: str = opt("best-worst", "Pairs per prompt: best-worst (a highest-scored answer against a lowest) or "
                                   "all (every two answers whose scores differ, the score gap as margin).",
                     choices=("best-worst", "all"))
    ref_update: str = opt("round", "The reference of each round: round (the previous round's policy, as "
                                   "iterative DPO does) or fixed (the initial model, or --ref-model).",
                          choices=("round", "fixed"))
    keep_pairs: bool = opt(False, "Train each round on the pairs of every round so far (off: this round's).")
    # --- the ecosystem: trackers, warm-up in steps (as TRL recipes give it), chat templates
    report_to: str = opt("tensorboard", "Comma-separated experiment trackers the metrics also go to, through "
                                        "Accelerate's tracking API: tensorboard, wandb, mlflow, or none "
                                        "(metrics.jsonl is always written).")
    warmup_steps: int = opt(0, "Optimizer steps of linear warm-up; when > 0 it replaces --warmup-ratio.")
    template_mismatch: str = opt("error", "A chat template that does not render the prompt as a prefix of prompt "
                                          "+ completion: error (naming the row and the first differing token) or "
                                          "warn (split at the longest common token prefix, warning once).",
                                 choices=("error", "warn"))

    # ------------------------------------------------------------------
    def validate(self) -> "Config":
        """Refuse impossible values and combinations with the reason, before any heavy work. Reads nothing
        from disk and probes no device (dpolab.builder.check_environment does what needs them)."""
        for name, f in _fields().items():
            choices = f.metadata.get("choices")
            if choices and getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        validation.check_objective(self, {n: f.default for n, f in _fields().items()})
        validation.check_ranges(self)
        validation.check_reference(self)
        return self

    @property
    def loss_names(self) -> list[str]:
        return [n.strip() for n in self.loss.split(",") if n.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def training_settings(self) -> dict[str, Any]:
        """The values of the fields a training run takes (every field but :data:`NOT_TRAINING`)."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_TRAINING}

    @staticmethod
    def training_defaults() -> dict[str, Any]:
        return {k: f.default for k, f in _fields().items() if k not in NOT_TRAINING}

    def save(self, path: Path) -> None:
        """The resolved training settings as YAML (a run's config.yaml)."""
        path.write_text(yaml.safe_dump(self.training_settings(), sort_keys=False))



def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}
