"""GGUF files where a model is expected: what transformers cannot read is one paragraph naming the file.
(A real GGUF model, loaded, trained and saved as safetensors, is in tests/test_real_model.py.)"""

import numpy as np
import pytest

from dpolab.cli import main
from dpolab.errors import DpolabError
from dpolab.models.loading import load_model, load_tokenizer


def write_gguf(path, arch: str):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("load", [load_model, load_tokenizer])
def test_an_unsupported_architecture_is_one_paragraph(load, tmp_path):
    path = write_gguf(tmp_path / "odd.gguf", "notanarch")
    with pytest.raises(DpolabError) as e:
        load(str(path))
    message = str(e.value)
    assert message.startswith(f"cannot load the GGUF file {path}: ") and "notanarch" in message
    assert "\n" not in message


def test_a_truncated_file_is_one_paragraph(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(DpolabError) as e:
        load_model(str(cut))
    assert str(e.value).startswith(f"cannot load the GGUF file {cut}: ") and "\n" not in str(e.value)


def test_a_missing_file_on_the_command_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DPOLAB_DEBUG", raising=False)
    missing = tmp_path / "nowhere.gguf"
    code = main(["score", "--model", str(missing), "--ref-model", str(missing), "--prompt", "a", "--response", "b"])
    assert code != 0
    assert f"cannot load {missing}: no such GGUF file" in capsys.readouterr().err
