"""TRL and alignment-handbook recipes as they are: the keys of TRL 1.16's ``DPOConfig`` (with transformers'
``TrainingArguments`` beneath it), ``ModelConfig`` and ``ScriptArguments``, and the handbook's
``dataset_mixer`` / ``dataset_mixture``, translated into dpolab's config fields.

A key is one of four kinds: a dpolab field (taken as it is; many TRL names are dpolab's), a recipe key with a
dpolab meaning (:data:`RENAMED`, or one of the keys :func:`translate` combines), a key that only concerns the
Hub, process launching or logging verbosity (:data:`IGNORED`: listed once, at start), and a key whose meaning
dpolab does not support (:data:`REFUSED`: one paragraph naming each, with what to do). Anything else is the
caller's "unknown key" with "did you mean". Flags override the file afterwards, as with dpolab's own keys.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dpolab.errors import ConfigError

log = logging.getLogger("dpolab")

# Recipe key → dpolab field, the same meaning and value.
RENAMED = {"model_name_or_path": "model", "num_train_epochs": "epochs", "lr_scheduler_type": "lr_scheduler",
           "precompute_ref_log_probs": "precompute_ref", "logging_steps": "log_every", "eval_steps": "eval_every",
           "save_steps": "save_every", "gradient_accumulation_steps": "grad_accum"}
# Keys translate() combines into dpolab fields (batch, losses, dtype, PEFT, data).
COMBINED = ("per_device_train_batch_size", "loss_type", "rpo_alpha", "torch_dtype", "dtype", "use_peft",
            "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "dataset_mixer",
            "dataset_mixture", "dataset_splits", "max_steps", "optim", "model_revision", "truncation_mode",
            "bnb_4bit_quant_type", "use_bnb_nested_quant")
IGNORED = ("push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token", "hub_revision",
           "run_name", "log_level", "log_level_replica", "logging_strategy", "logging_first_step", "logging_dir",
           "ddp_timeout", "ddp_find_unused_parameters", "ddp_backend", "dataloader_num_workers",
           "dataloader_pin_memory", "dataset_num_proc", "preprocessing_num_workers", "do_train", "do_eval",
           "eval_strategy", "evaluation_strategy", "save_strategy", "save_only_model", "per_device_eval_batch_size",
           "overwrite_output_dir", "remove_unused_columns", "gradient_checkpointing_kwargs", "disable_tqdm",
           "report_on_main_process", "local_rank", "tf32", "precompute_ref_batch_size",
           "pad_to_multiple_of", "bf16_full_eval", "log_on_each_node", "save_safetensors", "use_cpu",
           "ignore_bias_buffers")
# Key → what to do instead: dpolab has no such setting, and silently dropping it would change the run.
REFUSED = {
    "fp16": "dpolab trains in fp32 or bf16 autocast: use bf16: true",
    "load_in_8bit": "dpolab quantises only to 4-bit NF4 (QLoRA): use load_in_4bit: true or full precision",
    "bnb_4bit_quant_storage": "dpolab's QLoRA stores NF4 as transformers does by default: remove it",
    "use_dora": "DoRA is not implemented: remove it to train plain LoRA",
    "use_rslora": "rank-stabilised LoRA is not implemented: remove it (lora_alpha scales as alpha / r)",
    "lora_modules_to_save": "dpolab trains the adapters only: remove it",
    "lora_target_parameters": "name modules with lora_target_modules instead",
    "deepspeed": "launch under accelerate with a DeepSpeed config (accelerate launch --config_file ...)",
    "fsdp": "launch under accelerate with an FSDP config (accelerate launch --config_file ..., docs/scaling.md)",
    "fsdp_config": "launch under accelerate with an FSDP config (accelerate launch --config_file ...)",
    "torch_compile": "dpolab does not compile the model: remove it",
    "disable_dropout": "dpolab trains with the model's own dropout (none in most causal LMs); set the dropout "
                       "fields of the model's config.json to 0 and remove the key",
    "use_liger_kernel": "dpolab has its own chunked LM-head pass (--logits-chunk): remove it",
    "padding_free": "dpolab packs rows by default (--layout packed): remove it",
    "activation_offloading": "use gradient_checkpointing to save activation memory",
    "model_init_kwargs": "set dtype, attn_implementation and trust_remote_code as keys of their own",
    "lr_scheduler_kwargs": "dpolab's schedules take no arguments: remove it",
    "chat_template": "save the template in the model's tokenizer (tokenizer_config.json) and remove the key",
    "dataset_streaming": "dpolab reads the whole dataset: remove it",
    "generate_during_eval": "score samples with --task instead",
    "ref_adapter_name": "with LoRA the reference is the policy with its adapters off: remove it",
    "model_adapter_name": "give the adapter folder as model_name_or_path",
    "force_use_ref_model": "give ref_model to train against a separate reference",
    "auto_find_batch_size": "set per_device_train_batch_size and gradient_accumulation_steps",
    "neftune_noise_alpha": "NEFTune is not implemented: remove it",
    "gradient_accumulation_steps_per_device": "use gradient_accumulation_steps",
}
KEYS = (*RENAMED, *COMBINED, *IGNORED, *REFUSED)
# What dpolab runs, torch's AdamW; the paged variant is the same update with its 32-bit states paged to CPU.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw", "paged_adamw_32bit")


def translate(raw: dict[str, Any], fields, where: str, given=()) -> tuple[dict[str, Any], list[str], list[str]]:
    """(dpolab values, "key → field" lines of what was mapped, keys ignored) of a config file's mapping.
    ``fields`` are dpolab's field names: those keys pass through untouched; keys of neither vocabulary are
    left for the caller to refuse. ``given`` names the settings flags override; a ``data`` flag replaces the
    recipe's dataset together with the held-out split taken from it."""
    refused = [f"{k} ({REFUSED[k]})" for k in raw if k in REFUSED and k not in fields and raw[k] not in (None, False)]
    if refused:
        raise ConfigError(f"{where}: dpolab has no equivalent of " + "; ".join(refused) + ". Remove or change "
                          "these keys and run again; everything else in the recipe is understood.")
    values = {k: v for k, v in raw.items() if k in fields or k not in KEYS}
    mapped: list[str] = []
    for key, name in RENAMED.items():
        if key in raw and name not in raw:
            values[name] = raw[key]
            mapped.append(f"{key} → {name}")
    for key in ("report_to", "lora_target_modules"):  # lists in TRL, comma-separated in dpolab
        if isinstance(values.get(key), list):
            values[key] = ",".join(str(v) for v in values[key])
    steps = values.get("warmup_steps")
    if isinstance(steps, float) and 0 < steps < 1:  # transformers 5: a warmup_steps below 1 is a ratio
        values["warmup_ratio"] = values.pop("warmup_steps")
        mapped.append("warmup_steps < 1 → warmup_ratio")
    _batch(raw, values, mapped)
    _strategies(raw, values, mapped)
    _losses(raw, values, mapped, where)
    _model(raw, values, mapped, where)
    if "data" in given:
        mapped.append("dataset: replaced by --data (with its held-out split)")
    else:
        _data(raw, values, mapped, where)
    ignored = [k for k in raw if k in IGNORED and k not in fields]
    return values, mapped, ignored


def is_recipe(raw: dict[str, Any], fields) -> bool:
    """A file holding any recipe key that is not also a dpolab field."""
    return any(k in KEYS and k not in fields for k in raw)


def _batch(raw: dict, values: dict, mapped: list[str]) -> None:
    """TRL's batch is per device; dpolab's is global: per_device × accumulation × processes (SPEC §6)."""
    if "per_device_train_batch_size" in raw and "batch_size" not in raw:
        world = int(os.environ.get("WORLD_SIZE", "1"))  # set by accelerate launch and torchrun
        accum = int(raw.get("gradient_accumulation_steps") or 1)
        values["batch_size"] = int(raw["per_device_train_batch_size"]) * accum * world
        mapped.append(f"per_device_train_batch_size × gradient_accumulation_steps × {world} process(es) → "
                      f"batch_size {values['batch_size']}")
    if "max_steps" in raw:
        steps = raw["max_steps"]
        values["max_steps"] = None if steps is None or int(steps) <= 0 else steps  # TRL's −1: epochs decide
        mapped.append("max_steps → max_steps" + (" (−1: unset, epochs decide)" if values["max_steps"] is None else ""))
    if raw.get("optim") not in (None, *OPTIMIZERS):
        raise ConfigError(f"optim: {raw['optim']} is not available; dpolab runs torch's AdamW "
                          f"({', '.join(OPTIMIZERS)}); remove the key or set one of those")
    if raw.get("truncation_mode") not in (None, "keep_start", "keep_end"):
        raise ConfigError(f"truncation_mode: {raw['truncation_mode']!r} is not a TRL truncation mode")
    if raw.get("truncation_mode") == "keep_end":
        raise ConfigError("truncation_mode: keep_end is not supported; dpolab cuts prompts from the left and "
                          "completions from the right (SPEC §4, TRL's keep_start): remove the key")


def _strategies(raw: dict, values: dict, mapped: list[str]) -> None:
    """TrainingArguments' eval and save strategies: "no" turns the periodic ones off (dpolab still evaluates
    before and after training), "steps" uses eval_steps / save_steps, "epoch" has no dpolab setting."""
    for strategy, field, steps in (("eval_strategy", "eval_every", "eval_steps"),
                                   ("evaluation_strategy", "eval_every", "eval_steps"),
                                   ("save_strategy", "save_every", "save_steps")):
        value = raw.get(strategy, "steps")
        value = "no" if value is False else str(value).lower()  # YAML reads a bare no as false
        if value == "no":
            values[field] = 0
            mapped.append(f"{strategy} no → {field} 0")
        elif value not in ("steps", "best"):
            raise ConfigError(f"{strategy}: {value!r} is not supported; dpolab evaluates and saves every N "
                              f"steps: set {strategy}: steps and {steps}")


def _losses(raw: dict, values: dict, mapped: list[str], where: str) -> None:
    """``loss_type`` (a name or a list) → ``loss``; TRL's ``rpo_alpha`` is RPO: ``sigmoid`` + α·``sft``."""
    if "loss_type" in raw and "loss" not in raw:
        names = raw["loss_type"] if isinstance(raw["loss_type"], list) else str(raw["loss_type"]).split(",")
        values["loss"] = ",".join(str(n).strip() for n in names)
        mapped.append(f"loss_type → loss {values['loss']}")
    if raw.get("rpo_alpha") is not None:
        names = [n for n in str(values.get("loss", "sigmoid")).split(",") if n]
        if "sft" in names:
            raise ConfigError(f"{where}: rpo_alpha adds an sft term, but loss_type already lists sft; give its "
                              "weight in loss_weights instead")
        weights = list(values.get("loss_weights") or [1.0] * len(names))
        values["loss"], values["loss_weights"] = ",".join([*names, "sft"]), [*weights, float(raw["rpo_alpha"])]
        mapped.append(f"rpo_alpha → loss {values['loss']}, loss_weights {values['loss_weights']}")


def _model(raw: dict, values: dict, mapped: list[str], where: str) -> None:
    """dtype (bf16 autocast; weights stay fp32), TRL's revision, ``use_peft`` with its LoRA defaults."""
    dtype = raw.get("dtype", raw.get("torch_dtype"))
    if dtype not in (None, "auto", "float32", "bfloat16"):
        raise ConfigError(f"{where}: dtype {dtype} is not supported; dpolab keeps weights in float32 and trains "
                          "in bf16 autocast with bf16: true (use dtype bfloat16, float32 or auto)")
    if dtype == "bfloat16" and "bf16" not in raw:
        values["bf16"] = True
        mapped.append("dtype bfloat16 → bf16 (autocast; weights and optimizer stay float32)")
    if raw.get("bnb_4bit_quant_type") not in (None, "nf4") or raw.get("use_bnb_nested_quant") is False:
        raise ConfigError(f"{where}: dpolab's QLoRA loads the base in NF4 with double quantisation; set "
                          "bnb_4bit_quant_type: nf4 and use_bnb_nested_quant: true, or remove them")
    if raw.get("model_revision") not in (None, "main"):
        raise ConfigError(f"{where}: model_revision {raw['model_revision']} is not supported; download that "
                          "revision into a folder and give the folder as model_name_or_path")
    if "use_peft" in raw:
        if raw["use_peft"]:
            values["lora_r"] = int(raw.get("lora_r") or 16)  # TRL ModelConfig's default rank
            values.setdefault("lora_alpha", 32)  # and alpha
            values["lora_dropout"] = raw.get("lora_dropout", 0.05)
            mapped.append(f"use_peft → lora_r {values['lora_r']}" + ("" if "lora_target_modules" in raw else
                                                                     " (lora_target_modules unset: all-linear)"))
        else:
            values["lora_r"] = 0  # TRL ignores the lora_* keys without use_peft
            mapped.append("use_peft false → lora_r 0 (full fine-tuning)")


def _data(raw: dict, values: dict, mapped: list[str], where: str) -> None:
    """``dataset_name`` with its splits, or a mixture of exactly one dataset, → ``data`` (and ``eval_data``)."""
    name, train, test = raw.get("dataset_name"), raw.get("dataset_train_split"), raw.get("dataset_test_split")
    mix = raw.get("dataset_mixer") or raw.get("dataset_mixture")
    if isinstance(mix, dict) and "datasets" in mix:  # the handbook's dataset_mixture: {datasets: [{id, split, ...}]}
        entries = [(d.get("id") or d.get("path"), d.get("weight", 1.0), d.get("split")) for d in mix["datasets"]]
    elif isinstance(mix, dict):  # the older dataset_mixer: {name: fraction}
        entries = [(k, v, None) for k, v in mix.items()]
    else:
        entries = []
    if len(entries) > 1 or any(float(w or 1) != 1.0 for _, w, _ in entries):
        raise ConfigError(f"{where}: a mixture of several datasets (or a fraction of one) is not supported; "
                          "concatenate the rows into one file and give it as data (or dataset_name)")
    if entries:
        name, train = entries[0][0], entries[0][2] or train
    splits = raw.get("dataset_splits")
    if isinstance(splits, list):  # the handbook's [train_prefs, test_prefs]
        train = next((s for s in splits if "train" in s), train)
        test = next((s for s in splits if "test" in s), test)
    if name is None or "data" in raw:
        return
    if raw.get("dataset_config"):
        raise ConfigError(f"{where}: dataset_config {raw['dataset_config']} (a dataset's named configuration) "
                          "is not supported; save that configuration to a folder or file and give it as data")
    values["data"] = f"{name}:{train}" if train else name
    mapped.append(f"dataset_name → data {values['data']}")
    if test and "eval_data" not in raw:
        values["eval_data"] = f"{name}:{test}"
        mapped.append(f"dataset_test_split → eval_data {values['eval_data']}")


def announce(where: str, mapped: list[str], ignored: list[str]) -> None:
    """What a recipe's keys became, printed once at start (by the first process of a launch)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    log.info("%s: a TRL / alignment-handbook recipe; mapped %s", where, "; ".join(mapped) or "nothing")
    if ignored:
        log.info("%s: ignored (Hub, launching and logging only): %s", where, ", ".join(ignored))
