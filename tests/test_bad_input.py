"""Bad files and bad settings: one clear paragraph naming file, line and field; exit 2; no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dpolab
from dpolab.data import load_records
from dpolab.errors import DataError

GOOD = {"prompt": "what is red?", "chosen": " good", "rejected": " bad"}


def lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


CORPUS = Path(__file__).parent / "data" / "bad"
EXPECTED = json.loads((CORPUS / "EXPECTED.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_file_corpus_names_file_line_and_field(name):
    """Every file of tests/data/bad gives its expected one-line reason (EXPECTED.json), with file and line."""
    with pytest.raises(DataError, match=EXPECTED[name]) as e:
        load_records(str(CORPUS / name))
    assert str(CORPUS / name) in str(e.value) and "\n" not in str(e.value)


def test_corpus_rows_are_skippable(tmp_path):
    """With --skip-invalid the bad rows of a mostly good file are dropped and the good ones kept."""
    for name in ("broken_json.jsonl", "missing_key.jsonl", "empty_string.jsonl", "not_an_object.jsonl"):
        records = load_records(str(CORPUS / name), skip_invalid=True)
        assert records and all(r.kind == "paired" for r in records)


def test_skip_invalid_drops_and_counts(tmp_path, caplog):
    path = tmp_path / "some_bad.jsonl"
    path.write_text(lines(GOOD, "{oops", {"prompt": "p", "chosen": 1, "rejected": "r"}, GOOD))
    records = load_records(str(path), skip_invalid=True)
    assert len(records) == 2 and "skipped 2 invalid row(s), kept 2" in caplog.text


def cli(*args):
    return subprocess.run([sys.executable, "-m", "dpolab.cli", *args], capture_output=True, text=True)


def test_cli_bad_data_is_one_paragraph_without_traceback(tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(lines(GOOD, {"prompt": "p", "chosen": "c"}))
    out = tmp_path / "run"
    r = cli("train", "--model", str(tiny_model), "--data", str(data), "--output-dir", str(out), "--no-progress")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "d.jsonl, line 2, field 'rejected': missing" in r.stderr
    assert not out.exists()  # nothing written for a run that could not start


@pytest.mark.parametrize("args,message", [
    (["--beta", "0"], "beta must be > 0"),
    (["--beta", "abc"], "beta expects a number"),
    (["--label-smoothing", "0.5"], "label_smoothing must be in"),
    (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
    (["--loss", "nope"], "unknown loss 'nope'"),
    (["--lr-scheduler", "step"], "lr_scheduler must be one of"),
])
def test_cli_bad_settings_refused_before_loading(args, message, tmp_path):
    r = cli("train", "--model", "/nonexistent", "--data", "/nonexistent.jsonl", "--output-dir",
            str(tmp_path / "o"), *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_yaml_unknown_key_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("beta: 0.2\nlearning_rte: 1e-5\n")
    r = cli("train", "--config", str(cfg))
    assert r.returncode == 2 and "unknown key 'learning_rte' (did you mean 'learning_rate'?)" in r.stderr


def test_pickle_only_model_is_refused(tmp_path, tiny_model):
    import shutil

    import torch
    from safetensors.torch import load_file

    (tmp_path / "m").mkdir()
    shutil.copy(tiny_model / "config.json", tmp_path / "m")
    torch.save(load_file(str(tiny_model / "model.safetensors")), tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(dpolab.DpolabError, match="safetensors only"):
        from dpolab.setup import load_model

        load_model(str(tmp_path / "m"))
    model = load_model(str(tmp_path / "m"), allow_pickle=True)  # the explicit opt-in loads it
    assert torch.equal(model.lm_head.weight, load_file(str(tiny_model / "model.safetensors"))["lm_head.weight"])
