"""Memory options of issue 7 that run here: the reference on another device; QLoRA's refusal (no CUDA and
no bitsandbytes on this machine) and the wiring of its loading path."""

import importlib.util
import math

import pytest
import torch

import dpolab
from dpolab import cli
from dpolab.evaluation.metrics import read_metrics
from dpolab.models.adapters import qlora_unavailable


def test_reference_on_cpu_trains_with_first_loss_ln2(run_config, tmp_path):
    """--ref-device cpu: a frozen copy kept in CPU memory (batches go there and back). Policy = reference
    at step 0, so the first loss is ln 2 and every implicit reward 0."""
    out = tmp_path / "refcpu"
    dpolab.train(**run_config(output_dir=str(out), ref_device="cpu", max_steps=2, eval_split=0))
    first = [r for r in read_metrics(out / "metrics.jsonl") if r["step"] == 1][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.skipif(qlora_unavailable() is None, reason="CUDA and bitsandbytes are present: QLoRA is allowed")
def test_qlora_is_refused_where_cuda_or_bitsandbytes_is_missing(tiny_model, prefs, tmp_path, capsys):
    reason = qlora_unavailable()
    assert ("a CUDA GPU" in reason) != torch.cuda.is_available()
    assert ("bitsandbytes" in reason) != (importlib.util.find_spec("bitsandbytes") is not None)
    with pytest.raises(dpolab.ConfigError, match="load_in_4bit: QLoRA \\(4-bit base weights\\) needs"):
        dpolab.load_config(overrides=dict(model=str(tiny_model), data=str(prefs), lora_r=4, load_in_4bit=True))
    out = tmp_path / "q"
    assert cli.main(["train", "--model", str(tiny_model), "--data", str(prefs), "--lora-r", "4", "--load-in-4bit",
                     "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "which this machine lacks" in err and "Traceback" not in err and not out.exists()


def test_qlora_needs_lora(tiny_model, prefs):
    with pytest.raises(dpolab.ConfigError, match="load_in_4bit \\(QLoRA\\) quantises the frozen base"):
        dpolab.load_config(overrides=dict(model=str(tiny_model), data=str(prefs), load_in_4bit=True))


def test_qlora_loading_path_asks_for_nf4_and_prepares_for_kbit_training(tiny_model, monkeypatch):
    """Where QLoRA can run (CUDA + bitsandbytes), the base is requested in 4-bit NF4 with double quantisation
    and bf16 compute on this process's GPU, prepared with PEFT's prepare_model_for_kbit_training, and LoRA
    goes on top. Here the quantising load itself is replaced by a plain one (no GPU): this checks the wiring,
    not bitsandbytes."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from dpolab.models import adapters

    seen = {}
    real_load = AutoModelForCausalLM.from_pretrained

    def load(name, **kwargs):
        seen.update(kwargs)
        kwargs.pop("quantization_config"), kwargs.pop("device_map")
        return real_load(name, **kwargs)

    def prepare(model, use_gradient_checkpointing=True):
        seen["prepared"] = use_gradient_checkpointing
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    model = adapters.load_policy(str(tiny_model), 4, 8.0, 0.0, "all-linear", load_in_4bit=True)
    q = seen["quantization_config"]
    assert isinstance(q, BitsAndBytesConfig) and q.load_in_4bit and q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert seen["device_map"] == {"": 0} and seen["prepared"] is False
    assert adapters.is_peft(model) and 0 < adapters.trainable_count(model)[0] < adapters.trainable_count(model)[1]
