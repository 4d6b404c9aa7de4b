"""`dpolab eval --json`, the Python API and an independent computation of SPEC §1–3 agree; `dpolab score`."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import dpolab
from tests.conftest import preference_rows, write_jsonl


def independent_metrics(model_dir, ref_dir, rows, beta):
    """SPEC §1–3 by hand: plain-text tokenisation, full forward per sequence, then the formulas."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)

    def logp(model, prompt, completion):
        p = tok(prompt)["input_ids"]
        c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = model(ids).logits[0].float().log_softmax(-1)
        return sum(lp[len(p) - 1 + j, t].item() for j, t in enumerate(c))

    acc = {k: 0.0 for k in ("loss", "rc", "rr", "acc", "lc", "lr", "refc", "refr", "nc", "nr")}
    for r in rows:
        pc, pr = logp(policy, r["prompt"], r["chosen"]), logp(policy, r["prompt"], r["rejected"])
        rc, rr = logp(ref, r["prompt"], r["chosen"]), logp(ref, r["prompt"], r["rejected"])
        rew_c, rew_r = beta * (pc - rc), beta * (pr - rr)
        acc["loss"] += -F.logsigmoid(torch.tensor(rew_c - rew_r, dtype=torch.float64)).item()
        acc["rc"] += rew_c
        acc["rr"] += rew_r
        acc["acc"] += float(rew_c > rew_r)
        acc["lc"] += pc
        acc["lr"] += pr
        acc["refc"] += rc
        acc["refr"] += rr
        acc["nc"] += len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
        acc["nr"] += len(tok(r["rejected"], add_special_tokens=False)["input_ids"]) + 1
    n = len(rows)
    return {"eval/loss": acc["loss"] / n, "eval/rewards/chosen": acc["rc"] / n, "eval/rewards/rejected": acc["rr"] / n,
            "eval/rewards/margins": (acc["rc"] - acc["rr"]) / n, "eval/rewards/accuracies": acc["acc"] / n,
            "eval/logps/chosen": acc["lc"] / n, "eval/logps/rejected": acc["lr"] / n,
            "eval/logps/ref_chosen": acc["refc"] / n, "eval/logps/ref_rejected": acc["refr"] / n,
            "eval/lengths/chosen": acc["nc"] / n, "eval/lengths/rejected": acc["nr"] / n}


def test_eval_cli_api_and_independent_agree(tiny_model, other_model, tmp_path):
    rows = preference_rows(10, seed=3)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    expected = independent_metrics(tiny_model, other_model, rows, beta=0.3)
    api = dpolab.evaluate(str(tiny_model), str(data), ref_model=str(other_model), beta=0.3, batch_size=4)
    cli = subprocess.run([sys.executable, "-m", "dpolab.cli", "eval", "--model", str(tiny_model), "--ref-model",
                          str(other_model), "--data", str(data), "--loss", "sigmoid", "--beta", "0.3",
                          "--batch-size", "4", "--json"], capture_output=True, text=True, check=True)
    from_cli = json.loads(cli.stdout)
    assert set(api) == set(expected) == set(from_cli)
    for k in expected:
        assert api[k] == pytest.approx(expected[k], abs=1e-5), k
        assert from_cli[k] == pytest.approx(api[k], abs=1e-9), k
    assert 0 < expected["eval/rewards/accuracies"] < 1 or expected["eval/rewards/margins"] != 0


def test_score_is_beta_times_log_ratio(tiny_model, other_model):
    got = dpolab.score(str(tiny_model), "what is red?", " red is good", ref_model=str(other_model), beta=0.5)
    exp = independent_metrics(tiny_model, other_model, [{"prompt": "what is red?", "chosen": " red is good",
                                                           "rejected": " x"}], beta=0.5)
    assert got["reward"] == pytest.approx(exp["eval/rewards/chosen"], abs=1e-5)
    cli = subprocess.run([sys.executable, "-m", "dpolab.cli", "score", "--model", str(tiny_model), "--ref-model",
                          str(other_model), "--prompt", "what is red?", "--response", " red is good", "--beta",
                          "0.5"], capture_output=True, text=True, check=True)
    assert float(cli.stdout) == pytest.approx(got["reward"], abs=1e-6)


def test_first_eval_of_identical_models_is_ln2(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(6))
    m = dpolab.evaluate(str(tiny_model), str(data), ref_model=str(tiny_model))
    assert m["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["eval/rewards/accuracies"] == 0.0  # ties count as wrong
