"""The embedded default: the bundled assets are what the issue promises, and a shortened run of the same
pipeline (`dpolab train` with no model and no data) improves the model on held-out prompts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import dpolab
from dpolab import embedded
from dpolab.tasks import addition

pytestmark = pytest.mark.slow  # make test-fast skips it; make test runs it

ROOT = Path(__file__).resolve().parent.parent


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bundled_model_and_pairs_are_small_on_policy_and_held_out():
    weights = embedded.MODEL / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2 ** 20
    assert sum(t.numel() for t in load_file(str(weights)).values()) <= 5_000_000
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded.MODEL)
    assert tok.is_fast and tok.chat_template
    train, held = rows(embedded.TRAIN), rows(embedded.EVAL)
    assert len(train) >= 2000 and len(held) >= 200
    splits = addition.splits()
    assert {r["prompt"] for r in train} <= set(splits["train"])
    assert {r["prompt"] for r in held} <= set(splits["eval"])
    for r in train + held:  # the program's reward ranks every pair, as the build script scored it
        assert addition.reward(r["prompt"], r["chosen"]) == r["score_chosen"] > r["score_rejected"] == \
            addition.reward(r["prompt"], r["rejected"])


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default-run")
    summary = dpolab.train(output_dir=str(out), overwrite=True, max_steps=30, task_prompts=200, eval_every=0,
                           save_every=0, progress=False)
    return out, summary


def test_a_short_default_run_learns_the_preferences_and_does_not_hurt_the_task(short_run):
    out, s = short_run
    assert s["eval_before"]["eval/rewards/accuracies"] == 0.0  # policy = reference: every margin ties at 0
    assert s["eval_reward_accuracy"] > 0.6  # above chance on 315 held-out pairs
    assert s["task_reward_after"] >= s["task_reward_before"]
    assert s["task_reward_greedy_after"] >= s["task_reward_greedy_before"]
    assert s["kl"] > 0
    for key in ("task_reward_before", "task_reward_after", "task_reward_greedy_before", "task_reward_greedy_after",
                "eval_reward_accuracy", "kl"):
        assert key in json.loads((out / "summary.json").read_text())
    for name in ("config.yaml", "metrics.jsonl", "final/model.safetensors", "plots/loss.png"):
        assert (out / name).exists(), name


def test_task_eval_command_gives_the_numbers_of_the_run(short_run):
    """Same prompts, seed and sampling settings: the command reproduces the summary exactly."""
    out, s = short_run
    r = subprocess.run([sys.executable, "-m", "dpolab.cli", "task-eval", "--model", str(out / "final"), "--task",
                        "addition", "--num-prompts", "200", "--num-samples", "4", "--max-new-tokens", "6",
                        "--seed", "42", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for key in ("task_reward_before", "task_reward_after", "task_reward_greedy_before", "task_reward_greedy_after",
                "kl"):
        assert got[key] == pytest.approx(s[key], abs=1e-6), key


def test_the_build_script_runs_end_to_end_at_a_small_size(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_default.py"), "--out", str(tmp_path),
                        "--limit", "40", "--hidden", "32", "--layers", "1", "--sft-max-steps", "4",
                        "--check-every", "2", "--target", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads((tmp_path / "build.json").read_text())
    assert info["sft_steps"] == 4
    assert info["train_pairs"] == len(rows(tmp_path / "train.jsonl"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tok.decode(tok("12+34=", add_special_tokens=False)["input_ids"]) == "12+34="
    assert tok("12+34=")["input_ids"][0] == tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
