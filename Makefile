# Two commands: `make demo` runs the default pipeline, `make test` runs the tests.
# Both create .venv on first use. CPU torch (torch==2.13.0) is installed only when no torch is
# present: GPU users install their CUDA torch into .venv first and it is kept.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# --no-compile: pip would otherwise byte-compile every file of every package (transformers, torch, pandas...),
# which is half of the set-up's time; Python compiles what a run imports instead.
PIP    := $(BIN)/python -m pip install -q --no-compile

.PHONY: demo test install bench clean

demo: $(STAMP)
	$(BIN)/rlhf run --config configs/demo.yaml --out runs/demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(PIP) -e ".[bench]"
	$(BIN)/python benchmarks/sft_vs_trl.py
	$(BIN)/python benchmarks/rm_vs_trl.py
	$(BIN)/python benchmarks/dpo_vs_trl.py
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/lm_loss.py
	$(BIN)/python benchmarks/ppo_iteration.py
	$(BIN)/python benchmarks/ppo_memory.py

install: $(STAMP)

# What the pipeline needs (TensorBoard included: every stage writes its curves for it).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	touch $(STAMP)

# The tests start many short Python processes: byte-compile the environment once (what pip does by default), so
# that each of them does not compile its imports again where PYTHONDONTWRITEBYTECODE is set. compileall exits
# non-zero on the files some packages ship that are not meant to compile (templates, Python 2 examples).
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib >/dev/null || true
	@# The feedback app's browser test drives Debian's chromium through Playwright (best effort: needs root and apt).
	test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "warning: could not install chromium; the browser test will be skipped"
	touch $(TEST_STAMP)

clean:
	rm -rf runs
