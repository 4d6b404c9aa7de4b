"""Crash safety, preemption, the non-finite guard and a full disk (issue: reliability)."""

import math
import os
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpolab
from dpolab import cli
from dpolab.errors import TrainingError
from dpolab.evaluation import metrics as M
from dpolab.evaluation.metrics import read_metrics
from dpolab.losses import LOSSES, Loss, sigmoid

TRAIN = ["--batch-size", "4", "--max-steps", "14", "--save-every", "2", "--save-total-limit", "3",
         "--learning-rate", "1e-3", "--eval-split", "0", "--no-progress", "--lr-scheduler", "cosine"]


def launch(model, data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "dpolab.cli", "train", "--model", str(model), "--data", str(data),
                             "--output-dir", str(out), *TRAIN, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))


def wait_for(path: Path, proc, timeout=120):
    t = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t < timeout
        time.sleep(0.005)


def weights(out: Path):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    from tests.conftest import preference_rows, write_jsonl

    root = tmp_path_factory.mktemp("reliability")
    data = write_jsonl(root / "d.jsonl", preference_rows(40))
    proc = launch(tiny_model, data, root / "full")
    assert proc.wait() == 0, proc.communicate()
    return root, data, weights(root / "full")


@pytest.mark.parametrize("moment", ["before-any-checkpoint", "after-step-4", "after-step-10"])
def test_sigkill_then_resume_is_bit_identical(tiny_model, uninterrupted, moment):
    root, data, expected = uninterrupted
    out = root / moment
    proc = launch(tiny_model, data, out)
    marker = {"before-any-checkpoint": out / "config.yaml", "after-step-4": out / "checkpoints/step-4/state.json",
              "after-step-10": out / "checkpoints/step-10/state.json"}[moment]
    wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists()
    resumed = launch(tiny_model, data, out, "--resume")
    assert resumed.wait() == 0, resumed.communicate()
    got = weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(tiny_model, uninterrupted, signum):
    """SIGTERM (preemption) and SIGINT (Ctrl-C): the current step finishes, a checkpoint is saved, the exit
    status is 128 + signal (143, 130) with one line and no traceback; the resumed run is bit-identical."""
    root, data, expected = uninterrupted
    out = root / f"signal-{signum}"
    proc = launch(tiny_model, data, out)
    wait_for(out / "checkpoints/step-2/state.json", proc)
    proc.send_signal(signum)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signum
    assert f"stopped by signal {int(signum)} after step" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "final").exists()
    resumed = launch(tiny_model, data, out, "--resume")
    assert resumed.wait() == 0, resumed.communicate()
    got = weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def nan_grad_loss(bad_calls: set[int]):
    calls = [0]

    def fn(*args, **kwargs):
        losses, rc, rr = sigmoid(*args, **kwargs)
        if calls[0] in bad_calls and torch.is_grad_enabled():
            losses = NanGradient.apply(losses)
        calls[0] += torch.is_grad_enabled()
        return losses, rc, rr

    return Loss("nan_grad_test", fn, params=("label_smoothing",))


def test_a_nonfinite_gradient_with_a_finite_loss_is_skipped(monkeypatch, run_config, tmp_path):
    monkeypatch.setitem(LOSSES, "nan_grad_test", nan_grad_loss({1}))
    out = tmp_path / "g"
    s = dpolab.train(**run_config(loss="nan_grad_test", max_steps=3, save_every=1, save_total_limit=5,
                                  output_dir=str(out)))
    assert s["skipped_steps"] == 1
    rows = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if "grad_norm" in r}
    assert rows[2]["skipped"] == 1 and math.isfinite(rows[2]["loss"]) and math.isnan(rows[2]["grad_norm"])
    assert rows[1]["skipped"] == rows[3]["skipped"] == 0
    w1, w2 = (load_file(str(out / f"checkpoints/step-{k}/model.safetensors")) for k in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # step 2 never reached the weights
    w3 = load_file(str(out / "final/model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w3.values()) and not torch.equal(w3["lm_head.weight"],
                                                                                 w2["lm_head.weight"])


def nan_loss(bad_calls: set[int]):
    """The DPO loss, but NaN on the given calls (0-based): an injected numerical fault."""
    calls = [0]

    def fn(*args, **kwargs):
        losses, rc, rr = sigmoid(*args, **kwargs)
        if calls[0] in bad_calls and torch.is_grad_enabled():
            losses = losses * float("nan")
        calls[0] += torch.is_grad_enabled()
        return losses, rc, rr

    return Loss("nan_test", fn, params=("label_smoothing",))


def test_a_nan_step_is_skipped_and_never_reaches_the_weights(monkeypatch, run_config, tmp_path):
    monkeypatch.setitem(LOSSES, "nan_test", nan_loss({1}))
    s = dpolab.train(**run_config(loss="nan_test", max_steps=3, output_dir=str(tmp_path / "a")))
    assert s["skipped_steps"] == 1
    w = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())


def test_nonfinite_steps_in_a_row_stop_the_run_with_checkpoint_intact(monkeypatch, run_config, tmp_path):
    monkeypatch.setitem(LOSSES, "nan_test", nan_loss(set(range(2, 100))))
    out = tmp_path / "b"
    with pytest.raises(TrainingError, match=r"stopped at step 5: .* 3 steps in a row") as e:
        dpolab.train(**run_config(loss="nan_test", max_steps=8, save_every=1, save_total_limit=5, output_dir=str(out)))
    assert "step-4" in str(e.value)  # names the last checkpoint; its weights equal those after step 2
    w2, w4 = (load_file(str(out / f"checkpoints/step-{k}/model.safetensors")) for k in (2, 4))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)
    assert not (out / "final").exists()


@contextmanager
def file_size_limit(nbytes: int):
    """While inside, the kernel refuses to grow any file of this process past ``nbytes`` (RLIMIT_FSIZE): a
    write then fails inside the real writer (Python's, torch's zip writer, safetensors' Rust writer) exactly
    as on a full disk, only with EFBIG ("File too large") instead of ENOSPC."""
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def fails_on_call(fn, n: int, limit=lambda *a, **k: 1024):
    """``fn``, whose ``n``-th call (1-based) runs under a file size limit, so that its write really fails."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] != n:
            return fn(*args, **kwargs)
        with file_size_limit(limit(*args, **kwargs)):
            return fn(*args, **kwargs)

    return wrapped


def cli_flags(config: dict) -> list[str]:
    return [*sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in config.items() if not isinstance(v, bool)), []),
            "--no-progress"]


# Which write fails, how it is made to fail, the path the message must name, and the checkpoints left.
DISK_CASES = {
    # torch.save of the third checkpoint's optimizer state (calls 1-4 are the first two checkpoints)
    "checkpoint-torch": (lambda mp: mp.setattr(torch, "save", fails_on_call(torch.save, 5)), "checkpoints/step-3"),
    # safetensors of the third checkpoint's weights
    "checkpoint-safetensors": (lambda mp: mp.setattr("dpolab.training.checkpoint.save_file",
                                                     fails_on_call(ckpt_save_file(), 5)), "checkpoints/step-3"),
    # the final model (transformers writes it with safetensors)
    "final": (lambda mp: mp.setattr("transformers.modeling_utils.safe_save_file",
                                    fails_on_call(hf_save_file(), 1)), "final"),
    # metrics.jsonl at the third optimizer step (write 1 is the evaluation before training)
    "metrics": (lambda mp: mp.setattr(M.MetricsLog, "write", fails_on_call(
        M.MetricsLog.write, 4, limit=lambda log, *a: log.path.stat().st_size)), "metrics.jsonl"),
    # the first PNG chart
    "plots": (lambda mp: mp.setattr("matplotlib.figure.Figure.savefig",
                                    fails_on_call(figure_savefig(), 1)), "plots"),
}


def ckpt_save_file():
    import dpolab.training.checkpoint as ck

    return ck.save_file


def hf_save_file():
    import transformers.modeling_utils as mu

    return mu.safe_save_file


def figure_savefig():
    from matplotlib.figure import Figure

    return Figure.savefig


@pytest.mark.parametrize("case", sorted(DISK_CASES))
def test_a_failed_write_keeps_previous_checkpoint_and_says_so(case, monkeypatch, run_config, tmp_path, capsys):
    """Every write a run makes, failing for real (see file_size_limit): one paragraph naming the file and
    the intact checkpoint, exit status 2, no traceback, no half-written folder; the checkpoint loads."""
    inject, path = DISK_CASES[case]
    out = tmp_path / "disk"
    steps = 6 if path.startswith("checkpoints") else 3
    flags = cli_flags(run_config(output_dir=str(out), max_steps=steps, save_every=1))
    inject(monkeypatch)
    code = cli.main(["train", *flags])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    print(err)
    assert f"could not write {out / path}: " in err and "MB free on that file system" in err
    # torch's zip writer reports only a position mismatch; the others pass the OS's reason on
    assert ("torch could not write it ([enforce fail at inline_container.cc" if case == "checkpoint-torch"
            else "File too large") in err
    assert f"the previous checkpoint, {out / 'checkpoints' / 'step-2'}, is intact" in err
    assert "continue with --resume" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]  # no .tmp left
    assert (out / "final").exists() == (case == "plots")  # the charts come after final/, which is complete
    assert not (out / ".final.tmp").exists()
    load_file(str(out / "checkpoints/step-2/model.safetensors"))  # readable


def test_an_unexpected_exception_is_one_paragraph_unless_debugging(monkeypatch, capsys):
    """A bug (not a user mistake) prints what failed, where to report it and how to see the traceback;
    DPOLAB_DEBUG=1 (set for the tests) raises it instead, so programming errors stay visible."""
    def broken(config):
        return {}["steps"]

    monkeypatch.setattr(cli, "train", broken)
    with pytest.raises(KeyError):
        cli.main(["train", "--max-steps", "1"])
    monkeypatch.delenv("DPOLAB_DEBUG")
    assert cli.main(["train", "--max-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("dpolab: internal error: KeyError: 'steps' in test_reliability.py:")
    assert "please report it to the dpolab issue tracker" in err and "DPOLAB_DEBUG=1" in err


def test_half_written_checkpoint_is_ignored(run_config, tmp_path):
    out = tmp_path / "half"
    dpolab.train(**run_config(output_dir=str(out), max_steps=4, save_every=2))
    broken = out / "checkpoints" / "step-3"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 10)  # no state.json: never completed
    from dpolab.training.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-2"]


def test_resume_conflicts_name_what_changes_the_trajectory():
    from dpolab.training.resume import resume_conflicts

    saved = {"batch_size": 8, "seed": 42, "learning_rate": 1e-3, "loss": "sigmoid", "lr_scheduler": "cosine",
             "max_steps": 4, "epochs": 1.0, "eval_every": 0, "save_every": 2, "data": "d.jsonl"}
    same = dict(saved, eval_every=1, save_every=5, progress=False)  # run control, and a key unknown then
    assert resume_conflicts(saved, same) == []
    changed = dict(saved, batch_size=16, seed=1, learning_rate=2e-3, loss="ipo", data="e.jsonl")
    assert resume_conflicts(saved, changed) == ["batch_size (8 → 16)", "seed (42 → 1)", "learning_rate (0.001 → 0.002)",
                                                "loss ('sigmoid' → 'ipo')", "data ('d.jsonl' → 'e.jsonl')"]
    # more steps stretch a cosine schedule (every later learning rate changes), never a constant one
    assert resume_conflicts(saved, dict(saved, max_steps=8)) == ["max_steps (4 → 8)"]
    constant = dict(saved, lr_scheduler="constant")
    assert resume_conflicts(constant, dict(constant, max_steps=8, epochs=3.0)) == []


def test_resume_checks_settings_and_data_and_keeps_eval_before_and_skipped_steps(monkeypatch, run_config, tmp_path,
                                                                                  prefs):
    import shutil

    out = tmp_path / "r"
    monkeypatch.setitem(LOSSES, "nan_test", nan_loss({0}))  # step 1 is skipped
    cfg = run_config(loss="nan_test", max_steps=4, save_every=2, output_dir=str(out))
    full = dpolab.train(**cfg)
    expected = weights(out)
    assert full["skipped_steps"] == 1 and full["eval_before"]
    shutil.rmtree(out / "final")  # as if killed after the step-2 checkpoint
    (out / "summary.json").unlink()

    import dpolab.training.loop as T

    monkeypatch.setattr(T, "load_tokenizer", lambda *a: pytest.fail("a changed setting must be refused first"))
    with pytest.raises(dpolab.ConfigError, match=r"cannot resume: batch_size \(8 → 4\), seed \(42 → 1\) differ "
                                                 r"from .*config\.yaml"):
        dpolab.train(**dict(cfg, resume=True, batch_size=4, seed=1))
    monkeypatch.undo()
    monkeypatch.setitem(LOSSES, "nan_test", nan_loss(set()))

    original = prefs.read_text()
    prefs.write_text(original.replace("is good", "is very good", 1))  # same file name, other rows
    with pytest.raises(dpolab.ConfigError, match="the training rows differ from the ones it was trained on"):
        dpolab.train(**dict(cfg, resume=True))
    prefs.write_text(original)

    resumed = dpolab.train(**dict(cfg, resume=True, log_every=2, eval_every=1))  # run control may change
    assert resumed["skipped_steps"] == 1  # counted before the checkpoint, carried in its state
    assert resumed["eval_before"] == full["eval_before"]
    got = weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
