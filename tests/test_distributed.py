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

from dpolab.evaluation.metrics import read_metrics

pytestmark = pytest.mark.slow  # make test-fast skips it; make test runs it

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RUNNABLE_HERE = {"single-gpu.yaml", "cpu-ddp-2proc.yaml"}  # the others need GPUs (or DeepSpeed)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(cmd: list[str], timeout: int = 600) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]


def two_processes(args: list[str], timeout: int = 120) -> list[subprocess.CompletedProcess]:
    """``dpolab`` as torchrun would start it on two ranks (the same environment variables), without the
    launcher's own error report, so that each rank's stderr is what a user sees from it."""
    port, procs = free_port(), []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen([str(BIN / "dpolab"), *args], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


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
    from dpolab.training.distributed import check_supported

    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    check_supported(cpu, save_every=2, resume=False, grad_accum=2)  # DDP: everything allowed
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(dpolab.ConfigError, match="asks for FSDP"):
        check_supported(cpu, save_every=0, resume=False, grad_accum=1)
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    with pytest.raises(dpolab.ConfigError, match="checkpoints are not supported under FSDP"):
        check_supported(fsdp, save_every=500, resume=False, grad_accum=1)
    check_supported(fsdp, save_every=0, resume=False, grad_accum=1)


def unpaired(rows: list[dict]) -> list[dict]:
    return [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"} for r in rows
            for key in ("chosen", "rejected")]


def test_kto_evaluation_with_an_odd_eval_set_under_two_processes(tiny_model, tmp_path):
    """KTO's batch KL estimate is gathered over the processes. With 9 held-out rows the ranks get 5 and 4:
    every rank must still make the same collective calls (the short share is padded with a masked copy),
    and the metrics, the gathered KL and the losses included, must equal the one-process run's (the loss's
    reference point z is the KL estimate over the whole global batch, on every process)."""
    import dpolab
    from tests.conftest import preference_rows, write_jsonl

    train = write_jsonl(tmp_path / "train.jsonl", unpaired(preference_rows(16)))
    held = write_jsonl(tmp_path / "eval.jsonl", unpaired(preference_rows(5, seed=3))[:9])
    flags = dict(model=str(tiny_model), data=str(train), eval_data=str(held), loss="kto", batch_size=4,
                 max_steps=2, learning_rate=1e-3, save_every=0, progress=False)
    dpolab.train(**flags, output_dir=str(tmp_path / "one"))
    cli_flags = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items() if k != "progress"]
    launch([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(), "--no-python",
            str(BIN / "dpolab"), "train", *cli_flags, "--no-progress", "--output-dir", str(tmp_path / "two")],
           timeout=300)
    one, two = steps(tmp_path / "one"), steps(tmp_path / "two")
    evals = [r for r in one if "eval/kl" in r]
    assert len(evals) == 2 and [r["step"] for r in one] == [r["step"] for r in two]
    for x, y in zip(one, two):
        for k in x:
            if k != "tokens_per_second":
                assert y[k] == pytest.approx(x[k], abs=1e-5), (x["step"], k)
    assert evals[-1]["eval/kl"] > 0  # the KL compared above is not trivially 0


def test_batch_size_not_divisible_by_processes_is_refused_before_loading(tmp_path):
    """6 examples per step cannot be split over 2 processes × 2 micro-batches: both ranks say so, before
    anything is read (the model and data paths do not even exist), in one paragraph."""
    out = tmp_path / "o"
    for r in two_processes(["train", "--model", "/nonexistent", "--data", "/nonexistent.jsonl", "--output-dir",
                            str(out), "--batch-size", "6", "--grad-accum", "2"]):
        assert r.returncode == 2, r.stderr[-2000:]
        assert "batch_size 6 must be divisible by processes × grad_accum = 2 × 2" in r.stderr
        assert "Traceback" not in r.stderr
    assert not out.exists()


def test_sharding_refuses_a_frozen_reference_copy_and_a_signal_saves_nothing(monkeypatch, run_config, tmp_path):
    """Under FSDP (here: dpolab told it is sharded) a live frozen copy of the policy would sit whole on every
    device: refused unless precomputed, LoRA or an explicit --ref-model. A signal then stops the run like
    --save-every: no checkpoint (they are refused under sharding), exit status 128 + signal."""
    import signal as sig

    import dpolab
    import dpolab.training.distributed as D
    from dpolab.errors import Interrupted
    from dpolab.losses import LOSSES, Loss, sigmoid

    monkeypatch.setattr(D, "engine", lambda accelerator: "fsdp")
    with pytest.raises(dpolab.ConfigError, match="the reference would be a frozen copy of the policy held whole"):
        dpolab.train(**run_config(output_dir=str(tmp_path / "a")))

    def terminated_at_step_2(*args, _calls=[0], **kwargs):
        _calls[0] += torch.is_grad_enabled()
        if _calls[0] == 2 and torch.is_grad_enabled():
            os.kill(os.getpid(), sig.SIGTERM)  # arrives mid-step; the step finishes first
        return sigmoid(*args, **kwargs)

    monkeypatch.setitem(LOSSES, "sigterm_test", Loss("sigterm_test", terminated_at_step_2, params=("label_smoothing",)))
    out = tmp_path / "b"
    with pytest.raises(Interrupted, match=r"stopped by signal 15 after step 2; no checkpoint was saved \(resumable "
                                          "checkpoints are not supported under FSDP") as e:
        dpolab.train(**run_config(output_dir=str(out), loss="sigterm_test", precompute_ref=True, max_steps=4))
    assert e.value.exit_code == 143
    assert not (out / "checkpoints").exists() and not (out / "final").exists()


def test_fsdp2_on_two_cpu_processes_follows_one_process(tiny_model, prefs, tmp_path):
    """The policy sharded with FSDP2 over two CPU processes (gloo), through dpolab's own training step,
    evaluation and full-weight gathering for final/ (tests/fsdp_cpu.py shards it, as Accelerate would on
    GPUs), follows the one-process run. Tolerance 1e-5, as for DDP: the reduce-scatter averages the two
    processes' gradient sums where one process sums every example in one backward, so only the floating-point
    summation order differs (observed: metrics 1.4e-6, weights 6e-7 apart after 4 AdamW steps at lr 1e-3)."""
    import subprocess

    import dpolab

    flags = dict(model=str(tiny_model), data=str(prefs), batch_size=8, grad_accum=2, max_steps=4,
                 learning_rate=1e-3, eval_split=0.27, precompute_ref=True, save_every=0)
    dpolab.train(**flags, output_dir=str(tmp_path / "one"), progress=False)
    args = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in flags.items()]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", free_port(),
                           str(ROOT / "tests" / "fsdp_cpu.py"), "train", *args, "--no-progress", "--output-dir",
                           str(tmp_path / "fsdp")], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    held = [line for line in done.stderr.splitlines() if line.startswith("fsdp_cpu: rank")]
    assert len(held) == 2
    for line in held:  # each process holds about half of the weights
        here, total = map(int, line.split(" holds ")[1].split(" parameters")[0].split(" of "))
        assert 0.4 * total < here < 0.6 * total
    assert_same_run(tmp_path / "one", tmp_path / "fsdp", 1e-5)
