"""The builder: where a config becomes components, each built once and handed down as plain arguments.

Training (:mod:`dpolab.training.loop`) and evaluation (:mod:`dpolab.evaluation.heldout`) ask it for: the
checks that need the disk or a device (:func:`check_environment`), the Accelerator, the objective (built
once), the rows and their tokenised examples, the collate function (pad id, layout, row budget) and the
reference strategy, decided by :func:`dpolab.models.reference.choose_reference` and built by
:func:`build_reference`. Components never see the config.
"""

from __future__ import annotations

import copy
import ctypes.util
import importlib.util
import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dpolab import embedded
from dpolab.evaluation.metrics import trackers
from dpolab.data.batch import Collate
from dpolab.data.reading import load_records
from dpolab.data.records import Example, split_records, unpair_records
from dpolab.data.tokenization import add_mismatched_completions, tokenize_records
from dpolab.errors import ConfigError, DataError
from dpolab.models import adapters
from dpolab.models.loading import is_adapter_dir, load_model
from dpolab.models.reference import (ADAPTERS, NONE, REF_MODEL, CachedReference, ModelReference, NoReference,
                                     cache_key, choose_reference, compute_table, reference_identity, shared_table)
from dpolab.objective import Objective, build_objective

if TYPE_CHECKING:  # annotations only
    from dpolab.config import Config

log = logging.getLogger("dpolab")


def resolve_defaults(config: Config) -> Config:
    """Fill the embedded default's model and data where the user gave none."""
    if config.model is None:
        config.model = str(embedded.MODEL)
    if config.data is None:
        config.data = str(embedded.TRAIN)
        if config.eval_data is None:
            config.eval_data = str(embedded.EVAL)
    return config


def uses_lora(config: Config) -> bool:
    return config.lora_r > 0 or is_adapter_dir(config.model)


def check_environment(config: Config) -> Config:
    """The refusals that need the disk (is --model an adapter folder?) or the device (can QLoRA run here?),
    before any model is loaded; :meth:`Config.validate` does all the others."""
    lora = uses_lora(config)
    if lora and config.ref_device and not config.ref_model:
        raise ConfigError("ref_device: with LoRA the reference is the policy itself with its adapters off, on the "
                          "policy's device; give --ref-model for a separate reference model")
    if config.merge_on_save and not lora:
        raise ConfigError("merge_on_save needs LoRA (--lora-r > 0 or an adapter as --model)")
    if config.load_in_4bit:
        if not lora:
            raise ConfigError("load_in_4bit (QLoRA) quantises the frozen base, which cannot be trained itself: add "
                              "LoRA adapters with --lora-r (or give an adapter folder as --model)")
        if (why := adapters.qlora_unavailable()) is not None:
            raise ConfigError(f"load_in_4bit: {why}")
    for tracker in trackers(config.report_to):
        if importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            raise ConfigError(f"report_to: {tracker} is not installed in this environment; install it (pip "
                              f"install {'mlflow-skinny' if tracker == 'mlflow' else tracker}) or remove it from "
                              "--report-to (metrics.jsonl is written either way)")
    return config


def make_accelerator(config: Config, with_trackers: bool = False):
    """A fresh Accelerator per run, with the trackers of ``--report-to`` when ``with_trackers`` (training).
    Accelerate keeps its precision in a process-wide singleton; it is reset (keeping the process group) so
    that runs with different precision can follow one another in one Python process, as in a notebook."""
    from accelerate import Accelerator  # deferred: accelerate is a heavy import
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # With no GPU (or other accelerator), Accelerate sets up a multi-process (gloo) group only when told to
    # use the CPU; otherwise every process of a torchrun launch would train alone on its own.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if config.bf16 else "no", cpu=not has_accelerator,
                              log_with=make_trackers(config) if with_trackers else None)
    if config.bf16 and accelerator.device.type == "cpu" and cpu_lacks_bf16():
        log.warning("--bf16 on this CPU: it has no native bfloat16 arithmetic (no avx512_bf16, amx_bf16 or Arm bf16 "
                    "in /proc/cpuinfo), so PyTorch runs bf16 matmuls on a slow path, 40-300x slower than fp32 on "
                    "such a CPU (docs/performance.md); drop --bf16 to train in fp32")
    if accelerator.device.type == "cpu" and (hint := allocator_hint()):
        log.info(hint)
    deepspeed = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed is not None:  # there is no DataLoader to infer it from (untested here: no DeepSpeed)
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = max(
            1, config.batch_size // (accelerator.num_processes * config.grad_accum))
    return accelerator


def cpu_lacks_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True where ``cpuinfo`` lists a CPU's features and none of them is native bfloat16 arithmetic (x86's
    avx512_bf16 or amx_bf16, Arm's bf16); False where it has one or there is no such file (not Linux)."""
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:
        return False
    features = {w for line in lines if line.startswith(("flags", "Features")) for w in line.split(":", 1)[-1].split()}
    return bool(features) and not features & {"avx512_bf16", "amx_bf16", "bf16"}


def allocator_hint() -> str | None:
    """On glibc, when tcmalloc is installed but not preloaded: how to preload it. glibc's malloc keeps the pages
    of freed activations, so CPU training's peak RSS runs gigabytes above what is live; tcmalloc reuses them
    (docs/performance.md: 7.1 → 5.7 GB on SmolLM2-135M, 7.7 → 4.5 GB with LoRA, no slower)."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if platform.libc_ver()[0] != "glibc" or "tcmalloc" in preloaded or "jemalloc" in preloaded:
        return None
    found = find_tcmalloc()
    if not found:
        return None
    return (f"training on the CPU with glibc's malloc, which keeps freed activations' pages: "
            f"LD_PRELOAD={found} before the command lowers the peak memory (docs/performance.md)")


def find_tcmalloc() -> str | None:
    """The name the dynamic linker finds tcmalloc by (Debian/Ubuntu: apt install libtcmalloc-minimal4), or None."""
    return ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library("tcmalloc")


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker → import name


def make_trackers(config: Config) -> list:
    """Accelerate's trackers for ``--report-to``: TensorBoard in OUTPUT_DIR/tensorboard; wandb (project
    dpolab; WANDB_MODE and WANDB_DIR as wandb reads them) and MLflow (experiment dpolab; MLFLOW_TRACKING_URI)
    with the output folder's name as the run's."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker  # deferred: heavy

    name = Path(config.output_dir).name
    make = {"tensorboard": lambda: TensorBoardTracker("tensorboard", config.output_dir),
            "wandb": lambda: WandBTracker("dpolab", name=name),
            "mlflow": lambda: MLflowTracker("dpolab", run_name=name)}
    return [make[t]() for t in trackers(config.report_to)]


def objective_for(config: Config, gather=None) -> Objective:
    """The objective, bound to the config's losses, β and settings; built once per run and handed down."""
    return build_objective(config.loss_names, config.loss_weights, config.beta, vars(config), gather)


def collate_for(config: Config, tokenizer) -> Collate:
    return Collate(tokenizer.pad_token_id, config.layout, config.row_tokens)


def reference_kind(config: Config, objective: Objective) -> str:
    """The reference strategy this config selects (:func:`choose_reference`)."""
    return choose_reference(objective.needs_ref, config.reference_free, config.ref_model, uses_lora(config))


def ignored_columns(config: Config) -> list[str]:
    return [c.strip() for c in (config.ignore_columns or "").split(",") if c.strip()]


def read_records(config: Config, objective: Objective) -> tuple[list, list]:
    """Read, validate and split the training and held-out rows; needs no tokenizer, so bad data is refused
    before anything is loaded."""
    records = prepare_records(config, objective, load_records(config.data, config.skip_invalid,
                                                                ignored_columns(config)))
    if config.eval_data:
        eval_records = prepare_records(config, objective, load_records(config.eval_data, config.skip_invalid,
                                                                         ignored_columns(config)))
    else:
        records, eval_records = split_records(records, config.eval_split, config.seed)
    return records, eval_records


def load_examples(config: Config, objective: Objective, tokenizer, records: tuple[list, list]
                  ) -> tuple[list[Example], list[Example]]:
    """Tokenise the training and held-out rows of :func:`read_records`."""
    records, eval_records = records
    train = tokenize_for(config, objective, records, tokenizer)
    held = tokenize_for(config, objective, eval_records, tokenizer) if eval_records else []
    log.info("data: %d training and %d held-out examples", len(train), len(held))
    return train, held


def tokenize_for(config: Config, objective: Objective, records, tokenizer) -> list[Example]:
    """Tokenise records by SPEC §4, adding KTO's mismatched completions when a loss needs them."""
    examples = tokenize_records(records, tokenizer, config.max_length, config.max_prompt_length,
                                config.template_mismatch)
    if objective.needs_kl:
        examples = add_mismatched_completions(examples, config.seed, config.max_length)
    return examples


def prepare_records(config: Config, objective: Objective, records):
    """Check that the records carry a preference at all and fit the losses (kind, columns), unpairing pairs
    when asked."""
    kind = records[0].kind
    if kind != "unpaired" and all(all(c == r.completions[0] for c in r.completions[1:]) for r in records):
        raise DataError(f"{records[0].where.rsplit(',', 1)[0]}: in every one of its {len(records)} rows the chosen "
                        "answer equals the rejected one, so there is no preference to learn and training would only "
                        "move the model at random; no model was loaded and nothing was written. Check how the pairs "
                        "were built (dpolab inspect counts identical pairs)")
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
    for loss, params in zip(objective.losses, objective.params):  # values a loss cannot take (ODPO: log of ≤ 0)
        for r in records if loss.margin_check is not None else ():
            if (why := loss.margin_check(r.margin, **params)) is not None:
                raise ConfigError(f"{r.where}: {why}")
    if objective.data == "unpaired":  # losses that declare label_advice check the label balance
        n_d = sum(bool(r.label) for r in records)
        for loss, params in zip(objective.losses, objective.params):
            if loss.label_advice is not None and (warning := loss.label_advice(n_d, len(records) - n_d, **params)):
                log.warning("%s", warning)
    return records


def live_reference(config: Config, kind: str, model, accelerator):
    """The reference model strategy for ``kind`` (not ``none``), around the policy ``model`` before
    ``accelerator.prepare``: --ref-model, the adapters off, the policy itself (to precompute), or a copy."""
    device = config.ref_device or accelerator.device
    args = dict(chunk=config.logits_chunk, autocast=accelerator.autocast, ld_alpha=config.ld_alpha)
    if kind == REF_MODEL:
        ref_model = load_model(config.ref_model, config.trust_remote_code, config.allow_pickle_weights,
                               attn_implementation=config.attn_implementation)
        return ModelReference(ref_model.to(device), device=device, **args)
    if kind == ADAPTERS:
        return adapters.AdapterReference(model.to(accelerator.device), **args)
    if config.precompute_ref:  # the initial policy computes the table itself: no copy
        return ModelReference(model.to(device), device=device, **args)
    return ModelReference(copy.deepcopy(model).to(device), device=device, **args)


def build_reference(config: Config, kind: str, model, train_examples: list[Example],
                    eval_examples: list[Example], accelerator, collate: Collate):
    """(training reference, evaluation reference) of strategy ``kind`` (SPEC §5). With ``--precompute-ref``
    the live strategy computes the log-probs once, split over the processes, and is then dropped."""
    if kind == NONE:
        return NoReference(), NoReference()
    flags = [p.requires_grad for p in model.parameters()]  # the policy itself may serve to precompute
    reference = live_reference(config, kind, model, accelerator)
    if not config.precompute_ref:
        return reference, reference
    cache_dir = Path(config.ref_cache_dir or Path(config.output_dir) / "ref_cache")
    identity = reference_identity(config.ref_model or config.model)
    settings = {"max_length": config.max_length, "max_prompt_length": config.max_prompt_length, "bf16": config.bf16,
                "ld_alpha": config.ld_alpha}
    device = config.ref_device or accelerator.device
    tables = []
    for examples in (train_examples, eval_examples):
        if not examples:
            tables.append(None)
            continue
        share = lambda ex=examples: compute_table(reference, ex, collate, config.batch_size, device,  # noqa: E731
                                                  config.progress and accelerator.is_main_process,
                                                  accelerator.process_index, accelerator.num_processes)
        shape = (len(examples), len(examples[0].completion_ids))
        tables.append(shared_table(accelerator, cache_dir, cache_key(identity, examples, settings), shape, share))
    for p, f in zip(model.parameters(), flags):
        p.requires_grad_(f)
    model.train()
    del reference  # train with no reference model in memory
    return CachedReference(tables[0]), CachedReference(tables[1]) if tables[1] is not None else None
