"""TRL and alignment-handbook recipes through --config (dpolab.recipes): the recipes in examples/recipes/ are
written in the handbook's shapes (full, LoRA, QLoRA); the numbers below are worked out from their keys."""

import logging

import pytest
import yaml

from dpolab import cli
from dpolab.commands import load_config
from dpolab.errors import ConfigError
from dpolab.models.adapters import qlora_unavailable
from tests.conftest import preference_rows, write_jsonl

FULL, LORA, QLORA = (f"examples/recipes/dpo-{v}.yaml" for v in ("full", "lora", "qlora"))
GIVEN = {"model": "m", "data": "d.jsonl", "max_steps": 2, "output_dir": "out"}


def test_full_recipe_maps_to_dpolab_settings():
    c = load_config(FULL, GIVEN)
    # per_device_train_batch_size 8 × gradient_accumulation_steps 2 × 1 process = 16 examples a step
    assert (c.batch_size, c.grad_accum) == (16, 2)
    assert (c.beta, c.learning_rate, c.lr_scheduler, c.warmup_ratio) == (0.01, 5e-7, "cosine", 0.1)
    assert (c.log_every, c.eval_every, c.save_every, c.save_total_limit) == (10, 100, 100, 1)
    assert (c.max_length, c.max_prompt_length, c.bf16, c.gradient_checkpointing, c.lora_r) == (1024, 512, True,
                                                                                               True, 0)
    assert (c.model, c.data, c.max_steps, c.output_dir) == ("m", "d.jsonl", 2, "out")  # flags override the file


def test_lora_recipe_maps_peft_rpo_warmup_steps_and_trackers():
    c = load_config(LORA, GIVEN)
    assert (c.lora_r, c.lora_alpha, c.lora_dropout, c.lora_target_modules) == (8, 16, 0.05,
                                                                               "q_proj,k_proj,v_proj,o_proj")
    assert (c.loss, c.loss_weights) == ("sigmoid,sft", [1.0, 0.5])  # TRL's rpo_alpha: sigmoid + α·NLL
    assert (c.batch_size, c.grad_accum, c.warmup_steps, c.lr_scheduler) == (8, 2, 3, "linear")
    assert (c.weight_decay, c.max_grad_norm, c.seed, c.report_to, c.bf16) == (0.01, 0.5, 7, "tensorboard", True)


def test_the_batch_is_global_over_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as accelerate launch or torchrun set it
    assert load_config(FULL, GIVEN).batch_size == 8 * 2 * 2


def test_recipe_datasets_become_data_and_eval_data(tmp_path):
    given = {k: v for k, v in GIVEN.items() if k != "data"}
    c = load_config(FULL, given)
    assert (c.data, c.eval_data) == ("HuggingFaceH4/ultrafeedback_binarized:train_prefs",
                                     "HuggingFaceH4/ultrafeedback_binarized:test_prefs")
    assert load_config(LORA, given).data == "trl-lib/ultrafeedback_binarized:train"
    two = tmp_path / "two.yaml"
    two.write_text("model_name_or_path: m\ndataset_mixer:\n  a/b: 1.0\n  c/d: 0.5\n")
    with pytest.raises(ConfigError, match="mixture of several datasets"):
        load_config(str(two), given)


def test_mapped_and_ignored_keys_are_printed_once(caplog):
    with caplog.at_level(logging.INFO, logger="dpolab"):
        load_config(FULL, GIVEN)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("mapped" in m for m in lines) == 1 and sum("ignored" in m for m in lines) == 1
    ignored = next(m for m in lines if "ignored" in m)
    assert "push_to_hub" in ignored and "hub_model_id" in ignored and "per_device_eval_batch_size" in ignored


def test_unsupported_keys_are_refused_in_one_paragraph_naming_each(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nfp16: true\nuse_dora: true\nlearning_rate: 1.0e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), GIVEN)
    text = str(e.value)
    assert "fp16 (" in text and "use_dora (" in text and "\n" not in text
    path.write_text("model_name_or_path: m\noptim: adamw_8bit\n")
    with pytest.raises(ConfigError, match="optim: adamw_8bit is not available"):
        load_config(str(path), GIVEN)


def test_a_misspelt_recipe_key_is_an_error_with_did_you_mean(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nper_device_train_batchsize: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'per_device_train_batchsize' "
                                          r"\(did you mean 'per_device_train_batch_size'\?\)"):
        load_config(str(path), GIVEN)


def test_dpolab_keys_keep_working_beside_recipe_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nper_device_train_batch_size: 2\nlayout: prefix\nloss: ipo\n")
    c = load_config(str(path), {"max_steps": 1})
    assert (c.model, c.batch_size, c.layout, c.loss) == ("m", 2, "prefix", "ipo")


@pytest.mark.parametrize("recipe", [FULL, LORA])
def test_a_recipe_runs_with_four_flags_and_reaches_config_yaml(recipe, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(40))
    out = tmp_path / "run"
    argv = ["train", "--config", recipe, "--model", str(tiny_model), "--data", str(data), "--max-steps", "2",
            "--output-dir", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    raw = yaml.safe_load(open(recipe))
    assert (saved["beta"], saved["learning_rate"], saved["lr_scheduler"]) == (
        raw["beta"], raw["learning_rate"], raw["lr_scheduler_type"])
    assert saved["batch_size"] == raw["per_device_train_batch_size"] * raw["gradient_accumulation_steps"]
    assert saved["lora_r"] == (raw["lora_r"] if raw.get("use_peft") else 0)
    assert (out / "final").is_dir()


@pytest.mark.skipif(qlora_unavailable() is None, reason="this machine can load 4-bit weights")
def test_the_qlora_recipe_is_refused_without_cuda_in_one_paragraph(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(40))
    argv = ["train", "--config", QLORA, "--model", str(tiny_model), "--data", str(data), "--max-steps", "2",
            "--output-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "load_in_4bit: QLoRA (4-bit base weights) needs" in err and "\n" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_eval_and_save_strategies(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\neval_strategy: no\neval_steps: 10\nsave_strategy: steps\n"
                    "save_steps: 30\n")
    c = load_config(str(path), GIVEN)
    assert (c.eval_every, c.save_every) == (0, 30)
    path.write_text("model_name_or_path: m\nsave_strategy: epoch\n")
    with pytest.raises(ConfigError, match="save_strategy: 'epoch' is not supported"):
        load_config(str(path), GIVEN)


def test_quantisation_keys_that_match_dpolabs_qlora_are_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model_name_or_path: m\nuse_peft: true\nload_in_4bit: true\nbnb_4bit_quant_type: nf4\n"
                    "use_bnb_nested_quant: true\n")
    c = load_config(str(path), GIVEN)
    assert (c.load_in_4bit, c.lora_r, c.lora_alpha) == (True, 16, 32)  # TRL ModelConfig's LoRA defaults
    path.write_text("model_name_or_path: m\nuse_peft: true\nload_in_4bit: true\nbnb_4bit_quant_type: fp4\n")
    with pytest.raises(ConfigError, match="NF4 with double quantisation"):
        load_config(str(path), GIVEN)
