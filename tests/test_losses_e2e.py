"""Every registered loss end to end: a few steps through the command line on the tiny model (the first
step pinned to SPEC's policy = reference value where it has one), reachable from `dpolab eval`, and
`dpolab eval` agreeing with TRL 1.16's own loss code on the losses the two share."""

import functools
import json
import math
import random
from pathlib import Path

import pytest
import torch

import dpolab
from dpolab import cli
from dpolab.losses import LOSSES
from dpolab.metrics import read_metrics
from tests.conftest import preference_rows, write_jsonl

# SPEC §2: the loss at policy = reference, β = 0.1 (defaults for the other parameters).
AT_REFERENCE = {"sigmoid": math.log(2), "robust": math.log(2), "sigmoid_norm": math.log(2), "aot": math.log(2),
                "aot_unpaired": math.log(2), "hinge": 1.0, "ipo": 25.0, "nca_pair": 2 * math.log(2),
                "bco_pair": 2 * math.log(2), "sppo_hard": 50.0, "apo_zero": 1.0, "apo_down": 1.0,
                "discopop": 0.8466, "exo_pair": 2.7612, "rdpo": None, "odpo": None, "dpop": math.log(2),
                "cal_dpo": math.log(2) + 2 * 25.0, "plackett_luce": math.log(6),  # K = 3: −log(1/3) − log(1/2)
                "kto": 0.5, "bco": math.log(2)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loss-data")
    rows = preference_rows(16, seed=5)
    rng = random.Random(0)
    paired = write_jsonl(root / "paired.jsonl", rows)
    scored = write_jsonl(root / "scored.jsonl", [dict(r, score_chosen=rng.uniform(1, 3), score_rejected=0.0)
                                                   for r in rows])
    ranked = write_jsonl(root / "ranked.jsonl", [{"prompt": r["prompt"], "completions": [
        r["chosen"], r["rejected"], r["rejected"] + " indeed"]} for r in rows])
    unpaired = write_jsonl(root / "unpaired.jsonl", [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                                                     for r in rows for k in ("chosen", "rejected")])
    return {"paired": paired, "scored": scored, "ranked": ranked, "unpaired": unpaired}


def data_for(name, datasets):
    loss = LOSSES[name]
    if loss.data != "paired":
        return datasets[loss.data]
    return datasets["scored"] if "margin" in loss.columns else datasets["paired"]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_trains_through_the_command_line(name, tiny_model, datasets, tmp_path):
    out = tmp_path / name
    code = cli.main(["train", "--model", str(tiny_model), "--data", str(data_for(name, datasets)), "--loss", name,
                     "--output-dir", str(out), "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-3",
                     "--eval-split", "0", "--save-every", "0", "--no-progress", "--beta", "0.1"])
    assert code == 0
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in steps)
    if LOSSES[name].needs_ref and AT_REFERENCE.get(name) is not None:
        assert steps[0]["loss"] == pytest.approx(AT_REFERENCE[name], abs=1e-3)
        assert steps[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] != steps[0]["loss"]  # the weights moved the loss
    assert (out / "final" / "model.safetensors").exists()


def test_kto_on_pairs_needs_unpair_and_then_trains(tiny_model, datasets, tmp_path):
    base = dict(model=str(tiny_model), data=str(datasets["paired"]), loss="kto", max_steps=2, batch_size=4,
                eval_split=0, save_every=0, progress=False)
    with pytest.raises(dpolab.ConfigError, match="--unpair"):
        dpolab.train(**base, output_dir=str(tmp_path / "a"))
    s = dpolab.train(**base, unpair=True, output_dir=str(tmp_path / "b"))
    assert "kl" in s["train"] and s["train"]["kl"] >= 0


@pytest.mark.parametrize("name", sorted(n for n in LOSSES if LOSSES[n].data == "paired"))
def test_every_paired_loss_is_reachable_from_eval(name, tiny_model, other_model, datasets):
    ref = str(other_model) if LOSSES[name].needs_ref else None  # a reference-free loss refuses one
    m = dpolab.evaluate(str(tiny_model), str(data_for(name, datasets)), ref_model=ref, loss=name, batch_size=16)
    assert math.isfinite(m["eval/loss"]) and set(m) >= {"eval/rewards/margins", "eval/rewards/accuracies"}


# ------------------------------------------------------------------ dpolab eval vs TRL 1.16

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
TRL_SHARED = sorted(n for n in LOSSES if LOSSES[n].trl_name and LOSSES[n].trl_name.startswith("DPOTrainer"))


@functools.lru_cache(maxsize=4)
def per_token_logps(model_dir, data):
    """Independent: per-token completion log-probs from a full forward, laid out as TRL's batch
    (rows [chosen; rejected], completion tokens from column 1 on)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = []
    for key in ("chosen", "rejected"):
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            c = tok(r[key], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                lp = model(torch.tensor([p + c])).logits[0].double().log_softmax(-1)
            seqs.append(torch.stack([lp[len(p) - 1 + j, t] for j, t in enumerate(c)]))
    T = max(len(s) for s in seqs) + 1
    token_logps = torch.zeros(len(seqs), T - 1, dtype=torch.float64)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        token_logps[i, : len(s)] = s
        mask[i, 1: len(s) + 1] = 1
    return token_logps, mask


@pytest.mark.parametrize("name", TRL_SHARED)
def test_dpolab_eval_agrees_with_trl(name, tiny_model, other_model, datasets):
    from tests.test_losses_trl import _Model, _stub

    policy, mask = per_token_logps(tiny_model, datasets["paired"])
    ref, _ = per_token_logps(other_model, datasets["paired"])
    B = policy.shape[0] // 2
    ref_sums = ref.sum(-1)
    params = {p: LOSSES[name].param_defaults[p] for p in LOSSES[name].params}
    trl_params = {"label_smoothing": params.get("label_smoothing", params.get("exo_epsilon", 0.0))}
    stub = _stub(beta=0.1, loss_types=[name], loss_weights=[1.0], f_divergence_type="reverse_kl",
                 f_alpha_divergence_coef=0.5, use_weighting=False, ld_alpha=None, precompute_ref_logps=True,
                 args=type("A", (), {"discopop_tau": params.get("discopop_tau", 0.05)})(), **trl_params)
    inputs = dict(input_ids=torch.ones_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                  ref_chosen_logps=ref_sums[:B], ref_rejected_logps=ref_sums[B:])
    trl_loss = trl_dpo.DPOTrainer._compute_loss(stub, _Model(policy), inputs, return_outputs=False).item()
    ref_model = str(other_model) if LOSSES[name].needs_ref else None
    ours = dpolab.evaluate(str(tiny_model), str(datasets["paired"]), ref_model=ref_model, loss=name,
                           batch_size=B)  # one batch: batch-coupled losses see what TRL sees
    assert ours["eval/loss"] == pytest.approx(trl_loss, abs=1e-5)
