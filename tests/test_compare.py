"""dpolab compare: the win-rate statistics against hand-worked numbers, and the command on tiny models
against an independent count over the answers that dpolab.evaluation.generate.sample draws."""

from __future__ import annotations

import json
import math

import pytest

from dpolab import cli
from dpolab.evaluation.compare import compare
from dpolab.evaluation.generate import sample
from dpolab.evaluation.winrate import length_controlled, wilson_interval, win_stats
from dpolab.models.loading import load_model, load_tokenizer


def test_wilson_interval_by_hand():
    """p = 0.75, n = 10, z = 1.96: centre (0.75 + z²/20)/(1 + z²/10) = 0.94207/1.38415 = 0.68061, half-width
    z/(1 + z²/10)·√(0.75·0.25/10 + z²/400) = 1.41600·0.16839 = 0.23844: [0.44217, 0.91905]."""
    lo, hi = wilson_interval(0.75, 10)
    assert lo == pytest.approx(0.44217, abs=2e-5) and hi == pytest.approx(0.91905, abs=2e-5)
    assert wilson_interval(1.0, 20)[1] == 1.0 and wilson_interval(1.0, 20)[0] == pytest.approx(20 / (20 + 1.96 ** 2),
                                                                                            abs=1e-3)


def test_length_controlled_win_rate_by_hand():
    """Half the pairs have the model's answer longer (d = +1), half shorter (d = −1). When longer it wins 4
    of 5; when shorter it wins 1, ties 2 and loses 2 of 5 (ties as half: p₋ = 0.4). With two values of d the
    logistic model is saturated: σ(θ₀ + θ₁) = p₊ and σ(θ₀ − θ₁) = p₋, so θ₀ = (logit p₊ + logit p₋)/2 and
    LC = σ(θ₀) = √o/(1 + √o) with o = odds₊·odds₋. Here p₊ = 0.8 (odds 4) and p₋ = 0.4 (odds 2/3): o = 8/3,
    LC = 0.62020, while the raw win rate is 0.6: LC averages the two groups in logit space."""
    prefs = [1, 1, 1, 1, 0] + [1, 0.5, 0.5, 0, 0]  # p₋ = (1 + 0.5 + 0.5)/5 = 0.4
    diffs = [3] * 5 + [-3] * 5  # standardised: ±1
    o = 4 * (2 / 3)
    assert length_controlled(prefs, diffs) == pytest.approx(math.sqrt(o) / (1 + math.sqrt(o)), abs=1e-6)
    stats = win_stats(prefs, diffs)
    assert (stats["win_rate"], stats["wins"], stats["ties"], stats["losses"]) == (0.6, 0.5, 0.2, pytest.approx(0.3))
    assert stats["win_rate_ci"] == pytest.approx(list(wilson_interval(0.6, 10)))
    assert length_controlled([1, 0, 0.5, 1], [2, 2, 2, 2]) == 0.625  # no length difference: the win rate


def test_compare_counts_what_the_judge_says_of_the_sampled_answers(tiny_model, other_model, tmp_path, monkeypatch):
    """Both models sampled with the same seed; the counts, lengths and EOS rates recomputed here from
    sample() directly, judged by a length judge written by hand."""
    (tmp_path / "lengthjudge.py").write_text("def longer(prompt, completion):\n    return len(completion)\n")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "cmp"
    result = compare(str(tiny_model), ref_model=str(other_model), task="addition", judge="lengthjudge:longer",
                     num_prompts=6, temperatures=[0.0, 1.0], max_new_tokens=5, output=str(out))
    tok = load_tokenizer(str(tiny_model))
    m, r = load_model(str(tiny_model)), load_model(str(other_model))
    from dpolab.tasks import load_task

    prompts = list(load_task("addition").eval_prompts[:6])
    for row in result["by_temperature"]:
        a = sample(m, tok, prompts, 1, row["temperature"], 42, 5)
        b = sample(r, tok, prompts, 1, row["temperature"], 42, 5)
        prefs = [1.0 if len(x[0]) > len(y[0]) else 0.5 if len(x[0]) == len(y[0]) else 0.0
                 for x, y in zip(a.completions, b.completions)]
        assert row["win_rate"] == pytest.approx(sum(prefs) / 6)
        assert row["ties"] == pytest.approx(prefs.count(0.5) / 6)
        eos = tok.eos_token_id
        assert row["model"]["eos_rate"] == pytest.approx(sum(t[0][-1:] == [eos] for t in a.token_ids) / 6)
        assert row["reference"]["mean_length"] == pytest.approx(
            sum(len(t[0]) - (t[0][-1:] == [eos]) for t in b.token_ids) / 6)
    saved = json.loads((out / "compare.json").read_text())
    assert saved["by_temperature"] == result["by_temperature"] and (out / "win_rate.png").stat().st_size > 0
    assert saved["judge"] == "function:lengthjudge:longer"


def test_a_model_against_itself_ties_everything_and_a_rerun_judges_nothing(tiny_model, tmp_path, capsys):
    out = tmp_path / "self"
    args = ["compare", "--model", str(tiny_model), "--ref-model", str(tiny_model), "--task", "addition",
            "--num-prompts", "6", "--temperatures", "1", "--max-new-tokens", "4", "--output", str(out), "--json"]
    assert cli.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["win_rate"], result["ties"], result["lc_win_rate"]) == (0.5, 1.0, 0.5)
    lines = (out / "judgments.jsonl").read_text().splitlines()
    assert cli.main(args) == 0 and (out / "judgments.jsonl").read_text().splitlines() == lines


def test_compare_refuses_what_it_cannot_do(tiny_model, capsys):
    assert cli.main(["compare", "--model", str(tiny_model), "--task", "addition"]) == 2
    assert "compare needs --ref-model" in capsys.readouterr().err
    assert cli.main(["compare", "--model", str(tiny_model), "--ref-model", str(tiny_model), "--prompts",
                     "p.txt"]) == 2
    assert "compare --prompts needs --judge" in capsys.readouterr().err


def test_train_with_a_task_reports_the_win_rate_compare_measures(run_config, tmp_path):
    """The win rate in summary.json and the before/after table is the judged win rate at T = 1 that dpolab
    compare measures on the saved final/ against its recorded reference (same prompts, seed and length)."""
    import dpolab
    from dpolab.evaluation.task_eval import format_table

    summary = dpolab.train(**run_config(task="addition", task_prompts=6, task_samples=1, task_max_new_tokens=3,
                                        max_steps=3, learning_rate=3e-3))
    final = tmp_path / "run" / "final"
    measured = compare(str(final), task="addition", num_prompts=6, temperatures=[1.0], max_new_tokens=3,
                       output=str(tmp_path / "cmp"))
    assert summary["judge"] == measured["judge"] == "task:addition"
    assert (summary["win_rate"], summary["win_rate_ci"], summary["lc_win_rate"]) == (
        measured["win_rate"], measured["win_rate_ci"], measured["lc_win_rate"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["win_rate"] == summary["win_rate"]
    row = next(line for line in format_table(summary).splitlines() if line.startswith("win rate vs reference"))
    assert f"{summary['win_rate']:10.3f}" in row and "judged by task:addition" in row


def test_train_refuses_a_judge_without_a_task_and_a_bad_judge_before_training(run_config, tmp_path):
    import dpolab

    with pytest.raises(dpolab.ConfigError, match="judge: dpolab train judges answers to a task's held-out prompts"):
        dpolab.train(**run_config(judge="addition"))
    with pytest.raises(dpolab.DpolabError, match="unknown judge 'nonsense'"):
        dpolab.train(**run_config(task="addition", judge="nonsense"))
    assert not (tmp_path / "run" / "final").exists()
