"""Bad files and bad settings: one clear paragraph naming file, line and field; exit 2; no traceback."""

import json
import subprocess
import sys

import pytest

import dpolab
from dpolab.data import load_records
from dpolab.errors import DataError

GOOD = {"prompt": "what is red?", "chosen": " good", "rejected": " bad"}


def lines(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


CASES = [  # (file name, content, expected message fragment)
    ("broken.jsonl", lines(GOOD, GOOD, '{"prompt": "x", "chosen": "y",', GOOD), r"broken\.jsonl, line 3: broken JSON"),
    ("missing.jsonl", lines(GOOD, {"prompt": "p", "chosen": "c"}), r"line 2, field 'rejected': missing"),
    ("type.jsonl", lines({"prompt": "p", "chosen": 3, "rejected": "r"}), r"line 1, field 'chosen': expected a string"),
    ("empty.jsonl", lines(GOOD, GOOD, {"prompt": "p", "chosen": "  ", "rejected": "r"}),
     r"line 3, field 'chosen': empty text"),
    ("messages.jsonl", lines({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
                              "rejected": [{"role": "assistant", "content": "b"}]}),
     r"line 1, field 'prompt', message 0"),
    ("mixed.jsonl", lines(GOOD, {"prompt": "p", "completion": "c", "label": True}), r"line 2: a unpaired row"),
    ("nothing.jsonl", "\n\n", r"no usable rows"),
    ("bad.json", '[\n  {"prompt": "a", "chosen": "b", "rejected": "c"},\n  {"prompt": "a", "chosen": "b"}\n]',
     r"bad\.json, line 3 \(item 1\), field 'rejected': missing"),
    ("bad.csv", "prompt,chosen,rejected\nhi,a,b\nhi,,b\n", r"bad\.csv, line 3, field 'chosen': empty text"),
    ("latin1.jsonl", None, r"line 2: invalid UTF-8"),
    ("label.jsonl", lines({"prompt": "p", "completion": "c", "label": "maybe"}), r"field 'label': expected true or"),
]


@pytest.mark.parametrize("name,content,message", CASES, ids=[c[0] for c in CASES])
def test_bad_file_names_file_line_and_field(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.write_bytes(lines(GOOD).encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_records(str(path))


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
    assert not (out / "final").exists()


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
