"""Commands as a table (dpolab.commands.COMMANDS): each declares the config fields it takes, and the flags,
their defaults, the Python functions' defaults and the "does nothing here" refusal all follow from it."""

import inspect
import json

import pytest

import dpolab
from dpolab import cli
from dpolab.commands import COMMANDS
from dpolab.config import Config, _fields
from dpolab.evaluation.compare import compare
from dpolab.evaluation.heldout import score
from dpolab.evaluation.inspect import inspect_data
from dpolab.evaluation.pairs import make_pairs
from dpolab.evaluation.task_eval import evaluate_task
from dpolab.models.adapters import merge
from tests.conftest import preference_rows, write_jsonl

FUNCTIONS = {"make-pairs": make_pairs, "task-eval": evaluate_task, "score": score, "merge": merge,
             "compare": compare, "inspect": inspect_data}


@pytest.mark.parametrize("command", sorted(FUNCTIONS))
def test_each_commands_function_takes_its_fields_with_the_configs_defaults(command):
    """No drift: the function a command calls has a parameter per declared field, defaulting to the field's
    default (a required field has none). Before the table make-pairs sampled with seed 0, training with 42."""
    params = inspect.signature(FUNCTIONS[command]).parameters
    declared = COMMANDS[command]
    assert set(params) == set(declared.fields)
    for name in declared.fields:
        default = params[name].default
        if name in declared.required:
            assert default is inspect.Parameter.empty, name
        else:
            assert default == _fields()[name].default, f"{command} --{name}: {default!r}"


def test_flags_are_exactly_the_declared_fields():
    sub = next(a for a in cli.parser()._actions if a.dest == "command")
    for name, command in COMMANDS.items():
        flags = {a.dest for a in sub.choices[name]._actions} - {"help", "config", "json"}
        assert flags == set(command.fields), name
        required = {a.dest for a in sub.choices[name]._actions if a.required}
        assert required == set(command.required), name


def test_a_setting_the_command_does_not_take_is_refused_everywhere(tiny_model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(4))
    with pytest.raises(dpolab.ConfigError, match=r"lora_r does nothing in dpolab eval \(it is a setting of "
                                                 r"dpolab train"):
        dpolab.evaluate(str(tiny_model), str(data), lora_r=8)
    with pytest.raises(dpolab.ConfigError, match="temperature does nothing in dpolab train"):
        dpolab.train(model=str(tiny_model), data=str(data), temperature=0.5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 1\nprompts: my.txt\n")
    assert cli.main(["train", "--config", str(recipe)]) == 2
    assert "prompts does nothing in dpolab train (it is a setting of dpolab make-pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no such flag: argparse's one-line refusal
        cli.main(["eval", "--model", str(tiny_model), "--data", str(data), "--lora-r", "8"])
    assert e.value.code == 2


def test_a_saved_config_with_every_field_at_its_default_is_accepted(tmp_path):
    """A run's config.yaml holds the training fields only; a file that names another command's field at its
    default (as an older config.yaml did) is accepted, since it asks for nothing."""
    path = tmp_path / "c.yaml"
    Config(max_steps=3).validate().save(path)  # as a run writes it
    assert "\nprompts:" not in path.read_text() and "max_steps: 3" in path.read_text()
    path.write_text(path.read_text() + "prompts: null\nnum_samples: 4\n")
    assert dpolab.load_config(str(path)).max_steps == 3


def test_validation_probes_no_device_and_the_api_refuses_what_the_machine_cannot_do(tiny_model):
    """Config.validate is pure; the disk and device checks (QLoRA needs CUDA and bitsandbytes) belong to the
    builder, which dpolab.load_config and every run call before a model is loaded."""
    from dpolab.models.adapters import qlora_unavailable

    Config(model=str(tiny_model), lora_r=4, load_in_4bit=True).validate()
    if qlora_unavailable() is not None:
        with pytest.raises(dpolab.ConfigError, match="load_in_4bit: QLoRA"):
            dpolab.load_config(overrides=dict(model=str(tiny_model), lora_r=4, load_in_4bit=True))


def test_odpo_rows_with_no_usable_gap_are_refused_before_any_model(tiny_model, tmp_path, capsys):
    rows = [dict(r, score_chosen=1.0, score_rejected=0.5) for r in preference_rows(16)]
    rows[3]["score_rejected"] = 1.0  # a tie: log 0
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(tiny_model), "--data", str(data), "--loss", "odpo", "--output-dir",
                     str(out), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "d.jsonl, line 4: odpo with odpo_transform='log' needs a score gap" in err
    assert not out.exists() or not any(out.iterdir())
    json.dumps(rows)  # the rows themselves are well-formed: the refusal is the loss's
