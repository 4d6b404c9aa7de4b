"""The alarms of dpolab.training.diagnostics: each triggered by a history built so that the step it fires at is
worked out by hand, and silent on one that does not qualify; then on real runs of the embedded default."""

import dataclasses
import json

import pytest

import dpolab
from dpolab.config import Config
from dpolab.embedded import TRAIN
from dpolab.training import diagnostics as D

T = D.Thresholds()  # window 5, patience 50, ...


def history(n: int, **curves) -> list[dict]:
    """Steps 1..n; each metric a function of the step (defaults: a learning DPO run)."""
    base = {"loss": lambda s: 0.69 - 0.002 * s, "rewards/chosen": lambda s: 0.01 * s,
            "rewards/rejected": lambda s: -0.02 * s, "rewards/margins": lambda s: 0.03 * s,
            "rewards/accuracies": lambda s: 0.7, "logps/chosen": lambda s: -1.0 + 0.01 * s,
            "logps/ref_chosen": lambda s: -10.0, "lengths/chosen": lambda s: 10.0, "skipped": lambda s: 0.0}
    base |= curves
    return [{"step": s, **{k: f(s) for k, f in base.items()}} for s in range(1, n + 1)]


def fired(h: list[dict]) -> dict[str, int]:
    return {a.name: a.step for a in D.scan(h)}


def test_a_learning_run_raises_nothing():
    assert fired(history(200)) == {}


def test_displacement():
    # logps/chosen = −1 − 0.04(s−1): the first window (s = 1..5) averages −1.08, the last one ending at n averages
    # −1 − 0.04(n−3), so the fall is 0.04(n−5) > 0.25 first at n = 12 (0.28; n = 11 gives 0.24). The margin
    # 0.05(s−1) has grown by 0.05(n−5) = 0.35 > 0.05 there. Raised once, though the fall goes on.
    h = history(60, **{"logps/chosen": lambda s: -1 - 0.04 * (s - 1), "rewards/margins": lambda s: 0.05 * (s - 1)})
    assert fired(h) == {"displacement": 12}
    # the same fall with a margin that does not grow is not displacement (margin_stalled says so at step 50)
    h = history(60, **{"logps/chosen": lambda s: -1 - 0.04 * (s - 1), "rewards/margins": lambda s: 0.0})
    assert "displacement" not in fired(h)


def test_not_learning():
    flat = {"loss": lambda s: 0.6931, "rewards/chosen": lambda s: 0.001, "rewards/rejected": lambda s: -0.001,
            "rewards/margins": lambda s: 0.002}
    assert fired(history(80, **flat)) == {"not_learning": 50}  # judged first at patience, 50 steps
    assert fired(history(49, **flat)) == {}
    moving = flat | {"rewards/chosen": lambda s: 0.001 * s, "rewards/margins": lambda s: 0.001 * s}
    assert "not_learning" not in fired(history(80, **moving))  # |r_c| = 0.046 > 0.01 in the last window at 50


def test_margin_stalled():
    parallel = {"rewards/chosen": lambda s: 0.1 * s, "rewards/rejected": lambda s: 0.1 * s,
                "rewards/margins": lambda s: 0.0}
    assert fired(history(80, **parallel)) == {"margin_stalled": 50}
    # a margin 0.002·s grows by 0.002·(n − 5) = 0.09 > 0.05 by n = 50: silent
    assert fired(history(80, **parallel | {"rewards/margins": lambda s: 0.002 * s})) == {}


def test_too_easy():
    # accuracy 0 at step 1 (policy = reference: ties), then 1: the window s−4..s is all ones first at s = 6
    assert fired(history(30, **{"rewards/accuracies": lambda s: 0.0 if s == 1 else 1.0})) == {"too_easy": 6}
    # the same accuracy reached after step 20 is learning, not easy pairs
    assert fired(history(40, **{"rewards/accuracies": lambda s: 1.0 if s > 20 else 0.8})) == {}


def test_reference_collapse():
    # −60 nats over 10 tokens is −6 per token < −5 (token probability e^−6 ≈ 0.0025); −40 / 10 = −4 is not
    assert fired(history(20, **{"logps/ref_chosen": lambda s: -60.0})) == {"reference_collapse": 5}
    assert fired(history(20, **{"logps/ref_chosen": lambda s: -40.0})) == {}
    assert fired(history(20, **{"logps/ref_chosen": lambda s: 0.0})) == {}  # reference-free: no reference


def test_nonfinite():
    assert fired(history(20, skipped=lambda s: float(s in (7, 8)))) == {"nonfinite": 7}
    assert fired(history(20)) == {}


def test_length_growth():
    alarms = D.Alarms()
    assert alarms.after_training({"task_length_before": 3.6, "task_length_after": 3.601}, 130) == []
    got = alarms.after_training({"task_length_before": 4.0, "task_length_after": 5.0}, 130)  # +25 % > 20 %
    assert [(a["name"], a["step"]) for a in got] == [("length_growth", 130)]
    assert set(got[0]) == {"name", "step", "message", "remedy"}


def test_thresholds_are_settable_config_fields_with_the_same_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(Config)}
    assert {k: fields[f"alarm_{k}"] for k in D.Thresholds._fields} == D.Thresholds()._asdict()
    # with a threshold of 0.9 nats the fall 0.04(n − 5) passes it at n = 28 (0.92; n = 27 gives 0.88)
    h = history(60, **{"logps/chosen": lambda s: -1 - 0.04 * (s - 1), "rewards/margins": lambda s: 0.05 * (s - 1)})
    assert [(a.name, a.step) for a in D.scan(h, D.Thresholds(logp_drop=0.9))] == [("displacement", 28)]


def _alarms(out) -> list[tuple[str, int]]:
    summary = json.loads((out / "summary.json").read_text())
    return [(a["name"], a["step"]) for a in summary["diagnostics"]]


@pytest.mark.slow
def test_the_displacing_recipe_raises_displacement_and_the_default_none(tmp_path):
    """docs/default-task.md run A (β 0.1, learning rate 1e-4, 2 epochs) against the default recipe (β 2, 2e-4):
    130 steps each, no task evaluation (the alarms read the training curves only)."""
    dpolab.train(output_dir=str(tmp_path / "a"), beta=0.1, learning_rate=1e-4, epochs=2, task=None, eval_every=0,
                 progress=False)
    assert [name for name, _ in _alarms(tmp_path / "a")] == ["displacement"]
    dpolab.train(output_dir=str(tmp_path / "default"), task=None, eval_every=0, progress=False)
    assert _alarms(tmp_path / "default") == []


@pytest.mark.slow
def test_pairs_the_model_already_ranks_right_are_too_easy(tmp_path):
    """The right sums against a rejected "99999" (no sum of two 2-digit numbers): separated at once."""
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()[:320]]
    data = tmp_path / "easy.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": "99999"}) + "\n"
                            for r in rows))
    dpolab.train(model=str(TRAIN.parent / "model"), data=str(data), output_dir=str(tmp_path / "easy"), beta=2.0,
                 learning_rate=2e-4, batch_size=32, max_steps=20, eval_split=0, max_length=32, max_prompt_length=16,
                 progress=False)
    assert "too_easy" in [name for name, _ in _alarms(tmp_path / "easy")]


def test_data_with_no_signal_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """Every row's chosen equals its rejected: one paragraph naming the file, no model loaded, no final/."""
    from dpolab.errors import DataError
    from dpolab.models import adapters

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(adapters, "load_policy", no_model)
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 1)}) + "\n"
                            for a in range(10, 50)))
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"same\.jsonl: in every one of its 40 rows the chosen answer equals"):
        dpolab.train(model=str(TRAIN.parent / "model"), data=str(data), output_dir=str(out), progress=False)
    assert not (out / "final").exists()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[3]["rejected"] = "0"  # one row with a preference is signal enough to pass this check
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(AssertionError, match="a model was loaded"):
        dpolab.train(model=str(TRAIN.parent / "model"), data=str(data), output_dir=str(out), progress=False,
                     batch_size=8, overwrite=True)


def test_a_resumed_run_replays_its_metrics_log(tmp_path):
    """The alarms of a resumed run come from its metrics.jsonl (eval rows left out), as if never interrupted."""
    h = history(60, **{"logps/chosen": lambda s: -1 - 0.04 * (s - 1), "rewards/margins": lambda s: 0.05 * (s - 1)})
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(row) + "\n" for row in h[:30])
                   + json.dumps({"step": 30, "eval/loss": 0.5, "eval/rewards/margins": 9.0}) + "\n")
    alarms = D.replay(T, log)
    assert [(a.name, a.step) for a in alarms.raised] == [("displacement", 12)]
    for row in h[30:]:
        alarms.observe(row["step"], {k: v for k, v in row.items() if k != "step"})
    assert [(a.name, a.step) for a in alarms.raised] == [("displacement", 12)]  # once, as in a run never stopped


def test_the_plots_mark_each_alarm_at_its_step(tmp_path):
    """The dotted red line is where its step is: none without alarms; at step 15 right of the one at step 5,
    at the same distance from a line at step 10 (a linear step axis)."""
    import numpy as np
    from PIL import Image

    from dpolab.evaluation.plots import plot_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(row) + "\n" for row in history(20)))

    def red_columns(step):
        out = tmp_path / f"p{step}"
        plot_metrics(log, out, [] if step is None else [{"name": "x", "step": step, "message": "", "remedy": ""}])
        rgb = np.asarray(Image.open(out / "loss.png").convert("RGB")).astype(int)
        red = (rgb[..., 0] > 180) & (rgb[..., 1] < 80) & (rgb[..., 2] < 100)  # crimson
        cols = np.nonzero(red.sum(0) > 20)[0]  # a vertical line, not the label
        return cols.mean() if len(cols) else None

    assert red_columns(None) is None
    x5, x10, x15 = red_columns(5), red_columns(10), red_columns(15)
    assert x5 < x10 < x15 and abs((x15 - x10) - (x10 - x5)) <= 1.5


def test_data_whose_every_row_is_dropped_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    from dpolab.errors import DataError
    from dpolab.models import adapters

    monkeypatch.setattr(adapters, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"prompt": "1+1=", "chosen": 2, "rejected": "3"}) + "\n" for _ in range(5)))
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable rows \(5 invalid\)"):
        dpolab.train(model=str(TRAIN.parent / "model"), data=str(data), output_dir=str(out), progress=False,
                     skip_invalid=True)
    assert not (out / "final").exists()
