"""The modifiers end to end, through `dpolab eval` and a few training steps, against an independent
computation: per-token log-probs from a plain forward pass (tests/hand.py) and the formulas written out here.

Modifiers: several losses with weights (RPO), WPO weighting, LD-DPO, f-divergences, cDPO label smoothing,
TR-DPO reference updates (with save → resume), BCO's running δ; and reference-free training.
"""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import dpolab
from dpolab import cli
from dpolab.evaluation.metrics import read_metrics
from dpolab.training.step import step_examples
from tests.conftest import preference_rows, write_jsonl
from tests.hand import pair_aligned, pair_logps, uneven_rows

BETA = 0.5


def steps(out) -> list[dict]:
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def eval_cli(capsys, *argv) -> dict:
    assert cli.run(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------- dpolab eval


def ld(tokens: torch.Tensor, public: int, alpha: float) -> torch.Tensor:
    """LD-DPO by hand: the first ``public`` tokens count fully, the rest by α."""
    return tokens[:public].sum() + alpha * tokens[public:].sum()


def forward_kl(h):
    return 1 - torch.exp(-h)


def alpha_div(h, a=0.3):
    return (torch.exp((a - 1) * h) - 1) / (a - 1)


def hand_eval(case: str, policy, ref, aligned=None) -> dict[str, float]:
    """Mean loss, chosen reward and margin over all rows in one batch, from per-token log-probs (and WPO's
    aligned sums, :func:`tests.hand.pair_aligned`)."""
    pc, pr, rc, rr, nc, nr = [], [], [], [], [], []
    for (c, r), (c0, r0) in zip(policy, ref):
        nc.append(len(c)), nr.append(len(r))
        if case == "ld_alpha":
            public = min(len(c), len(r))
            c, r, c0, r0 = (ld(t, public, 0.3) for t in (c, r, c0, r0))
        pc.append(c.sum()), pr.append(r.sum()), rc.append(c0.sum()), rr.append(r0.sum())
    pc, pr, rc, rr = map(torch.stack, (pc, pr, rc, rr))
    nc, nr = torch.tensor(nc, dtype=torch.float64), torch.tensor(nr, dtype=torch.float64)
    h_c, h_r = pc - rc, pr - rr
    f = {"forward_kl": forward_kl, "alpha_divergence": alpha_div}.get(case, lambda h: h)
    z = BETA * (f(h_c) - f(h_r))
    losses = -F.logsigmoid(z)
    if case == "label_smoothing":  # cDPO, ε = 0.2
        losses = -0.8 * F.logsigmoid(z) - 0.2 * F.logsigmoid(-z)
    if case == "use_weighting":  # WPO (eq. 2): exp of the aligned mean log-prob of both answers
        a_c, a_r = aligned
        losses = losses * torch.exp(a_c / nc) * torch.exp(a_r / nr)
    if case == "loss_weights":  # RPO: sigmoid + 0.5 · (NLL per chosen token over the batch)
        losses = losses + 0.5 * (-pc.sum() / nc.sum())
    return {"eval/loss": losses.mean().item(), "eval/rewards/chosen": (BETA * h_c).mean().item(),
            "eval/rewards/margins": (BETA * (h_c - h_r)).mean().item()}


EVAL_CASES = {
    "loss_weights": ["--loss", "sigmoid,sft", "--loss-weights", "1,0.5"],
    "use_weighting": ["--use-weighting"],
    "ld_alpha": ["--ld-alpha", "0.3"],
    "forward_kl": ["--f-divergence-type", "forward_kl"],
    "alpha_divergence": ["--f-divergence-type", "alpha_divergence", "--f-alpha-divergence-coef", "0.3"],
    "label_smoothing": ["--label-smoothing", "0.2"],
}


@pytest.fixture(scope="module")
def uneven(tmp_path_factory, tiny_model, other_model):
    rows = uneven_rows(12, seed=4)
    data = write_jsonl(tmp_path_factory.mktemp("uneven") / "d.jsonl", rows)
    return data, rows, pair_logps(tiny_model, rows), pair_logps(other_model, rows), pair_aligned(tiny_model, rows)


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_with_a_modifier_matches_the_hand_computation(case, uneven, tiny_model, other_model, capsys):
    data, rows, policy, ref, aligned = uneven
    argv = ["--model", tiny_model, "--ref-model", other_model, "--data", data, "--beta", BETA,
            "--batch-size", len(rows), *EVAL_CASES[case]]
    if "--loss" not in argv:
        argv += ["--loss", "sigmoid"]
    got = eval_cli(capsys, *argv)
    expected = hand_eval(case, policy, ref, aligned)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    # the modifier changed the numbers: the plain DPO value is not what came out
    assert abs(hand_eval("none", policy, ref)["eval/loss"] - expected["eval/loss"]) > 1e-3 or case == "ld_alpha"
    if case == "ld_alpha":
        assert abs(hand_eval("none", policy, ref)["eval/rewards/chosen"] - expected["eval/rewards/chosen"]) > 1e-3


def test_python_evaluate_takes_ld_alpha(uneven, tiny_model, other_model):
    """``dpolab.evaluate(..., ld_alpha=x)``: the Python API with the same numbers as the hand computation."""
    data, rows, policy, ref, _ = uneven
    got = dpolab.evaluate(str(tiny_model), str(data), ref_model=str(other_model), beta=BETA, batch_size=5,
                          ld_alpha=0.3)
    assert got["eval/loss"] == pytest.approx(hand_eval("ld_alpha", policy, ref)["eval/loss"], abs=1e-5)


# ------------------------------------------------------------------------------------- training steps

TRAIN = dict(batch_size=8, learning_rate=1e-2, eval_split=0.0, progress=False, warmup_ratio=0.0,
             lr_scheduler="constant", seed=42)


def test_first_step_of_rpo_with_wpo_weights_matches_the_hand_computation(tiny_model, prefs, tmp_path):
    """At step 1 policy = reference, so sigmoid = ln 2 per pair, and the RPO term is the batch's NLL per chosen
    token; WPO multiplies each pair's sum by exp(ā_c)·exp(ā_r), ā the aligned mean log-prob (eq. 2)."""
    rows = preference_rows(64)
    out = tmp_path / "rpo"
    dpolab.train(model=str(tiny_model), data=str(prefs), output_dir=str(out), max_steps=1, save_every=0,
                 loss="sigmoid,sft", loss_weights=[1.0, 0.5], use_weighting=True, **TRAIN)
    batch = [rows[i] for i in step_examples(len(rows), 0, 8, 42)]
    logps = pair_logps(tiny_model, batch)
    pc = torch.stack([c.sum() for c, _ in logps])
    pr = torch.stack([r.sum() for _, r in logps])
    nc = torch.tensor([len(c) for c, _ in logps], dtype=torch.float64)
    nr = torch.tensor([len(r) for _, r in logps], dtype=torch.float64)
    sft_rows = -pc * len(batch) / nc.sum()  # rows whose mean is the NLL per chosen token
    a_c, a_r = pair_aligned(tiny_model, batch)
    expected = ((math.log(2) + 0.5 * sft_rows) * torch.exp(a_c / nc) * torch.exp(a_r / nr)).mean().item()
    assert steps(out)[0]["loss"] == pytest.approx(expected, abs=1e-5)


def test_tr_dpo_moves_the_reference_and_resumes_bit_identically(tiny_model, prefs, tmp_path):
    """TR-DPO with τ = 1, α = 0.5: after step k the reference is α·π_k + (1 − α)·ref_{k−1}, checked against
    the checkpointed policy weights; then a run resumed from step 1 ends with bit-identical policy weights,
    step-2 reference and final metrics (which are measured against the moved reference)."""
    a = 0.5
    full = tmp_path / "full"
    cfg = dict(model=str(tiny_model), data=str(prefs), max_steps=3, save_every=1, save_total_limit=5,
               sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=a, **{**TRAIN, "eval_split": 0.125})
    summary = dpolab.train(output_dir=str(full), **cfg)
    p0 = load_file(str(Path(tiny_model) / "model.safetensors"))
    ref_prev = p0
    for k in (1, 2):
        ckpt = full / "checkpoints" / f"step-{k}"
        policy, ref = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "reference.safetensors"))
        for name in p0:
            expected = (1 - a) * ref_prev[name] + a * policy[name]
            torch.testing.assert_close(ref[name], expected, atol=1e-7, rtol=1e-6)
        assert max((ref[n] - p0[n]).abs().max().item() for n in p0) > 1e-4  # it really moved
        ref_prev = ref
    # The same run, crashed after step 1: its later checkpoint and final/ are gone; resume.
    crashed = tmp_path / "crashed"
    shutil.copytree(full, crashed)
    for gone in ("checkpoints/step-2", "final", "summary.json"):
        shutil.rmtree(crashed / gone) if (crashed / gone).is_dir() else (crashed / gone).unlink()
    resumed = dpolab.train(output_dir=str(crashed), resume=True, **cfg)
    for sub in ("final/model.safetensors", "checkpoints/step-2/reference.safetensors",
                "checkpoints/step-2/model.safetensors"):
        want, got = load_file(str(full / sub)), load_file(str(crashed / sub))
        assert all(torch.equal(want[n], got[n]) for n in want), sub
    assert resumed["eval"] == summary["eval"]
    assert summary["eval"]["eval/rewards/margins"] != 0.0


def test_bco_running_delta_is_the_mean_of_every_reward_seen(tiny_model, prefs, tmp_path):
    """bco_pair with the paper's δ: step 1 sees rewards 0 (policy = reference), so after it δ = 0 over 16
    rewards; step 2's loss uses δ = (Σ step-1 rewards + Σ step-2 rewards)/32, rewards β·h of the step-1
    policy on step 2's batch, by hand."""
    beta = 1.0
    out = tmp_path / "bco"
    dpolab.train(model=str(tiny_model), data=str(prefs), output_dir=str(out), max_steps=2, save_every=1,
                 loss="bco_pair", bco_running_delta=True, beta=beta, **TRAIN)
    state = json.loads((out / "checkpoints" / "step-1" / "state.json").read_text())["extra"]["objective"]
    assert state["delta_count"] == 16 and state["delta_mean"] == pytest.approx(0.0, abs=1e-7)
    rows = preference_rows(64)
    batch = [rows[i] for i in step_examples(len(rows), 1, 8, 42)]
    policy = pair_logps(tiny_model, batch, weights=out / "checkpoints" / "step-1" / "model.safetensors")
    ref = pair_logps(tiny_model, batch)
    r_c = torch.stack([beta * (c.sum() - c0.sum()) for (c, _), (c0, _) in zip(policy, ref)])
    r_r = torch.stack([beta * (r.sum() - r0.sum()) for (_, r), (_, r0) in zip(policy, ref)])
    delta = (r_c.sum() + r_r.sum()) / 32

    def loss(d):
        return (-F.logsigmoid(r_c - d) - F.logsigmoid(-(r_r - d))).mean().item()

    got = steps(out)[1]["loss"]
    assert got == pytest.approx(loss(delta), abs=1e-5)
    assert abs(loss(delta) - loss(0.0)) > 1e-4  # δ = 0 would be told apart


# ------------------------------------------------------------------------------------- reference-free


@pytest.mark.parametrize("loss,extra", [("sigmoid", {"reference_free": True}), ("simpo", {})])
def test_reference_free_training_builds_no_reference(loss, extra, tiny_model, prefs, tmp_path, monkeypatch):
    """One model is loaded (the policy), none is copied, both reference strategies are NoReference, and the
    first loss is the formula with ref = 0: −logσ(β(π_c − π_r)) (reference-free DPO) or
    −logσ(β(π_c/n_c − π_r/n_r) − γ) (SimPO, β = 2, γ = 1)."""
    from transformers import AutoModelForCausalLM

    import dpolab.builder as setup
    from dpolab.models.reference import NoReference

    rows = preference_rows(64)
    batch = [rows[i] for i in step_examples(len(rows), 0, 8, 42)]
    logps = pair_logps(tiny_model, batch)  # loaded before counting
    loads, copies, refs = [], [], []
    original_load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (loads.append(a[0]), original_load(*a, **k))[1])
    monkeypatch.setattr(setup, "copy", types.SimpleNamespace(deepcopy=lambda m: copies.append(m) or m))
    original_build = setup.build_reference
    monkeypatch.setattr(setup, "build_reference", lambda *a, **k: refs.append(original_build(*a, **k)) or refs[-1])
    dpolab.train(model=str(tiny_model), data=str(prefs), output_dir=str(tmp_path / loss), max_steps=1,
                 save_every=0, loss=loss, **TRAIN, **extra)
    assert len(loads) == 1 and not copies
    assert all(isinstance(r, NoReference) for r in refs[0])
    pc = torch.stack([c.sum() for c, _ in logps])
    pr = torch.stack([r.sum() for _, r in logps])
    if loss == "simpo":
        nc = torch.tensor([len(c) for c, _ in logps], dtype=torch.float64)
        nr = torch.tensor([len(r) for _, r in logps], dtype=torch.float64)
        expected = -F.logsigmoid(2.0 * (pc / nc - pr / nr) - 1.0)
    else:
        expected = -F.logsigmoid(0.1 * (pc - pr))
    assert steps(tmp_path / loss)[0]["loss"] == pytest.approx(expected.mean().item(), abs=1e-5)


def test_reference_free_with_a_reference_model_is_refused(tiny_model, other_model, prefs, tmp_path, capsys):
    for command in (["train", "--output-dir", tmp_path / "x"], ["eval"]):
        code = cli.main([*map(str, command), "--model", str(tiny_model), "--data", str(prefs), "--reference-free",
                         "--ref-model", str(other_model)])
        assert code == 2
        assert "--ref-model was given but reference_free uses no reference model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
