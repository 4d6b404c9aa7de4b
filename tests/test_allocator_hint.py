"""Training on the CPU names an installed tcmalloc to preload: glibc's malloc keeps the pages of freed
activations, so the peak RSS runs above what is live (docs/performance.md measures both allocators)."""

import logging

import dpolab
from dpolab import builder

TCMALLOC = "libtcmalloc_minimal.so.4"


def installed(monkeypatch, *names):
    monkeypatch.setattr(builder.ctypes.util, "find_library", lambda name: TCMALLOC if name in names else None)


def test_find_tcmalloc_asks_the_linker_for_either_name(monkeypatch):
    for names in (("tcmalloc_minimal",), ("tcmalloc",)):
        installed(monkeypatch, *names)
        assert builder.find_tcmalloc() == TCMALLOC
    installed(monkeypatch)
    assert builder.find_tcmalloc() is None


def test_the_hint_names_tcmalloc_where_it_is_installed_and_not_preloaded(monkeypatch):
    monkeypatch.setattr(builder.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(builder, "find_tcmalloc", lambda: TCMALLOC)
    assert f"LD_PRELOAD={TCMALLOC}" in builder.allocator_hint()
    for preloaded in (f"/usr/lib/x86_64-linux-gnu/{TCMALLOC}", "libjemalloc.so.2"):
        monkeypatch.setenv("LD_PRELOAD", preloaded)
        assert builder.allocator_hint() is None
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setattr(builder, "find_tcmalloc", lambda: None)  # none installed: nothing to suggest
    assert builder.allocator_hint() is None
    monkeypatch.setattr(builder, "find_tcmalloc", lambda: TCMALLOC)
    monkeypatch.setattr(builder.platform, "libc_ver", lambda: ("", ""))  # musl, macOS: not glibc's malloc
    assert builder.allocator_hint() is None


def test_training_on_the_cpu_logs_it(run_config, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(builder.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(builder, "find_tcmalloc", lambda: TCMALLOC)
    with caplog.at_level(logging.INFO, logger="dpolab"):
        dpolab.train(**run_config(output_dir=str(tmp_path / "run"), max_steps=1, eval_split=0))
    assert any(f"LD_PRELOAD={TCMALLOC}" in r.getMessage() for r in caplog.records)
