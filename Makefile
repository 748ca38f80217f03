# Two commands: `make demo` runs the default pipeline, `make test` runs the tests.
# Both create .venv on first use. CPU torch (torch==2.13.0) is installed only when no torch is
# present: GPU users install their CUDA torch into .venv first and it is kept.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

demo: $(STAMP)
	$(BIN)/rlhf run --config configs/demo.yaml --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/sft_vs_trl.py
	$(BIN)/python benchmarks/rm_vs_trl.py
	$(BIN)/python benchmarks/dpo_vs_trl.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/lm_loss.py
	$(BIN)/python benchmarks/ppo_iteration.py
	$(BIN)/python benchmarks/ppo_memory.py

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	@# The feedback app's browser test drives Debian's chromium through Playwright (best effort: needs root and apt).
	test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "warning: could not install chromium; the browser test will be skipped"
	touch $(STAMP)

clean:
	rm -rf runs
