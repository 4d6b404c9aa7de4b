"""Training invariants on the tiny model: first loss ln 2, accumulation, resume, learning, precompute."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dpolab
from dpolab.evaluation.metrics import read_metrics


def final_weights(out: str) -> dict:
    return load_file(str(Path(out) / "final" / "model.safetensors"))


def first_step(out: str) -> dict:
    return next(r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r)


def test_first_step_loss_is_ln2_with_zero_rewards(run_config):
    s = dpolab.train(**run_config(max_steps=1))
    m = first_step(s_out := run_config()["output_dir"])
    assert m["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert m[k] == pytest.approx(0.0, abs=1e-6)
    assert s["eval_before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert Path(s_out, "final", "config.json").exists()


def test_accumulation_8x1_equals_1x8(run_config, tmp_path):
    """Adam is invariant to the gradient's scale, so weights alone would not catch a wrong loss scaling:
    the gradient norm of every step (taken before clipping) must match too."""
    dpolab.train(**run_config(output_dir=str(tmp_path / "a"), grad_accum=1, max_steps=3, max_grad_norm=0))
    dpolab.train(**run_config(output_dir=str(tmp_path / "b"), grad_accum=8, max_steps=3, max_grad_norm=0))
    steps = lambda d: [r for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r]
    for ra, rb in zip(steps("a"), steps("b"), strict=True):
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    for k in wa:  # lr 1e-3: a summation-order difference may move an Adam step by a hair
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=0)


def test_resume_gives_the_same_final_weights(run_config, tmp_path):
    cfg = dict(max_steps=6, lr_scheduler="cosine", warmup_ratio=0.2, save_every=2, save_total_limit=3)
    dpolab.train(**run_config(output_dir=str(tmp_path / "full"), **cfg))
    # The same run, then resumed from its step-4 checkpoint as after a crash: the rest is replayed exactly.
    out = tmp_path / "crashed"
    dpolab.train(**run_config(output_dir=str(out), **cfg))
    import shutil

    shutil.rmtree(out / "checkpoints" / "step-6", ignore_errors=True)
    shutil.rmtree(out / "final")
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4"]
    dpolab.train(**run_config(output_dir=str(out), resume=True, **cfg))
    w1, w2 = final_weights(tmp_path / "full"), final_weights(out)
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # lines after the checkpoint were dropped, then rewritten


def test_loss_falls_and_heldout_accuracy_rises(run_config, tmp_path, prefs):
    s = dpolab.train(**run_config(output_dir=str(tmp_path / "learn"), max_steps=None, epochs=4,
                                  learning_rate=3e-3, beta=0.5, eval_split=0.25))
    rows = [r for r in read_metrics(tmp_path / "learn" / "metrics.jsonl") if "loss" in r]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 0.2
    assert s["eval_before"]["eval/rewards/accuracies"] == 0.0
    assert s["eval"]["eval/rewards/accuracies"] >= 0.9
    assert s["eval"]["eval/loss"] < math.log(2) - 0.2


def test_output_dir_is_refused_unless_resume_or_overwrite(run_config):
    dpolab.train(**run_config(max_steps=1))
    with pytest.raises(dpolab.ConfigError, match="not empty"):
        dpolab.train(**run_config(max_steps=1))
    dpolab.train(**run_config(max_steps=1, overwrite=True))


def test_run_leaves_every_output(run_config):
    out = Path(run_config()["output_dir"])
    dpolab.train(**run_config(max_steps=4, save_every=2))
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/model.safetensors",
                 "final/tokenizer.json", "checkpoints/step-2/state.json", "plots/loss.png",
                 "plots/reward_accuracy.png", "plots/margins.png", "plots/rewards.png", "plots/logps.png"):
        assert (out / name).exists(), name
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "eval/rewards/accuracies" in summary["eval"]


# ------------------------------------------------------------------ precomputed reference


def test_precomputed_reference_is_what_the_loss_consumes(run_config, tmp_path, other_model):
    base = dict(max_steps=1, ref_model=str(other_model), eval_split=0)
    live = dpolab.train(**run_config(output_dir=str(tmp_path / "live"), **base))
    cached = dpolab.train(**run_config(output_dir=str(tmp_path / "pre"), precompute_ref=True, **base))
    assert cached["train"]["loss"] == pytest.approx(live["train"]["loss"], abs=1e-6)
    assert live["train"]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # the reference really differs

    cache = next((tmp_path / "pre" / "ref_cache").glob("*.safetensors"))
    table = load_file(str(cache))["logps"]
    save_file({"logps": table + torch.tensor([5.0, 0.0])}, str(cache))  # tamper: ref chosen + 5
    tampered = dpolab.train(**run_config(output_dir=str(tmp_path / "pre"), precompute_ref=True, overwrite=True,
                                         **base))
    beta = 0.1
    # With every ref chosen log-prob raised by 5, each margin falls by β·5, so the loss must rise.
    assert tampered["train"]["rewards/margins"] == pytest.approx(cached["train"]["rewards/margins"] - beta * 5,
                                                                 abs=1e-5)


def test_changed_model_or_data_invalidates_the_cache(run_config, tmp_path, other_model, tiny_model):
    from dpolab.data.records import Example
    from dpolab.models.reference import cache_key, model_fingerprint

    ex = [Example(0, [1, 2], [[3], [4]])]
    s = {"max_length": 8}
    key = cache_key(model_fingerprint(str(tiny_model)), ex, s)
    assert key == cache_key(model_fingerprint(str(tiny_model)), ex, s)
    assert key != cache_key(model_fingerprint(str(other_model)), ex, s)
    assert key != cache_key(model_fingerprint(str(tiny_model)), [Example(0, [1, 2], [[3], [5]])], s)
    assert key != cache_key(model_fingerprint(str(tiny_model)), ex, {"max_length": 9})
    # End to end: new data → a second cache file next to the first.
    cache = tmp_path / "cache"
    dpolab.train(**run_config(output_dir=str(tmp_path / "r1"), precompute_ref=True, max_steps=1,
                              ref_cache_dir=str(cache)))
    other = tmp_path / "other.jsonl"
    other.write_text(Path(run_config()["data"]).read_text().replace("good", "nice"))
    dpolab.train(**run_config(output_dir=str(tmp_path / "r2"), precompute_ref=True, max_steps=1,
                              ref_cache_dir=str(cache), data=str(other)))
    assert len(list(cache.glob("*.safetensors"))) == 4  # train and eval tables for each dataset
