"""LoRA through PEFT: the reference is the policy with its adapters off (no second copy), an existing
adapter's starting weights are its reference, and `dpolab merge` gives back the trained policy."""

import json
import math
from pathlib import Path

import pytest
import torch

import dpolab
from dpolab.data.batch import collate
from dpolab.evaluation.metrics import read_metrics
from dpolab.models.logps import SequenceLogps

from .conftest import preference_rows, write_jsonl

LORA = dict(lora_r=4, lora_alpha=8.0, learning_rate=1e-2, eval_split=0.125)


def steps(out) -> list[dict]:
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def sample_batch(tiny_model):
    import tempfile

    from dpolab.data.reading import load_records
    from dpolab.data.tokenization import tokenize_records
    from dpolab.models.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    with tempfile.TemporaryDirectory() as d:
        records = load_records(str(write_jsonl(Path(d) / "p.jsonl", preference_rows(4, seed=7))), False)
    return collate(tokenize_records(records, tok, 64, 32), tok.pad_token_id)


@torch.no_grad()
def logps(model, batch) -> torch.Tensor:
    return SequenceLogps(model.eval())(**batch.model_inputs())


@pytest.fixture(scope="module")
def lora_run(tiny_model, tmp_path_factory):
    """A 3-step LoRA run that also writes merged/ (shared by the tests below)."""
    tmp = tmp_path_factory.mktemp("lora")
    prefs = write_jsonl(tmp / "prefs.jsonl", preference_rows(64))
    out = tmp / "run"
    summary = dpolab.train(model=str(tiny_model), data=str(prefs), output_dir=str(out), batch_size=8, max_steps=3,
                           save_every=2, progress=False, warmup_ratio=0.0, lr_scheduler="constant",
                           merge_on_save=True, **LORA)
    return out, prefs, summary


def test_first_loss_is_ln2_and_the_reference_is_the_base(lora_run, tiny_model):
    from transformers import AutoModelForCausalLM

    from dpolab.models.adapters import AdapterReference, load_policy

    out, _, summary = lora_run
    assert steps(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["eval_before"]["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-7)
    # Adapters off = the base model, loaded independently, even after the adapter has moved away from 0.
    batch = sample_batch(tiny_model)
    policy = load_policy(str(tiny_model), 4, 8.0, 0.0, "all-linear")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a new adapter starts at B = 0: move it away
    base = logps(AutoModelForCausalLM.from_pretrained(tiny_model), batch)
    torch.testing.assert_close(AdapterReference(policy)(batch), base, atol=1e-5, rtol=0)
    assert (logps(policy, batch) - base).abs().max() > 1e-3  # the adapter really changed the policy
    # Only the adapter is trained and checkpointed; the base is not held twice.
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step-2" / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert (out / "final" / "adapter_config.json").exists() and not (out / "final" / "model.safetensors").exists()


def test_merge_gives_the_trained_policy(lora_run, tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpolab.cli import main

    out, _, _ = lora_run
    assert main(["merge", "--adapter", str(out / "final"), "--output", str(tmp_path / "merged")]) == 0
    batch = sample_batch(tiny_model)
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "final")
    expected = logps(trained, batch)
    for folder in (tmp_path / "merged", out / "merged"):  # the CLI and --merge-on-save
        merged = AutoModelForCausalLM.from_pretrained(folder)
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(logps(merged, batch), expected, atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "merged" / "dpolab.json").read_text())["reference"] == str(tiny_model)


def test_training_an_adapter_further_uses_its_starting_weights(lora_run, tmp_path):
    out, prefs, first = lora_run
    s = dpolab.train(model=str(out / "final"), data=str(prefs), output_dir=str(tmp_path / "more"), batch_size=8,
                     max_steps=2, save_every=0, progress=False, warmup_ratio=0.0, lr_scheduler="constant",
                     learning_rate=1e-2, eval_split=0.125)
    before, after = s["eval_before"], s["eval"]
    assert steps(tmp_path / "more")[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # At the start, policy = reference = the first run's trained adapter (not the base).
    assert before["eval/logps/chosen"] == pytest.approx(first["eval"]["eval/logps/chosen"], abs=1e-4)
    assert before["eval/rewards/chosen"] == pytest.approx(0.0, abs=1e-7)
    # The reference stayed the starting adapter while the trained one moved: reward = β·(π − π_start).
    beta = 0.1
    moved = after["eval/logps/chosen"] - before["eval/logps/chosen"]
    assert abs(moved) > 1e-3
    assert after["eval/rewards/chosen"] == pytest.approx(beta * moved, abs=1e-5)


def test_precomputed_reference_with_lora_matches_the_live_one(lora_run, tmp_path, tiny_model):
    out, prefs, _ = lora_run
    s = dpolab.train(model=str(tiny_model), data=str(prefs), output_dir=str(tmp_path / "pre"), batch_size=8,
                     max_steps=2, save_every=0, progress=False, warmup_ratio=0.0, lr_scheduler="constant",
                     precompute_ref=True, **LORA)
    live, pre = steps(out)[:2], steps(tmp_path / "pre")
    for a, b in zip(live, pre, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-6)
    assert s["eval_before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_lora_with_ld_alpha_starts_at_ln2(tiny_model, tmp_path):
    """LD-DPO weights the tokens of both the policy and the adapters-off reference: at step 0 they are the
    same model, so h = 0 and the loss is ln 2 even on pairs of unequal length (a reference summing its
    tokens unweighted would give h = (α − 1)·(tail log-probs) ≠ 0 on every uneven pair)."""
    from tests.hand import uneven_rows

    rows = uneven_rows(16, seed=2)
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    out = tmp_path / "ld"
    s = dpolab.train(model=str(tiny_model), data=str(data), output_dir=str(out), batch_size=8, max_steps=1,
                     save_every=0, progress=False, ld_alpha=0.3, **{**LORA, "eval_split": 0.5})
    assert steps(out)[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps(out)[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-7)
    assert s["eval_before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_refusals(tiny_model, lora_run):
    out, prefs, _ = lora_run
    with pytest.raises(dpolab.ConfigError, match="ref_device"):
        dpolab.load_config(overrides=dict(model=str(tiny_model), data=str(prefs), lora_r=4, ref_device="cpu"))
    with pytest.raises(dpolab.ConfigError, match="merge_on_save needs LoRA"):
        dpolab.load_config(overrides=dict(model=str(tiny_model), data=str(prefs), merge_on_save=True))
    from dpolab.models.adapters import load_policy

    with pytest.raises(dpolab.ConfigError, match="already a LoRA adapter"):
        load_policy(str(out / "final"), 8, 16, 0, "all-linear")


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage alive in this process (parameters, buffers, optimizer states, tables),
    each storage counted once. Garbage is collected first: what an earlier test left unreachable is not held."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values())


def test_lora_reference_holds_no_second_copy(lora_run, tiny_model, monkeypatch, tmp_path):
    """Everything held while the first step runs: adapters-off reference vs an explicit reference model with
    the same weights (a second copy). The first holds less by a whole model's weights. Each run is measured
    from what the process held just before it, so tensors other tests keep alive in the same process cancel."""
    import dpolab.training.loop as training

    held = []  # live bytes at the first step of each run
    original = training.train_step

    def measured(*args, **kwargs):
        if len(held) < runs:
            held.append(live_tensor_bytes() - before)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_step", measured)
    _, prefs, _ = lora_run
    common = dict(model=str(tiny_model), data=str(prefs), batch_size=8, max_steps=1, eval_split=0, save_every=0,
                  progress=False, lora_r=4)
    runs, before = 1, live_tensor_bytes()
    dpolab.train(output_dir=str(tmp_path / "off"), **common)
    runs, before = 2, live_tensor_bytes()
    dpolab.train(output_dir=str(tmp_path / "copy"), ref_model=str(tiny_model), **common)
    model_bytes = sum(t.numel() * 4 for t in load_file_tensors(tiny_model))
    shared, copy = held
    print(f"held at step 1: adapters off {shared / 2**20:.2f} MiB, with a copy {copy / 2**20:.2f} MiB, "
          f"model {model_bytes / 2**20:.2f} MiB")
    assert copy - shared >= 0.95 * model_bytes, (shared, copy, model_bytes)


def load_file_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors")).values()
