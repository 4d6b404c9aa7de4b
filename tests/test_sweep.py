"""dpolab sweep: the grid, one reference pass for every configuration, and a killed sweep that resumes to
the frontier an uninterrupted sweep gives."""

from __future__ import annotations

import json

import pytest

from dpolab import builder, cli
from dpolab.commands import load_config
from dpolab.training import loop
from dpolab.training.sweep import grid_configs, sweep


def test_the_grid_is_the_product_and_a_plus_combines_losses():
    base = load_config(None, {"beta": 0.5, "learning_rate": 1e-4})
    configs = grid_configs(base, {"beta": [0.1, 2.0], "loss": ["sigmoid", "sigmoid+sft"]})
    assert [name for name, _ in configs] == ["beta=0.1_loss=sigmoid_lr=0.0001", "beta=0.1_loss=sigmoid+sft_lr=0.0001",
                                             "beta=2_loss=sigmoid_lr=0.0001", "beta=2_loss=sigmoid+sft_lr=0.0001"]
    assert [(c.beta, c.loss, c.learning_rate) for _, c in configs][1] == (0.1, "sigmoid,sft", 1e-4)


def settings(tiny_model, prefs, out):
    return load_config(None, dict(model=str(tiny_model), data=str(prefs), output_dir=str(out), batch_size=8,
                                  max_steps=2, learning_rate=1e-3, eval_split=0.125, save_every=1, progress=False,
                                  warmup_ratio=0.0, lr_scheduler="constant", task="addition", task_prompts=4,
                                  task_samples=1, task_max_new_tokens=3))


@pytest.mark.slow  # six tiny runs with task reports: 8 s with OMP_NUM_THREADS=1, a minute on a loaded machine
def test_a_killed_sweep_resumes_to_the_uninterrupted_frontier(tiny_model, prefs, tmp_path, monkeypatch):
    grid = {"beta": [0.1, 1.0]}
    tables = []
    real_table = builder.compute_table
    monkeypatch.setattr(builder, "compute_table", lambda *a, **k: tables.append(1) or real_table(*a, **k))
    whole = sweep(settings(tiny_model, prefs, tmp_path / "whole"), grid)
    assert len(tables) == 2  # one reference pass (the training and the held-out tables) for both configurations
    assert [p["beta"] for p in whole["points"]] == [0.1, 1.0] and all(
        set(p) >= {"task_reward", "task_reward_greedy", "kl", "reward_accuracy", "win_rate"} for p in whole["points"])

    steps, real_step = [], loop.train_step

    def killed_at_the_fourth_step(*a, **k):  # configuration 2, step 2: after its checkpoint of step 1
        steps.append(1)
        if len(steps) == 4:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "train_step", killed_at_the_fourth_step)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        sweep(settings(tiny_model, prefs, out), grid)
    first = out / "runs" / "beta=0.1_loss=sigmoid_lr=0.001" / "summary.json"
    second = out / "runs" / "beta=1_loss=sigmoid_lr=0.001"
    kept = first.stat().st_mtime_ns
    assert not (second / "summary.json").exists() and (second / "checkpoints" / "step-1").is_dir()
    monkeypatch.setattr(loop, "train_step", real_step)
    trained = []
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda c: trained.append(c) or real_train(c))
    resumed = sweep(settings(tiny_model, prefs, out), grid)
    assert first.stat().st_mtime_ns == kept  # the finished configuration was kept, not retrained
    assert len(trained) == 1 and trained[0].resume  # the stopped one resumed from its checkpoint
    assert resumed["points"] == whole["points"]  # resume equals an uninterrupted sweep
    assert json.loads((out / "frontier.json").read_text()) == resumed and (out / "frontier.png").stat().st_size > 0


def test_sweep_flags_take_lists_and_refuse_a_bad_value(capsys):
    assert cli.main(["sweep", "--beta", "0.1,oops"]) == 2
    assert "dpolab: error: --beta: beta expects a number, got 'oops'" in capsys.readouterr().err
