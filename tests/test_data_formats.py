"""Every accepted source (JSONL, JSON, CSV, Parquet, a saved dataset folder) and row format reads the same."""

import csv
import json

import pytest

from dpolab.data.reading import load_records
from dpolab.data.records import split_records
from tests.conftest import preference_rows

ROWS = preference_rows(5, seed=7)


def as_tuples(records):
    return [(r.kind, r.prompt, tuple(map(str, r.completions))) for r in records]


def test_every_file_type_gives_the_same_records(tmp_path):
    import datasets

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(ROWS)
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    expected = [("paired", r["prompt"], (r["chosen"], r["rejected"])) for r in ROWS]
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved", "saved_dict"):
        assert as_tuples(load_records(str(tmp_path / name))) == expected, name


def test_row_formats(tmp_path):
    rows = [
        {"prompt": "p", "completion": " yes", "label": True},
        {"prompt": "p", "completion": " no", "label": "false"},
    ]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = load_records(str(path))
    assert [(r.kind, r.label) for r in recs] == [("unpaired", True), ("unpaired", False)]

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completions": ["b", "a", "c"], "scores": [2, 3, 1]}) + "\n")
    (rec,) = load_records(str(path))
    assert rec.kind == "ranked" and rec.completions == ["a", "b", "c"]  # sorted best first by score

    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 5,
                                "score_rejected": 2}) + "\n")
    (rec,) = load_records(str(path))
    assert rec.margin == 3.0


def test_eval_split_is_seeded_and_disjoint():
    items = list(range(100))
    a_train, a_eval = split_records(items, 0.1, seed=3)
    b_train, b_eval = split_records(items, 0.1, seed=3)
    c_train, c_eval = split_records(items, 0.1, seed=4)
    assert a_eval == b_eval and a_eval != c_eval and len(a_eval) == 10
    assert sorted(a_train + a_eval) == items
    assert split_records(items, 0.0, seed=3) == (items, [])


def hooked_load_model(monkeypatch, hook):
    """Make every model dpolab loads (and, through copies, the reference) call ``hook(module, output)`` after
    its first decoder layer's attention: inside the layer, so checkpointing's recompute runs it again
    (transformers keeps the layer's own hooks outside the checkpoint, and the recompute stops early, inside
    the MLP), and before the fp32 residual stream is added back."""
    import dpolab.models.loading as loading

    original = loading._load_pretrained  # every model load (policy, --ref-model, evaluation) goes through it

    def load(*args, **kwargs):
        model = original(*args, **kwargs)
        model.model.layers[0].self_attn.register_forward_hook(lambda module, inputs, output: hook(module, output[0]))
        return model

    monkeypatch.setattr(loading, "_load_pretrained", load)


def test_bf16_autocast_runs_the_model_in_bf16(run_config, tmp_path, monkeypatch):
    """With bf16 every forward (policy, reference, evaluation) computes its activations in bfloat16, without
    it in float32; the first loss is still ln 2 (policy = reference under the same precision), and the
    log-probs differ from fp32 by a bf16-sized amount: more than fp32 noise, well under 5%."""
    import math

    import torch

    import dpolab

    dtypes = []
    hooked_load_model(monkeypatch, lambda module, out: dtypes.append(out.dtype))
    runs = {}
    for bf16 in (False, True):
        dtypes.clear()
        runs[bf16] = dpolab.train(**run_config(output_dir=str(tmp_path / str(bf16)), max_steps=1, bf16=bf16))
        assert set(dtypes) == {torch.bfloat16 if bf16 else torch.float32} and len(dtypes) >= 4
    for s in runs.values():
        assert s["eval_before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    fp32, bf16 = (runs[k]["eval_before"]["eval/logps/chosen"] for k in (False, True))
    assert 1e-4 < abs(bf16 - fp32) < 5e-2 * abs(fp32)  # fp32 reruns agree to ~1e-6


def test_gradient_checkpointing_is_on_in_training(run_config, tmp_path, monkeypatch):
    """With checkpointing the decoder layers' forward runs again in backward: the policy's first attention
    runs twice per training step instead of once (reference and evaluation run in eval mode and never
    recompute); the first loss stays ln 2."""
    import math

    import dpolab

    calls = []
    hooked_load_model(monkeypatch, lambda module, out: calls.append(module.training))
    for gc, per_step in ((False, 1), (True, 2)):
        calls.clear()
        s = dpolab.train(**run_config(output_dir=str(tmp_path / str(gc)), max_steps=2, gradient_checkpointing=gc))
        assert sum(calls) == 2 * per_step
        assert s["eval_before"]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6) and s["skipped_steps"] == 0


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.data.batch import collate
    from dpolab.data.records import Example
    from dpolab.models.logps import SequenceLogps

    batch = collate([Example(0, [5, 6, 7], [[8, 9], [10, 11, 12]])], pad_id=0)
    grads = []
    for gc in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        forwards = []
        model.model.layers[0].self_attn.register_forward_hook(lambda *args: forwards.append(1))
        SequenceLogps(model)(**batch.model_inputs()).sum().backward()
        assert len(forwards) == (2 if gc else 1)  # checkpointing recomputes the layer in backward
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
