"""Multi-process runs on CPU (gloo), launched exactly as docs/scaling.md says: one process and two follow
the same trajectory, the precomputed reference is split over the ranks, and resume under two processes
equals the uninterrupted two-process run. Also: every shipped launch config is valid for Accelerate."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RUNNABLE_HERE = {"single-gpu.yaml", "cpu-ddp-2proc.yaml"}  # the others need GPUs (or DeepSpeed)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def train_flags(model, ref, data, out) -> list[str]:
    # 8 examples per step: 2 processes × grad_accum 2 × 2; held-out 17 rows split 9/8 over the ranks.
    return ["train", "--model", str(model), "--ref-model", str(ref), "--precompute-ref", "--data", str(data),
            "--output-dir", str(out), "--batch-size", "8", "--grad-accum", "2", "--max-steps", "4",
            "--save-every", "2", "--learning-rate", "1e-3", "--eval-split", "0.27", "--no-progress"]


def steps(out) -> list[dict]:
    return read_metrics(Path(out) / "metrics.jsonl")


def assert_same_run(a: Path, b: Path, tol: float, skip=("tokens_per_second",)) -> None:
    ra, rb = steps(a), steps(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) == 6  # eval, 4 steps, eval
    for x, y in zip(ra, rb):
        for k in x:
            if k not in skip:
                assert y[k] == pytest.approx(x[k], abs=tol), (x["step"], k)
    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=tol, rtol=0)


def test_two_processes_follow_one_process_and_resume_exactly(tiny_model, other_model, prefs, tmp_path):
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    flags = lambda out: train_flags(tiny_model, other_model, prefs, out)
    # One process, through the single-device config.
    launch([str(BIN / "accelerate"), "launch", "--config_file", "configs/single-gpu.yaml", "-m", "dpolab.cli",
            *flags(one)])
    # Two processes through torchrun and the console script.
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), "--no-python",
            str(BIN / "dpolab"), *flags(two)])
    assert_same_run(one, two, 1e-5)
    # The reference table, computed half by each rank and summed, is the one-process table.
    tables = lambda out: {p.name: load_file(str(p))["logps"] for p in (out / "ref_cache").glob("*.safetensors")}
    t1, t2 = tables(one), tables(two)
    assert t1.keys() == t2.keys() and len(t1) == 2
    for k in t1:
        assert (t1[k] != 0).all()
        torch.testing.assert_close(t1[k], t2[k], atol=1e-5, rtol=0)
    # Crash after step 2, resume with two processes through accelerate launch and the CPU DDP config
    # (the reference table is then read by the main process and broadcast).
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "final")
    assert [p.name for p in (resumed / "checkpoints").iterdir()] == ["step-2"]
    launch([str(BIN / "accelerate"), "launch", "--config_file", "configs/cpu-ddp-2proc.yaml", "--main_process_port",
            free_port(), "-m", "dpolab.cli", *flags(resumed), "--resume"])
    assert_same_run(two, resumed, 1e-5, skip=("tokens_per_second",))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_launch_configs_are_valid(path):
    from accelerate.commands.config.config_args import load_config_from_file

    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and len(first) > 20, "each config opens with what it is for"
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    runnable = config.distributed_type in ("NO", "MULTI_CPU") or str(config.distributed_type).endswith(("NO", "CPU"))
    assert runnable == (path.name in RUNNABLE_HERE), "a config that can run on CPU must be run by a test"
    assert path.name in (ROOT / "docs" / "scaling.md").read_text(), "docs/scaling.md explains every config"


def test_a_sharding_config_that_accelerate_cannot_honour_is_refused(monkeypatch):
    """On CPU, Accelerate 1.15 ignores an FSDP launch config and sets up DDP: dpolab must not run silently."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import dpolab
    from dpolab.distributed import check_supported

    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    check_supported(cpu, save_every=2, resume=False, grad_accum=2)  # DDP: everything allowed
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(dpolab.ConfigError, match="asks for FSDP"):
        check_supported(cpu, save_every=0, resume=False, grad_accum=1)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(dpolab.ConfigError, match="checkpoints are not supported under FSDP"):
        check_supported(fsdp, save_every=500, resume=False, grad_accum=1)
    check_supported(fsdp, save_every=0, resume=False, grad_accum=1)
