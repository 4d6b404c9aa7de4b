"""Bad files and bad settings: one clear paragraph naming file, line and field; exit 2; no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import dpolab
from dpolab.data.reading import load_records
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


def test_corpus_rows_are_skippable(tmp_path, caplog):
    """With --skip-invalid the bad rows of a mostly good file are dropped, counted, and the good ones kept."""
    for name in ("broken_json.jsonl", "missing_key.jsonl", "empty_string.jsonl", "not_an_object.jsonl",
                 "extra_key.jsonl", "ranked_k.jsonl"):
        records = load_records(str(CORPUS / name), skip_invalid=True)
        assert records and len({r.kind for r in records}) == 1
        assert f"{name}: skipped 1 invalid row(s), kept {len(records)}" in caplog.text


def test_ignore_columns_drops_only_the_named_columns(tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text(lines(GOOD | {"id": 1, "source": "web"}, GOOD | {"id": 2, "source": "web"}))
    with pytest.raises(DataError, match=r"extra\.jsonl, line 1, field 'id': not a column .* --ignore-columns id,source"):
        load_records(str(path))
    with pytest.raises(DataError, match="line 1, field 'source'"):
        load_records(str(path), ignore_columns=["id"])
    assert len(load_records(str(path), ignore_columns=["id", "source"])) == 2
    # SPEC §4's optional columns are never "extra"
    path.write_text(lines(GOOD | {"margin": 1.5}, GOOD | {"score_chosen": 3, "score_rejected": 1}))
    assert [r.margin for r in load_records(str(path))] == [1.5, 2.0]


def test_chosen_equal_to_rejected_is_warned_and_counted(tmp_path, caplog):
    path = tmp_path / "same.jsonl"
    same = {"prompt": "p", "chosen": " x", "rejected": " x"}
    path.write_text(lines(GOOD, same, GOOD, same | {"prompt": "q"}))
    assert len(load_records(str(path))) == 4  # kept: a warning, not an error (SPEC §4)
    assert "same.jsonl: 2 row(s) have chosen equal to rejected; they carry no preference signal" in caplog.text


def test_truncated_prompts_and_completions_are_counted(tiny_model, caplog):
    from transformers import AutoTokenizer

    from dpolab.data.records import Record
    from dpolab.data.tokenization import tokenize_records

    tok = AutoTokenizer.from_pretrained(tiny_model)
    long = " ".join(["the cat is good"] * 20)
    records = [Record(f"f, line {i}", "paired", p, [c, " bad"], False) for i, (p, c) in
               enumerate([("short?", " good"), (long, " good"), (long, " good"), ("short?", long)])]
    examples = tokenize_records(records, tok, max_length=40, max_prompt_length=16)
    assert len(examples) == 4 and all(len(e.prompt_ids) <= 16 for e in examples)
    assert ("truncated 2 prompt(s) longer than max_prompt_length=16 (from the left) and 1 row(s) whose "
            "completions did not fit max_length=40") in caplog.text


def test_a_chat_template_error_names_the_row(tiny_model, tmp_path, capsys):
    import shutil

    model = tmp_path / "strict-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")
    user, bot, no = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                     {"role": "assistant", "content": "no"})
    data = tmp_path / "chat.jsonl"
    data.write_text(lines({"prompt": [user], "chosen": [bot], "rejected": [no]},
                          {"prompt": [user, user], "chosen": [bot], "rejected": [no]}))
    from dpolab import cli as dpolab_cli

    code = dpolab_cli.main(["train", "--model", str(model), "--data", str(data), "--output-dir",
                            str(tmp_path / "o"), "--no-progress", "--eval-split", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "chat.jsonl, line 2: the chat template cannot render this conversation: roles must alternate" in err


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


@pytest.mark.parametrize("args,message", [
    (["--loss", "simpo", "--ref-model", "/nonexistent-ref"], "--ref-model was given but simpo uses no reference"),
    (["--reference-free", "--ref-model", "/nonexistent-ref"], "--ref-model was given but reference_free uses no"),
])
def test_ref_model_with_a_reference_free_loss_is_refused_before_loading(args, message, tmp_path, capsys):
    from dpolab import cli as dpolab_cli

    code = dpolab_cli.main(["train", "--model", "/nonexistent", "--data", "/nonexistent.jsonl", "--output-dir",
                            str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
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
        from dpolab.models.loading import load_model

        load_model(str(tmp_path / "m"))
    model = load_model(str(tmp_path / "m"), allow_pickle=True)  # the explicit opt-in loads it
    assert torch.equal(model.lm_head.weight, load_file(str(tiny_model / "model.safetensors"))["lm_head.weight"])
