"""Setup helpers shared by training, evaluation and scoring: models, tokenizers, data, objective and
reference strategy, each built once from plain arguments."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from dpolab.config import Config
from dpolab.data import load_records, split_records, unpair_records
from dpolab.errors import ConfigError, DpolabError
from dpolab.objective import Objective, build_objective
from dpolab.reference import CachedReference, ModelReference, NoReference, cache_key, compute_table
from dpolab.tokenization import Example, add_mismatched_completions, tokenize_records

log = logging.getLogger("dpolab")


def resolve_defaults(config: Config) -> Config:
    """Fill the embedded default's model and data where the user gave none."""
    from dpolab import embedded

    if config.model is None:
        config.model = str(embedded.MODEL)
    if config.data is None:
        config.data = str(embedded.TRAIN)
        if config.eval_data is None:
            config.eval_data = str(embedded.EVAL)
    return config


def make_accelerator(config: Config):
    """A fresh Accelerator per run. Accelerate keeps its precision in a process-wide singleton; it is
    reset (keeping the process group) so that runs with different precision can follow one another in one
    Python process, as in a notebook."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # With no GPU (or other accelerator), Accelerate sets up a multi-process (gloo) group only when told to
    # use the CPU; otherwise every process of a torchrun launch would train alone on its own.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no", cpu=not has_accelerator)
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # there is no DataLoader to infer it from (untested here: no DeepSpeed)
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = max(
            1, config.batch_size // (accelerator.num_processes * config.grad_accum))
    return accelerator


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DpolabError(f"cannot load the tokenizer of {name}: {first_line(e)}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id serves
    return tok


def load_model(name: str, trust_remote_code: bool = False, allow_pickle: bool = False,
               load_in_4bit: bool = False, attn_implementation: str | None = None) -> torch.nn.Module:
    """A causal LM in fp32 (bf16 runs under autocast), from safetensors weights unless ``allow_pickle``.
    A PEFT adapter folder gives its base with the adapter merged in. ``load_in_4bit``: the weights are
    quantised to NF4 by bitsandbytes on this process's GPU (QLoRA; Config.validate refuses it elsewhere).
    ``attn_implementation``: the attention kernel (transformers' name); None keeps the model's default."""
    model = _load_model(name, trust_remote_code, allow_pickle, load_in_4bit)
    if attn_implementation:
        try:
            model.set_attn_implementation(attn_implementation)
        except (ImportError, ValueError) as e:
            raise DpolabError(f"cannot run {name} with attn_implementation={attn_implementation}: "
                              f"{first_line(e)}") from None
    return model


def _load_model(name: str, trust_remote_code: bool, allow_pickle: bool, load_in_4bit: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from dpolab import adapters

    if adapters.is_adapter_dir(name):
        return adapters.load_merged(name, trust_remote_code, allow_pickle)

    hf_logging.disable_progress_bar()
    quantized = {}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantized = dict(device_map={"": torch.cuda.current_device()}, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32,
                                                     use_safetensors=None if allow_pickle else True,
                                                     trust_remote_code=trust_remote_code, **quantized)
    except (OSError, ValueError) as e:
        msg = first_line(e)
        if "custom code" in msg or "trust_remote_code" in msg:
            msg += (" — dpolab runs no code from a model folder or the hub unless you pass --trust-remote-code "
                    "(do so only for a source you trust)")
        if "safetensors" in msg or ".bin" in msg:
            msg += (" — dpolab loads weights from safetensors only, because pickle files can run code; "
                    "convert the checkpoint with save_pretrained(safe_serialization=True), or pass "
                    "--allow-pickle-weights if you trust its source")
        raise DpolabError(f"cannot load the model {name}: {msg}") from None
    model.config.use_cache = False
    return model


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_objective_for(config: Config, gather=None) -> Objective:
    return build_objective(config.loss_names, config.loss_weights, config.beta, vars(config), gather)


def read_records(config: Config) -> tuple[list, list]:
    """Read, validate and split the training and held-out rows; needs no tokenizer, so bad data is refused
    before anything is loaded."""
    records = prepare_records(config, load_records(config.data, config.skip_invalid, ignored_columns(config)))
    if config.eval_data:
        eval_records = prepare_records(config, load_records(config.eval_data, config.skip_invalid,
                                                            ignored_columns(config)))
    else:
        records, eval_records = split_records(records, config.eval_split, config.seed)
    return records, eval_records


def ignored_columns(config: Config) -> list[str]:
    return [c.strip() for c in (config.ignore_columns or "").split(",") if c.strip()]


def load_examples(config: Config, tokenizer, records: tuple[list, list] | None = None
                  ) -> tuple[list[Example], list[Example]]:
    """Tokenise the training and held-out rows (read by :func:`read_records` unless given)."""
    records, eval_records = records or read_records(config)
    train = tokenize_for(config, records, tokenizer)
    held = tokenize_for(config, eval_records, tokenizer) if eval_records else []
    log.info("data: %d training and %d held-out examples", len(train), len(held))
    return train, held


def tokenize_for(config: Config, records, tokenizer) -> list[Example]:
    """Tokenise records by SPEC §4, adding KTO's mismatched completions when a loss needs them."""
    examples = tokenize_records(records, tokenizer, config.max_length, config.max_prompt_length)
    if build_objective_for(config).needs_kl:
        examples = add_mismatched_completions(examples, config.seed, config.max_length)
    return examples


def prepare_records(config: Config, records):
    """Check that the records fit the losses (kind, columns), unpairing pairs when asked."""
    objective = build_objective_for(config)
    kind = records[0].kind
    if objective.data == "unpaired" and kind == "paired":
        if not config.unpair:
            raise ConfigError(f"loss {config.loss} trains on unpaired rows (prompt, completion, label), but "
                              f"{records[0].where.rsplit(',', 1)[0]} holds pairs; pass --unpair to turn each pair "
                              "into a desirable and an undesirable row")
        records, kind = unpair_records(records), "unpaired"
    fits = kind == objective.data or (objective.data == "ranked" and kind == "paired")
    if not fits:
        raise ConfigError(f"loss {config.loss} needs {objective.data} data, but {records[0].where} is a {kind} row")
    if "margin" in objective.columns and any(r.margin is None for r in records):
        bad = next(r for r in records if r.margin is None)
        raise ConfigError(f"{bad.where}: loss {config.loss} needs a 'margin' (or score_chosen and score_rejected) "
                          "column in every row")
    if objective.data == "unpaired":  # losses that declare label_advice check the label balance
        n_d = sum(bool(r.label) for r in records)
        for loss, params in zip(objective.losses, objective.params):
            if loss.label_advice is not None and (warning := loss.label_advice(n_d, len(records) - n_d, **params)):
                log.warning("%s", warning)
    return records


def build_reference(config: Config, objective: Objective, model, train_examples: list[Example],
                    eval_examples: list[Example], accelerator, pad_id: int):
    """(training reference, evaluation reference) by the strategy the config selects (SPEC §5).

    ``model`` is the policy before ``accelerator.prepare``. The live strategies: ``--ref-model``, a frozen
    copy of the initial policy, or (LoRA) the policy with its adapters off. With ``--precompute-ref`` one of
    these computes the log-probs once, split over the processes, and is then dropped; the initial policy
    itself serves for that, so no copy is made.
    """
    from dpolab import adapters
    from dpolab.distributed import shared_table

    if not objective.needs_ref or config.reference_free:
        return NoReference(), NoReference()
    device = config.ref_device or accelerator.device
    flags = [p.requires_grad for p in model.parameters()]  # the policy itself may serve to precompute
    lora_reference = adapters.is_peft(model) and not config.ref_model
    if lora_reference and config.ref_device:
        raise ConfigError("--ref-device needs a reference model of its own: with LoRA the reference is the "
                          "policy itself with its adapters off")
    if config.ref_model:
        ref_model = load_model(config.ref_model, config.trust_remote_code, config.allow_pickle_weights,
                               attn_implementation=config.attn_implementation)
        reference = ModelReference(ref_model.to(device), config.logits_chunk, accelerator.autocast, device,
                                   config.ld_alpha)
    elif lora_reference:
        reference = adapters.AdapterReference(model.to(accelerator.device), config.logits_chunk, accelerator.autocast,
                                              ld_alpha=config.ld_alpha)
    elif config.precompute_ref:
        reference = ModelReference(model.to(device), config.logits_chunk, accelerator.autocast, device,
                                   config.ld_alpha)
    else:
        reference = ModelReference(copy.deepcopy(model).to(device), config.logits_chunk, accelerator.autocast,
                                   device, config.ld_alpha)
    if not config.precompute_ref:
        return reference, reference
    cache_dir = Path(config.ref_cache_dir or Path(config.output_dir) / "ref_cache")
    identity = adapters.reference_identity(config.ref_model or config.model)
    settings = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length, "bf16": config.bf16,
                "ld_alpha": config.ld_alpha}
    tables = []
    for examples in (train_examples, eval_examples):
        if not examples:
            tables.append(None)
            continue
        share = lambda ex=examples: compute_table(reference, ex, pad_id, config.batch_size, device,
                                                  config.progress and accelerator.is_main_process,
                                                  accelerator.process_index, accelerator.num_processes,
                                                  config.layout, config.row_tokens)
        shape = (len(examples), len(examples[0].completion_ids))
        tables.append(shared_table(accelerator, cache_dir, cache_key(identity, examples, settings), shape, share))
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    model.train()
    del reference  # train with no reference model in memory
    return CachedReference(tables[0]), CachedReference(tables[1]) if tables[1] is not None else None
