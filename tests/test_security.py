"""Security promises of issue 6, each with its proof: no code from a model folder unless asked, YAML read
with safe_load, pickle weights refused unless asked (in every command that loads weights)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import dpolab
from dpolab import cli
from dpolab.errors import ConfigError, DpolabError


def test_trust_remote_code_is_off_unless_asked(monkeypatch, run_config, tmp_path):
    """Every tokenizer and model load passes trust_remote_code=False by default, True only when asked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []

    def recording(kind, load):
        def wrapped(*args, **kwargs):
            calls.append((kind, kwargs.get("trust_remote_code")))
            return load(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        recording("model", AutoModelForCausalLM.from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording("tokenizer", AutoTokenizer.from_pretrained))
    dpolab.train(**run_config(output_dir=str(tmp_path / "a"), max_steps=1))
    assert {k for k, _ in calls} == {"model", "tokenizer"} and all(v is False for _, v in calls), calls
    calls.clear()
    model = run_config()["model"]
    dpolab.score(model, "what is red?", " good", ref_model=model)
    assert calls and all(v is False for _, v in calls), calls
    calls.clear()
    dpolab.train(**run_config(output_dir=str(tmp_path / "b"), max_steps=1, trust_remote_code=True))
    assert calls and all(v is True for _, v in calls), calls


def test_a_model_folder_with_custom_code_is_refused_and_its_code_never_runs(tiny_model, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(tiny_model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="dpolab_custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "custom.py").write_text("import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\n")
    from dpolab.models.loading import load_model

    with pytest.raises(DpolabError, match="contains custom code .* unless you pass --trust-remote-code"):
        load_model(str(model))
    assert not (model / "RAN").exists()


def test_yaml_tags_that_build_objects_are_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "RAN"
    config = tmp_path / "evil.yaml"
    config.write_text(f"beta: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml, line 1: a YAML tag that would build a Python object or "
                                          r"run code .*yaml\.safe_load"):
        dpolab.load_config(str(config))
    assert cli.main(["train", "--config", str(config)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not marker.exists()


@pytest.fixture
def pickle_adapter(tiny_model, tmp_path):
    """A LoRA adapter (with tokenizer, as dpolab's final/) whose base has pickle weights only."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from dpolab.models.loading import load_model

    base = tmp_path / "pickle-base"
    base.mkdir()
    shutil.copy(tiny_model / "config.json", base)
    torch.save(load_file(str(tiny_model / "model.safetensors")), base / "pytorch_model.bin")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(base)
    model = get_peft_model(load_model(str(base), allow_pickle=True), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    return base, adapter


def test_merge_and_score_refuse_pickle_weights_unless_asked(pickle_adapter, tmp_path, capsys):
    base, adapter = pickle_adapter
    from dpolab.models.loading import load_merged

    with pytest.raises(DpolabError, match="safetensors only"):
        load_merged(str(adapter))
    assert load_merged(str(adapter), allow_pickle=True) is not None

    out = tmp_path / "merged"
    assert cli.main(["merge", "--adapter", str(adapter), "--output", str(out)]) == 2
    assert "safetensors only" in capsys.readouterr().err and not out.exists()
    assert cli.main(["merge", "--adapter", str(adapter), "--output", str(out), "--allow-pickle-weights"]) == 0
    assert (out / "model.safetensors").is_file()  # what dpolab writes is safetensors again

    score = ["score", "--model", str(adapter), "--ref-model", str(base), "--prompt", "what is red?",
             "--response", " good", "--json"]
    capsys.readouterr()
    assert cli.main(score) == 2
    assert "safetensors only" in capsys.readouterr().err
    assert cli.main([*score, "--allow-pickle-weights"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reward"] == pytest.approx(0.0, abs=1e-6)  # a new adapter (B = 0) is its base


def test_a_reward_named_module_function_is_imported_never_evaluated(tmp_path, monkeypatch):
    """dpolab.tasks.load_object imports ``module`` and looks ``function`` up by name; a string that would
    do something if it were evaluated is only ever a (failing) module or attribute name."""
    from dpolab.tasks import load_object

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def longer(prompt, completion):\n    return float(len(completion))\n")
    assert load_object("my_rewards:longer")("p", "abc") == 3.0
    marker = tmp_path / "RAN"
    for spec in (f"os:system('touch {marker}')", f"__import__('os').system('touch {marker}'):f",
                 f"my_rewards:longer.__globals__['__builtins__']['exec']('open(\"{marker}\", \"w\")')"):
        with pytest.raises(ValueError, match="cannot import|has no attribute|is not of the form"):
            load_object(spec)
    assert not marker.exists()


def test_the_source_never_evaluates_or_unpickles():
    """A static check of every dpolab module: no eval/exec/compile of strings, no yaml.load/full_load/
    unsafe_load, no pickle loads, and torch.load only with weights_only=True."""
    import ast
    from pathlib import Path

    root = Path(dpolab.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            weights_only = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
            if (name in ("eval", "exec", "compile", "builtins.eval", "builtins.exec")
                    or name in ("yaml.load", "yaml.full_load", "yaml.unsafe_load", "pickle.load", "pickle.loads")
                    or (name == "torch.load" and not weights_only)):
                found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    assert found == []
