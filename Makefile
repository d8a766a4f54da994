# omero-hwsi developer and demo commands. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
EXTRAS ?= worker,qupath,jobs,dev
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: help setup services demo demo-model test test-fast bench ablation lint typecheck clean

help:
	@echo "make demo       set up, then analyse a synthetic slide (answers beside ground truth) and the"
	@echo "                embedded CMU slide with the default model, into $(DEMO_OUT)/"
	@echo "make demo-model retrain the embedded demo model (about 10 min on 2 cores)"
	@echo "make test       set up, start local services, run every test (slow ones included)"
	@echo "make test-fast  the edit loop: tests not marked slow"
	@echo "make services   install (if missing) and start PostgreSQL, Redis and RabbitMQ"
	@echo "make bench      run the benchmarks in bench/ (prints ratios)"
	@echo "make ablation   the scale ablation of the demo recipe (about 35 min on 2 cores)"

# The venv is (re)built when pyproject.toml changes. torch is installed explicitly first so that
# pip takes the pinned CPU build instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

services:
	bash scripts/services.sh

demo: setup
	rm -rf $(DEMO_OUT)
	$(PY) scripts/demo.py --out $(DEMO_OUT)

demo-model: setup
	$(PY) scripts/train_demo_model.py --work build/demo-recipe --install

test: setup services
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" -x -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_evidence.py

ablation: setup
	$(PY) bench/ablation.py

lint: setup
	$(VENV)/bin/ruff check omero_hwsi qupath_bridge tests bench

typecheck: setup
	$(VENV)/bin/mypy omero_hwsi qupath_bridge

clean:
	rm -rf $(DEMO_OUT) .pytest_cache bench/output
