"""Crash safety, preemption, the non-finite guard and a full disk (issue: reliability)."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpolab
from dpolab import cli
from dpolab.errors import DpolabError, TrainingError
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


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model, uninterrupted):
    root, data, expected = uninterrupted
    out = root / "sigterm"
    proc = launch(tiny_model, data, out)
    wait_for(out / "checkpoints/step-2/state.json", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by signal" in err and "--resume" in err and "Traceback" not in err
    assert not (out / "final").exists()
    resumed = launch(tiny_model, data, out, "--resume")
    assert resumed.wait() == 0
    got = weights(out)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


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


def test_full_disk_keeps_previous_checkpoint_and_says_so(monkeypatch, run_config, tmp_path, capsys):
    import dpolab.checkpoint as ck

    real_save, calls = torch.save, [0]

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] > 4:  # the third checkpoint runs out of space
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ck.torch, "save", save)
    out = tmp_path / "disk"
    code = cli.main(["train", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in run_config(
        output_dir=str(out), max_steps=6, save_every=1).items() if not isinstance(v, bool)), []), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "previous checkpoints are intact" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    load_file(str(out / "checkpoints/step-2/model.safetensors"))  # readable


def test_half_written_checkpoint_is_ignored(run_config, tmp_path):
    out = tmp_path / "half"
    dpolab.train(**run_config(output_dir=str(out), max_steps=4, save_every=2))
    broken = out / "checkpoints" / "step-3"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 10)  # no state.json: never completed
    from dpolab.checkpoint import list_checkpoints

    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-2"]
