"""Held-out evaluation: the SPEC §3 metrics over a dataset (``dpolab eval``), and the implicit reward of one
answer (``dpolab score``), both measured with a run's own objective when the model is its ``final/``."""

from __future__ import annotations

import logging

import torch

from dpolab import builder
from dpolab.commands import load_config
from dpolab.data.batch import DEFAULT_LAYOUT, make_batch
from dpolab.data.reading import load_records
from dpolab.data.records import Record
from dpolab.data.tokenization import Tokenizer
from dpolab.errors import DpolabError
from dpolab.evaluation.metrics import evaluate_examples
from dpolab.models.loading import load_model, load_tokenizer
from dpolab.models.logps import SequenceLogps
from dpolab.models.record import beta_source, read_record, recorded_settings
from dpolab.models.reference import NONE, ModelReference, NoReference

log = logging.getLogger("dpolab")


def evaluate(model: str, data: str, ref_model: str | None = None, loss: str | None = None,
             beta: float | None = None, batch_size: int | None = None, **settings) -> dict[str, float]:
    """Mean metrics of ``model`` against ``ref_model`` on every row of ``data`` (SPEC §3, ``eval/`` names).

    On a dpolab ``final/`` folder the run's record supplies the reference, the loss, β and the loss's
    settings, the tokenisation and batch size, so the metrics are the run's own; what is passed here wins
    (naming another loss keeps only the recorded tokenisation and batch size). Without a record: the model
    is its own reference, ``loss`` sigmoid, β the loss's default, batch size 8. ``settings`` are further
    settings of ``dpolab eval`` (``max_length``, ``label_smoothing``, ...); any other is refused.
    """
    record = read_record(model)
    given = {k: v for k, v in dict(settings, loss=loss, beta=beta, batch_size=batch_size).items() if v is not None}
    used = recorded_settings(record, given)
    config = load_config(overrides={**used, **given, "model": model, "data": data, "ref_model": ref_model},
                         command="eval")
    log.info("β = %g (%s), loss %s", config.beta, beta_source(model, given, used), config.loss)
    accelerator = builder.make_accelerator(config)
    objective = builder.objective_for(config, accelerator.gather)
    if "loss" in used:  # the run's own loss: its state too (BCO's running δ)
        objective.state.update(record.get("objective_state", {}))
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    rows = builder.prepare_records(config, objective, load_records(data, config.skip_invalid,
                                                                    builder.ignored_columns(config)))
    examples = builder.tokenize_for(config, objective, rows, tokenizer)
    reference = NoReference()
    if builder.reference_kind(config, objective) != NONE:  # a model of its own: given, recorded, or itself
        ref_name = ref_model or record.get("reference")
        if ref_name is None:
            log.warning("no --ref-model and no recorded reference: the model is its own reference (rewards 0)")
            ref_name = model
        ref = load_model(ref_name, config.trust_remote_code, config.allow_pickle_weights,
                         attn_implementation=config.attn_implementation)
        reference = ModelReference(ref.to(accelerator.device), chunk=config.logits_chunk,
                                   autocast=accelerator.autocast, ld_alpha=config.ld_alpha)
    policy = SequenceLogps(load_model(model, config.trust_remote_code, config.allow_pickle_weights,
                                      attn_implementation=config.attn_implementation),
                           chunk=config.logits_chunk, ld_alpha=config.ld_alpha, aligned=config.use_weighting)
    policy = accelerator.prepare(policy)
    return evaluate_examples(policy, reference, objective, examples, config.batch_size, accelerator,
                             builder.collate_for(config, tokenizer), progress=config.progress)


@torch.no_grad()
def score(model: str, prompt, response, ref_model: str | None = None, beta: float | None = None,
          trust_remote_code: bool = False, layout: str = DEFAULT_LAYOUT,
          allow_pickle_weights: bool = False) -> dict[str, float]:
    """The implicit reward β·(log π(y|x) − log π_ref(y|x)) of ``response`` to ``prompt``, tokenised as in
    training (plain text, or message lists with the chat template). Returns the reward, β and both log-probs.
    On a dpolab ``final/`` folder the reference and β default to the run's (else β = 0.1). Weights load from
    safetensors only unless ``allow_pickle_weights``."""
    record = read_record(model)
    given = {"beta": beta} if beta is not None else {}
    beta = beta if beta is not None else record.get("beta") or 0.1
    log.info("β = %g (%s)", beta, beta_source(model, given, record))
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
