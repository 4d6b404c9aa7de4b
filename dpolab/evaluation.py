"""Evaluation: the SPEC §3 metrics over a dataset, and the implicit reward of one answer."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch

from dpolab import metrics as M
from dpolab.batch import DEFAULT_LAYOUT, DEFAULT_ROW_TOKENS, make_batch
from dpolab.errors import DpolabError
from dpolab.objective import Objective, Output
from dpolab.tokenization import Example, Tokenizer

log = logging.getLogger("dpolab")


@torch.no_grad()
def evaluate_examples(policy, reference, objective: Objective, examples: list[Example], batch_size: int,
                      accelerator, pad_id: int, prefix: str = "eval/", layout: str = DEFAULT_LAYOUT,
                      row_tokens: int = DEFAULT_ROW_TOKENS) -> dict[str, float]:
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
        for i in range(0, len(examples), per_step):
            chunk = examples[i: i + per_step]
            size = -(-len(chunk) // world)  # every process's batch size
            mine = chunk[rank::world]
            real = len(mine)
            batch = make_batch(mine + [chunk[0]] * (size - real), pad_id, layout, row_tokens).to(accelerator.device)
            if world > 1:  # KL pairs of padding rows leave the gathered estimate
                keep = accelerator.gather((torch.arange(size) < real).float().to(accelerator.device)) > 0
                objective.gather = lambda t, keep=keep: accelerator.gather(t)[keep]
            out = objective(policy(**batch.model_inputs()), reference(batch), batch)
            total = M.add(total, M.example_sums(first_examples(out, batch, real)))
    finally:
        objective.gather = gather
    if total is None:  # no examples at all; every process still joins the reduction
        total = M.zeros(objective.data != "unpaired", objective.needs_kl)
    total = {k: accelerator.reduce(v.to(accelerator.device), "sum") for k, v in total.items()}
    policy.train(was_training)
    return M.means(total, prefix)


def first_examples(out: Output, batch, n: int) -> Output:
    """The part of ``out`` that belongs to the batch's first ``n`` examples (the rest is padding). Unpaired
    outputs list the desirable and the undesirable examples apart, each in batch order."""
    if n == len(out.losses):
        return out
    if out.paired:
        return replace(out, losses=out.losses[:n], chosen_rewards=out.chosen_rewards[:n],
                       rejected_rewards=out.rejected_rewards[:n], chosen_logps=out.chosen_logps[:n],
                       rejected_logps=out.rejected_logps[:n])
    desirable = int(batch.labels[:n].sum())
    return replace(out, losses=out.losses[:n], chosen_rewards=out.chosen_rewards[:desirable],
                   rejected_rewards=out.rejected_rewards[:n - desirable], chosen_logps=out.chosen_logps[:desirable],
                   rejected_logps=out.rejected_logps[:n - desirable])


RECORD = "dpolab.json"  # in a run's final/: the reference and the objective the run trained with
TOKENISATION = ("max_length", "max_prompt_length", "batch_size")  # kept even when --loss changes


def recorded_fields() -> tuple[str, ...]:
    """The config fields a run records in ``final/dpolab.json`` so that ``dpolab eval`` and ``dpolab score``
    measure with the run's own objective: the losses, β and every setting a loss or modifier reads, the
    tokenisation and batch (KTO's KL estimate is a batch statistic), and the precision."""
    from dpolab.losses import LOSSES, MODIFIER_SETTINGS

    trained_only = {"sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"}  # TR-DPO moves the ref
    params = sorted({p for loss in LOSSES.values() for p in loss.params})
    modifiers = [s.name for s in MODIFIER_SETTINGS if s.name not in trained_only]
    return ("loss", "loss_weights", "beta", *params, *modifiers, *TOKENISATION, "bf16")


def run_record(config, objective_state: dict) -> dict:
    """What ``final/dpolab.json`` holds: the reference, β and loss (read by people and older dpolab), every
    recorded setting, and the objective's state (BCO's running δ)."""
    reference = config.ref_model or config.model
    if Path(reference).exists():
        reference = str(Path(reference).resolve())
    settings = {k: getattr(config, k) for k in recorded_fields()}
    return {"reference": reference, "beta": config.beta, "loss": config.loss, "settings": settings,
            "objective_state": dict(objective_state)}


def read_record(model: str) -> dict:
    """The record of a dpolab ``final/`` folder, or {} for any other model."""
    meta = Path(model) / RECORD
    return json.loads(meta.read_text()) if meta.is_file() else {}


def default_reference(model: str) -> str | None:
    """The reference a dpolab ``final/`` folder was trained against, if it says."""
    return read_record(model).get("reference")


def recorded_settings(record: dict, given: dict) -> dict:
    """The settings of a run's record beneath what the user ``given``: all of them, or only the tokenisation
    and batch when the user names another loss (the recorded β and loss settings belong to the recorded loss)."""
    settings = dict(record.get("settings") or {"beta": record.get("beta"), "loss": record.get("loss")})
    settings = {k: v for k, v in settings.items() if v is not None}
    if "loss" in given and given["loss"] != settings.get("loss"):
        settings = {k: v for k, v in settings.items() if k in TOKENISATION}
    return settings


def beta_source(model: str, record: dict, given: dict, used: dict) -> str:
    if "beta" in given:
        return "given"
    return f"recorded in {Path(model) / RECORD}" if "beta" in used else "the loss's default"


def evaluate(model: str, data: str, ref_model: str | None = None, loss: str | None = None,
             beta: float | None = None, batch_size: int | None = None, **settings) -> dict[str, float]:
    """Mean metrics of ``model`` against ``ref_model`` on every row of ``data`` (SPEC §3, ``eval/`` names).

    On a dpolab ``final/`` folder the run's record supplies the reference, the loss, β and the loss's
    settings, the tokenisation and batch size, so the metrics are the run's own; what is passed here wins
    (naming another loss keeps only the recorded tokenisation and batch size). Without a record: the model
    is its own reference, ``loss`` sigmoid, β the loss's default, batch size 8. ``settings`` are further
    config fields (``max_length``, ``label_smoothing``, ...).
    """
    from dpolab.config import load_config
    from dpolab.data import load_records
    from dpolab.logps import SequenceLogps
    from dpolab.reference import ModelReference, NoReference
    from dpolab.setup import (build_objective_for, ignored_columns, load_model, load_tokenizer, make_accelerator,
                              prepare_records, tokenize_for)

    record = read_record(model)
    given = {k: v for k, v in dict(settings, loss=loss, beta=beta, batch_size=batch_size).items() if v is not None}
    used = recorded_settings(record, given)
    config = load_config(overrides={"batch_size": 8, **used, **given, "model": model, "data": data,
                                    "ref_model": ref_model})
    log.info("β = %g (%s), loss %s", config.beta, beta_source(model, record, given, used), config.loss)
    accelerator = make_accelerator(config)
    objective = build_objective_for(config, accelerator.gather)
    if "loss" in used:  # the run's own loss: its state too (BCO's running δ)
        objective.state.update(record.get("objective_state", {}))
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    examples = tokenize_for(config, prepare_records(config, load_records(data, config.skip_invalid,
                                                                                ignored_columns(config))), tokenizer)
    if objective.needs_ref and not config.reference_free:
        ref_name = ref_model or record.get("reference")
        if ref_name is None:
            log.warning("no --ref-model and no recorded reference: the model is its own reference (rewards 0)")
            ref_name = model
        ref = load_model(ref_name, config.trust_remote_code, config.allow_pickle_weights,
                         attn_implementation=config.attn_implementation)
        reference = ModelReference(ref.to(accelerator.device), chunk=config.logits_chunk,
                                   autocast=accelerator.autocast, ld_alpha=config.ld_alpha)
    else:
        reference = NoReference()
    policy = SequenceLogps(load_model(model, config.trust_remote_code, config.allow_pickle_weights,
                                      attn_implementation=config.attn_implementation),
                           chunk=config.logits_chunk, ld_alpha=config.ld_alpha, aligned=config.use_weighting)
    policy = accelerator.prepare(policy)
    return evaluate_examples(policy, reference, objective, examples, config.batch_size, accelerator,
                             tokenizer.pad_token_id, layout=config.layout, row_tokens=config.row_tokens)


@torch.no_grad()
def score(model: str, prompt, response, ref_model: str | None = None, beta: float | None = None,
          trust_remote_code: bool = False, layout: str = DEFAULT_LAYOUT,
          allow_pickle_weights: bool = False) -> dict[str, float]:
    """The implicit reward β·(log π(y|x) − log π_ref(y|x)) of ``response`` to ``prompt``, tokenised as in
    training (plain text, or message lists with the chat template). Returns the reward, β and both log-probs.
    On a dpolab ``final/`` folder the reference and β default to the run's (else β = 0.1). Weights load from
    safetensors only unless ``allow_pickle_weights``."""
    from dpolab.data import Record
    from dpolab.logps import SequenceLogps
    from dpolab.setup import load_model, load_tokenizer

    record = read_record(model)
    given = {"beta": beta} if beta is not None else {}
    beta = beta if beta is not None else record.get("beta") or 0.1
    log.info("β = %g (%s)", beta, beta_source(model, record, given, record))
    tokenizer = load_tokenizer(model, trust_remote_code)
    record_row = Record("score", "unpaired", prompt, [response], isinstance(prompt, list))
    example = Tokenizer(tokenizer, 1 << 30, 1 << 30)(record_row, 0)
    batch = make_batch([example], tokenizer.pad_token_id, layout)
    ref_name = ref_model or record.get("reference")
    if ref_name is None:
        raise DpolabError("score needs --ref-model (the reference the implicit reward is measured against)")
    logp = SequenceLogps(load_model(model, trust_remote_code, allow_pickle_weights))(**batch.model_inputs()).item()
    ref_logp = SequenceLogps(load_model(ref_name, trust_remote_code, allow_pickle_weights))(
        **batch.model_inputs()).item()
    return {"reward": beta * (logp - ref_logp), "beta": beta, "logp": logp, "ref_logp": ref_logp,
            "tokens": int(batch.lengths[0])}
