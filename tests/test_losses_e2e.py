"""Every registered loss end to end: a few steps through the command line on the tiny model (the first
step pinned to SPEC's policy = reference value where it has one), reachable from `dpolab eval`, and
`dpolab eval` agreeing with TRL 1.16's own loss code on the losses the two share."""

import functools
import json
import math
import random
import types
from pathlib import Path

import pytest
import torch

import dpolab
from dpolab import cli
from dpolab.evaluation.metrics import read_metrics
from dpolab.losses import LOSSES
from tests.conftest import preference_rows, write_jsonl

# SPEC §2: the loss at policy = reference, β = 0.1 (defaults for the other parameters).
AT_REFERENCE = {"sigmoid": math.log(2), "robust": math.log(2), "sigmoid_norm": math.log(2), "aot": math.log(2),
                "aot_unpaired": math.log(2), "hinge": 1.0, "ipo": 25.0, "nca_pair": 2 * math.log(2),
                "bco_pair": 2 * math.log(2), "sppo_hard": 50.0, "apo_zero": 1.0, "apo_down": 1.0,
                "discopop": 0.8466, "exo_pair": 2.7612, "rdpo": None, "odpo": None, "rebel": None, "dpop": math.log(2),
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


@pytest.mark.parametrize("name", sorted(n for n in LOSSES if "margin" in LOSSES[n].columns))
def test_losses_reading_the_score_gap_refuse_data_without_scores(name, tiny_model, datasets, tmp_path, capsys):
    """odpo and rebel read the score gap (margin, or score_chosen − score_rejected): rows without one are
    refused before training, naming the row, the loss and the columns it needs."""
    code = cli.main(["train", "--model", str(tiny_model), "--data", str(datasets["paired"]), "--loss", name,
                     "--output-dir", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"line 1: loss {name} needs a 'margin' (or score_chosen and score_rejected) column" in err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_kto_on_pairs_needs_unpair_and_then_trains(tiny_model, datasets, tmp_path):
    base = dict(model=str(tiny_model), data=str(datasets["paired"]), loss="kto", max_steps=2, batch_size=4,
                eval_split=0, save_every=0, progress=False)
    with pytest.raises(dpolab.ConfigError, match="--unpair"):
        dpolab.train(**base, output_dir=str(tmp_path / "a"))
    s = dpolab.train(**base, unpair=True, output_dir=str(tmp_path / "b"))
    assert "kl" in s["train"] and s["train"]["kl"] >= 0


EVAL_CASES = [(name, False) for name in sorted(LOSSES)] + [("sigmoid", True), ("ipo", True)]


@pytest.mark.parametrize("name,reference_free", EVAL_CASES, ids=[n + ("-ref-free" if f else "") for n, f in EVAL_CASES])
def test_every_loss_is_reachable_from_dpolab_eval(name, reference_free, tiny_model, other_model, datasets, capsys):
    """`dpolab eval --loss NAME` for every loss (paired, ranked, reference-free, and unpaired losses on pairs
    through --unpair), equal to the Python API; a reference loss also runs --reference-free."""
    loss = LOSSES[name]
    data = datasets["paired"] if loss.data == "unpaired" else data_for(name, datasets)
    settings = {"unpair": True} if loss.data == "unpaired" else {}
    if reference_free:
        settings["reference_free"] = True
    ref = str(other_model) if loss.needs_ref and not reference_free else None
    argv = ["eval", "--model", str(tiny_model), "--data", str(data), "--loss", name, "--batch-size", "8", "--json"]
    argv += ["--ref-model", ref] if ref else []
    argv += [f"--{k.replace('_', '-')}" for k in settings]
    assert cli.run(argv) == 0
    from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    api = dpolab.evaluate(str(tiny_model), str(data), ref_model=ref, loss=name, batch_size=8, **settings)
    assert from_cli == pytest.approx(api, abs=1e-9) and math.isfinite(api["eval/loss"])
    assert {"eval/loss", "eval/rewards/chosen"} | ({"eval/kl"} if loss.needs_kl else set()) <= set(api)
    if reference_free:  # the rewards are β·π: the reference model is not used
        plain = dpolab.evaluate(str(tiny_model), str(data), ref_model=str(other_model), loss=name, batch_size=8)
        assert api["eval/rewards/chosen"] == pytest.approx(0.1 * api["eval/logps/chosen"], abs=1e-6)
        assert abs(plain["eval/loss"] - api["eval/loss"]) > 1e-4


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


# ------------------------------------------------------------------ the other trainers of TRL 1.16


def hand_examples(model_dir, rows, key_pairs=("chosen", "rejected")):
    """Plain-text tokenisation by hand (SPEC §4): prompt with special tokens, completion without, then EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        out.append((p, [tok(r[k], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for k in key_pairs]))
    return out


def token_logps_of(model, prompt_ids, completion_ids) -> torch.Tensor:
    with torch.no_grad():
        lp = model(torch.tensor([prompt_ids + completion_ids])).logits[0].double().log_softmax(-1)
    return torch.stack([lp[len(prompt_ids) - 1 + j, t] for j, t in enumerate(completion_ids)])


def trl_pair_batch(examples, pad_id):
    """TRL's CPO/ORPO batch: chosen_/rejected_ input_ids, attention_mask, labels (−100 on prompt and padding)."""
    batch = {}
    for k, side in enumerate(("chosen", "rejected")):
        seqs = [p + c[k] for p, c in examples]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), pad_id)
        attn = torch.zeros(len(seqs), T, dtype=torch.long)
        labels = torch.full((len(seqs), T), -100)
        for i, ((p, c), seq) in enumerate(zip(examples, seqs)):
            ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
            labels[i, len(p): len(seq)] = torch.tensor(c[k])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": attn, f"{side}_labels": labels})
    return batch


# dpolab name, TRL CPOTrainer attributes for dpolab's defaults (see test_losses_trl.CPO_CASES)
CPO_FAMILY = [
    ("cpo", dict(loss_type="sigmoid", cpo_alpha=1.0, label_smoothing=0.0, alpha=0.0, simpo_gamma=0.5, beta=0.1)),
    ("simpo", dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.0, alpha=0.0, simpo_gamma=1.0, beta=2.0)),
    ("alphapo", dict(loss_type="simpo", cpo_alpha=0.0, label_smoothing=0.0, alpha=0.25, simpo_gamma=1.0, beta=2.0)),
]


@pytest.mark.parametrize("name,trl_attrs", CPO_FAMILY, ids=[c[0] for c in CPO_FAMILY])
def test_dpolab_eval_agrees_with_trl_cpo_trainer(name, trl_attrs, tiny_model, datasets):
    """CPO, SimPO and AlphaPO: `dpolab eval` (defaults) against TRL 1.16's CPOTrainer loss code running the same
    tiny model on the same rows in one batch (CPO's NLL is a mean over the batch's chosen tokens)."""
    from transformers import AutoModelForCausalLM

    from tests.test_losses_trl import trl_experimental_loss_and_metrics

    rows = [json.loads(line) for line in Path(datasets["paired"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    batch = trl_pair_batch(hand_examples(tiny_model, rows), pad_id=0)
    with torch.no_grad():
        trl_loss, _ = trl_experimental_loss_and_metrics("cpo", batch, model, **trl_attrs)
    ours = dpolab.evaluate(str(tiny_model), str(datasets["paired"]), loss=name, batch_size=len(rows))
    assert ours["eval/loss"] == pytest.approx(trl_loss.item(), abs=1e-5)


def test_dpolab_eval_agrees_with_trl_orpo_trainer_up_to_its_prompt_nll(tiny_model, datasets):
    """ORPO: TRL 1.16's ORPOTrainer adds the prompt tokens to the NLL (documented deviation); with TRL's NLL
    swapped for the completion-token NLL computed by hand, the two agree."""
    from transformers import AutoModelForCausalLM

    from tests.test_losses_trl import trl_experimental_loss_and_metrics

    rows = [json.loads(line) for line in Path(datasets["paired"]).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    examples = hand_examples(tiny_model, rows)
    with torch.no_grad():
        trl_loss, metrics = trl_experimental_loss_and_metrics("orpo", trl_pair_batch(examples, 0), model, beta=0.1)
    chosen = [token_logps_of(model, p, c[0]) for p, c in examples]
    our_nll = -sum(x.sum() for x in chosen) / sum(len(x) for x in chosen)
    ours = dpolab.evaluate(str(tiny_model), str(datasets["paired"]), loss="orpo", batch_size=len(rows))
    expected = trl_loss.item() - float(metrics["nll_loss"]) + our_nll.item()
    assert ours["eval/loss"] == pytest.approx(expected, abs=1e-5)
    assert abs(float(metrics["nll_loss"]) - our_nll.item()) > 1e-3  # the deviation is real here


def test_dpolab_eval_agrees_with_trl_kto_trainer(tiny_model, other_model, datasets):
    """KTO on unpaired rows: TRL 1.16's KTOTrainer loss code fed per-token log-probs from independent forward
    passes of the policy and the reference on the rows and on dpolab's mismatched (prompt, completion) KL pairs,
    in one batch (the KL estimate is a batch mean); loss and the kl metric agree."""
    from transformers import AutoModelForCausalLM

    from dpolab.data.records import Example
    from dpolab.data.tokenization import add_mismatched_completions
    from tests.test_losses_trl import _Model, _stub, trl_kto

    rows = [json.loads(line) for line in Path(datasets["unpaired"]).read_text().splitlines()]
    hand = hand_examples(tiny_model, rows, key_pairs=("completion",))
    examples = add_mismatched_completions([Example(i, p, c, bool(r["label"])) for i, ((p, c), r) in
                                           enumerate(zip(hand, rows))], seed=42, max_length=512)
    n = len(examples)
    sums, tokens = {}, {}
    for which, path in (("policy", tiny_model), ("ref", other_model)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for k in (0, 1):  # the row's completion, the KL pair's
            lps = [token_logps_of(model, ex.prompt_ids, ex.completion_ids[k]) for ex in examples]
            T = max(map(len, lps)) + 1
            padded = torch.zeros(n, T - 1, dtype=torch.float64)
            for i, x in enumerate(lps):
                padded[i, : len(x)] = x
            tokens[which, k], sums[which, k] = padded, padded.sum(-1)
    mask = lambda x: (torch.arange(x.shape[1] + 1)[None] >= 1).long().expand(n, -1)  # noqa: E731
    kl_ids = torch.ones(n, tokens["policy", 1].shape[1] + 1, dtype=torch.long)
    inputs = dict(input_ids=torch.ones(n, tokens["policy", 0].shape[1] + 1, dtype=torch.long),
                  attention_mask=mask(tokens["policy", 0]), completion_mask=mask(tokens["policy", 0]),
                  KL_input_ids=kl_ids, KL_attention_mask=mask(tokens["policy", 1]),
                  KL_completion_mask=mask(tokens["policy", 1]),
                  label=torch.tensor([ex.label for ex in examples]), ref_logps=sums["ref", 0],
                  ref_KL_logps=sums["ref", 1])
    stub = _stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.1, desirable_weight=1.0,
                 undesirable_weight=1.0)
    stub._compute_kl_logps = types.MethodType(trl_kto.KTOTrainer._compute_kl_logps, stub)
    policy = _Model(tokens["policy", 0], by_input={id(kl_ids): tokens["policy", 1]})
    trl_loss = trl_kto.KTOTrainer._compute_loss(stub, policy, inputs, return_outputs=False)
    ours = dpolab.evaluate(str(tiny_model), str(datasets["unpaired"]), ref_model=str(other_model), loss="kto",
                           batch_size=n)
    assert ours["eval/loss"] == pytest.approx(trl_loss.item(), abs=1e-5)
    assert ours["eval/kl"] == pytest.approx(float(stub._metrics["train"]["kl"][-1]), abs=1e-5)
