"""final/README.md, the model card (dpolab.training.card): Hugging Face front matter, the objective, the data,
before/after metrics equal to summary.json's, the diagnostics, and a command that reproduces the run."""

import json
import shlex

import yaml

import dpolab
from dpolab import cli
from dpolab.commands import COMMANDS, coerce, load_config
from dpolab.config import Config, _fields
from dpolab.training.card import render_card
from tests.conftest import preference_rows, write_jsonl

TRAIN = COMMANDS["train"].fields


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_a_run_writes_a_card_naming_its_base_model_with_its_own_numbers(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(40))
    out = tmp_path / "run"
    summary = dpolab.train(model=str(tiny_model), data=str(data), output_dir=str(out), batch_size=8, max_steps=2,
                           learning_rate=1e-3, beta=0.2, eval_split=0.2, save_every=0, progress=False)
    card = (out / "final" / "README.md").read_text()
    front = front_matter(card)
    assert front["base_model"] == str(tiny_model) and front["library_name"] == "transformers"
    assert {"dpolab", "dpo", "sigmoid"} <= set(front["tags"]) and "datasets" not in front  # a local file
    assert "- `sigmoid`: DPO: `L = −logσ(βΔ)`" in card and "β = 0.2" in card
    saved = json.loads((out / "summary.json").read_text())
    assert saved["data"] == {"digest": summary["data"]["digest"], "train_examples": 32, "eval_examples": 8}
    assert f"`{saved['data']['digest']}`" in card and "32 examples" in card and "8 examples" in card
    for key, after in saved["eval"].items():  # 0.2 of 40 rows held out
        assert f"| `{key}` | {saved['eval_before'][key]:.4f} | {after:.4f} |" in card
    assert "## Diagnostics\n\nNone raised." in card


def test_the_cards_command_reproduces_the_settings(tiny_model, tmp_path):
    values = Config(model=str(tiny_model), data="d.jsonl", loss="sigmoid,sft", loss_weights=[1, 0.5], beta=0.05,
                    bf16=True, progress=False, max_steps=7, lr_scheduler="linear").validate().to_dict()
    values = {k: v for k, v in values.items() if k in TRAIN}
    defaults = {k: f.default for k, f in _fields().items() if k in TRAIN}
    card = render_card(values, defaults, {"steps": 7}, lora=False)
    command = card.split("```bash\n")[1].split("\n```")[0]
    argv = shlex.split(command)[1:]
    assert argv[0] == "train"
    args = cli.parser().parse_args(argv)  # through the real command line
    flags = {k: coerce(k, getattr(args, k), "flag") for k in TRAIN if getattr(args, k, None) is not None}
    again = {k: v for k, v in load_config(overrides=flags).to_dict().items() if k in TRAIN}
    assert {k: v for k, v in again.items() if k != "progress"} == {k: v for k, v in values.items() if k != "progress"}


def test_hub_datasets_lora_and_diagnostics_reach_the_card():
    values = {k: v for k, v in Config(model="org/base", data="HuggingFaceH4/ultrafeedback_binarized:train_prefs",
                                      lora_r=8).validate().to_dict().items() if k in TRAIN}
    diagnostics = [{"name": "reference_collapse", "step": 40, "message": "logps/chosen fell by 30 nats.",
                    "remedy": "Raise beta."}]
    card = render_card(values, {}, {"steps": 1, "diagnostics": diagnostics}, lora=True)
    front = front_matter(card)
    assert front["datasets"] == ["HuggingFaceH4/ultrafeedback_binarized"] and front["library_name"] == "peft"
    assert "lora" in front["tags"]
    assert "- `reference_collapse` at step 40: logps/chosen fell by 30 nats. Raise beta." in card
    assert "No held-out data was measured." in card
