# `make demo` and `make test` create .venv when it is missing or older than the requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: demo test test-fast venv bench clean-demo

$(STAMP): requirements.txt requirements-dev.txt
	@$(PY) -c "import sys" 2>/dev/null || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) demo.py --nproc $(NPROC)

test: $(STAMP)
	$(PY) -m pytest -q tests

# without the tests marked slow (demo chain, bench scripts, notebooks, the 256 px chain, ...)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# CPU figures in BENCHMARKS.md: one pinned thread, plus 2 ranks under torchrun (about 10 minutes)
bench: $(STAMP)
	$(PY) bench/shards.py   # unpinned: its 2-worker figure needs both cores
	taskset -c 0 $(PY) bench/vqgan_step.py --preset b64 --batch-size 8
	taskset -c 0 $(PY) bench/quantizer.py --preset b64 --batch-size 8
	taskset -c 0 $(PY) bench/gpt.py --preset g256 --batch-size 8

clean-demo:
	rm -rf demo
