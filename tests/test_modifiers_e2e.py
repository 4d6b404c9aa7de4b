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
from dpolab.metrics import read_metrics
from dpolab.training import step_examples
from tests.conftest import preference_rows, write_jsonl
from tests.hand import pair_logps, uneven_rows

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


def hand_eval(case: str, policy, ref) -> dict[str, float]:
    """Mean loss, chosen reward and margin over all rows in one batch, from per-token log-probs."""
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
    if case == "use_weighting":  # WPO's plain weight: geometric-mean token probability of both answers
        losses = losses * torch.exp(pc / nc) * torch.exp(pr / nr)
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
    return data, rows, pair_logps(tiny_model, rows), pair_logps(other_model, rows)


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_eval_with_a_modifier_matches_the_hand_computation(case, uneven, tiny_model, other_model, capsys):
    data, rows, policy, ref = uneven
    argv = ["--model", tiny_model, "--ref-model", other_model, "--data", data, "--beta", BETA,
            "--batch-size", len(rows), *EVAL_CASES[case]]
    if "--loss" not in argv:
        argv += ["--loss", "sigmoid"]
    got = eval_cli(capsys, *argv)
    expected = hand_eval(case, policy, ref)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    # the modifier changed the numbers: the plain DPO value is not what came out
    assert abs(hand_eval("none", policy, ref)["eval/loss"] - expected["eval/loss"]) > 1e-3 or case == "ld_alpha"
    if case == "ld_alpha":
        assert abs(hand_eval("none", policy, ref)["eval/rewards/chosen"] - expected["eval/rewards/chosen"]) > 1e-3


def test_python_evaluate_takes_ld_alpha(uneven, tiny_model, other_model):
    """``dpolab.evaluate(..., ld_alpha=x)``: the Python API with the same numbers as the hand computation."""
    data, rows, policy, ref = uneven
    got = dpolab.evaluate(str(tiny_model), str(data), ref_model=str(other_model), beta=BETA, batch_size=5,
                          ld_alpha=0.3)
    assert got["eval/loss"] == pytest.approx(hand_eval("ld_alpha", policy, ref)["eval/loss"], abs=1e-5)
