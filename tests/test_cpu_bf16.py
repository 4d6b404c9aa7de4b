"""--bf16 on a CPU without native bfloat16 arithmetic: PyTorch's bf16 matmuls take a slow path there (on the
AVX2-only CPU of docs/performance.md 0.3 GFLOP/s against fp32's 96 for 2048² products), so training warns."""

import logging

import dpolab
from dpolab import builder


def cpuinfo(tmp_path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return str(path)


def test_cpu_features_decide(tmp_path):
    amd = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
    sapphire = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    graviton = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert builder.cpu_lacks_bf16(cpuinfo(tmp_path, amd))
    assert not builder.cpu_lacks_bf16(cpuinfo(tmp_path, sapphire))
    assert not builder.cpu_lacks_bf16(cpuinfo(tmp_path, graviton))
    assert not builder.cpu_lacks_bf16(cpuinfo(tmp_path, "no features listed\n"))
    assert not builder.cpu_lacks_bf16(str(tmp_path / "missing"))


def test_training_with_bf16_on_such_a_cpu_warns(run_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(builder, "cpu_lacks_bf16", lambda: True)
    with caplog.at_level(logging.WARNING, logger="dpolab"):
        dpolab.train(**run_config(output_dir=str(tmp_path / "bf16"), bf16=True, max_steps=1, eval_split=0))
    assert any("no native bfloat16 arithmetic" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpolab"):
        dpolab.train(**run_config(output_dir=str(tmp_path / "fp32"), max_steps=1, eval_split=0))
    assert not any("bfloat16" in r.getMessage() for r in caplog.records)
