# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

# torch is pinned to the CPU wheel first, so that no later requirement pulls the CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(STAMP)

# The test and benchmark tools (pytest, hypothesis, TRL for parity checks) on top.
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP)

.PHONY: install demo test test-fast bench clean
install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/dpolab train --output-dir runs/demo --overwrite

test: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The inner loop: every test but those marked slow (whole runs in subprocesses, two-process launches).
test-fast: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs

# Speed and memory against TRL 1.16, MFU, scaling (~15 minutes; results in bench/results/, see docs/performance.md).
bench: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/vs_trl.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/flops.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/scaling.py
