"""`dpolab eval` and `dpolab score` on a run's final/ measure with the run's own β, loss and settings (SPEC §1):
with no --beta they reproduce the training run's held-out metrics and β·log(π/π_ref) to 1e-5."""

import json
import subprocess
import sys

import pytest

import dpolab
from tests.conftest import preference_rows, write_jsonl
from tests.test_eval_cli import independent_metrics


def trained(tmp_path, tiny_model, **settings):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(32, seed=1))
    held = write_jsonl(tmp_path / "held.jsonl", preference_rows(12, seed=2))
    out = tmp_path / "run"
    summary = dpolab.train(model=str(tiny_model), data=str(train), eval_data=str(held), output_dir=str(out),
                           batch_size=8, max_steps=3, learning_rate=3e-3, warmup_ratio=0.0, save_every=0,
                           progress=False, **settings)
    return out / "final", held, summary


@pytest.mark.parametrize("settings", [
    dict(loss="sigmoid", beta=2.0),
    dict(loss="simpo", simpo_gamma=0.5),  # reference-free, its own reward, its own default β (2.0)
    dict(loss="bco_pair", bco_running_delta=True, beta=0.5),  # the running δ is part of the record
    dict(loss="ipo", beta=0.3, max_length=24, max_prompt_length=8),  # tokenisation settings too
], ids=lambda s: s["loss"])
def test_eval_of_final_reproduces_the_runs_heldout_metrics(tmp_path, tiny_model, settings):
    final, held, summary = trained(tmp_path, tiny_model, **settings)
    got = dpolab.evaluate(str(final), str(held))
    assert set(got) == set(summary["eval"])
    for k, v in summary["eval"].items():
        assert got[k] == pytest.approx(v, abs=1e-5), k
    if settings["loss"] != "simpo":
        assert abs(summary["eval"]["eval/rewards/margins"]) > 1e-3  # a real check: the rewards moved


def test_score_and_eval_cli_use_the_recorded_beta(tmp_path, tiny_model):
    """Trained at β = 2: the score is 2·log(π/π_ref) (computed independently), not 0.1·…, and the CLI says
    which β it used."""
    final, held, summary = trained(tmp_path, tiny_model, loss="sigmoid", beta=2.0)
    row = preference_rows(1, seed=5)[0]
    expected = independent_metrics(final, tiny_model, [row], beta=2.0)["eval/rewards/chosen"]
    got = dpolab.score(str(final), row["prompt"], row["chosen"])
    assert got["beta"] == 2.0
    assert got["reward"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected) > 1e-3
    cli = subprocess.run([sys.executable, "-m", "dpolab.cli", "score", "--model", str(final), "--prompt",
                          row["prompt"], "--response", row["chosen"]], capture_output=True, text=True, check=True)
    assert float(cli.stdout) == pytest.approx(expected, abs=1e-5)
    assert "β = 2 (recorded in" in cli.stderr
    cli = subprocess.run([sys.executable, "-m", "dpolab.cli", "eval", "--model", str(final), "--data", str(held),
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(cli.stdout)["eval/rewards/margins"] == pytest.approx(summary["eval"]["eval/rewards/margins"],
                                                                        abs=1e-5)
    assert "β = 2 (recorded in" in cli.stderr


def test_what_the_user_passes_wins_and_another_loss_keeps_only_the_tokenisation(tmp_path, tiny_model):
    final, held, summary = trained(tmp_path, tiny_model, loss="sigmoid", beta=2.0, label_smoothing=0.1)
    at_01 = dpolab.evaluate(str(final), str(held), beta=0.1, label_smoothing=0.1)
    ratio = at_01["eval/rewards/margins"] / summary["eval"]["eval/rewards/margins"]
    assert ratio == pytest.approx(0.05, abs=1e-6)  # rewards are linear in β
    ipo = dpolab.evaluate(str(final), str(held), loss="ipo")  # label_smoothing belongs to the recorded sigmoid
    assert ipo["eval/rewards/margins"] == pytest.approx(0.05 * summary["eval"]["eval/rewards/margins"], abs=1e-6)
    record = json.loads((final / "dpolab.json").read_text())
    assert record["beta"] == 2.0 and record["settings"]["label_smoothing"] == 0.1
