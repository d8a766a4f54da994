# omero-hwsi developer and demo commands. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
EXTRAS ?= worker,qupath,jobs,dev
STAMP := $(VENV)/.installed
OMERO_STAMP := $(VENV)/.omero-installed
WHEELS := $${XDG_CACHE_HOME:-$$HOME/.cache}/omero-hwsi/wheels
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: help setup setup-omero services demo demo-model test test-fast bench ablation lint typecheck clean

help:
	@echo "make demo       set up, then analyse a synthetic slide (answers beside ground truth) and the"
	@echo "                embedded CMU slide with the default model, into $(DEMO_OUT)/"
	@echo "make demo-model retrain the embedded demo model (about 10 min on 2 cores)"
	@echo "make test       set up, start local services, run every test (slow ones included)"
	@echo "make test-fast  the edit loop: tests not marked slow"
	@echo "make services   install (if missing) and start PostgreSQL, Redis and RabbitMQ"
	@echo "make setup-omero add omero-py (builds and caches the zeroc-ice 3.6.5 wheel once, ~13 min)"
	@echo "make bench      run the benchmarks in bench/ (prints ratios)"
	@echo "make ablation   the scale ablation of the demo recipe (about 20 min on 2 cores)"

# The venv is (re)built when pyproject.toml changes. torch is installed explicitly first so that
# pip takes the pinned CPU build instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

# The omero extra: omero-py needs zeroc-ice 3.6.5, built once per machine from its source
# distribution with two Python 3.11 fixes and cached in $(WHEELS) (about 13 min the first time).
$(OMERO_STAMP): $(STAMP) scripts/build_zeroc_ice.sh
	bash scripts/build_zeroc_ice.sh $(PY)
	$(PY) -m pip install --quiet --find-links $(WHEELS) -e '.[$(EXTRAS),omero]'
	touch $(OMERO_STAMP)

setup-omero: $(OMERO_STAMP)

services:
	bash scripts/services.sh

demo: setup
	rm -rf $(DEMO_OUT)
	$(PY) scripts/demo.py --out $(DEMO_OUT)

demo-model: setup
	$(PY) scripts/train_demo_model.py --work build/demo-recipe --install

test: setup setup-omero services
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup setup-omero
	$(PY) -m pytest -m "not slow" -x -q $(PYTEST_ARGS)

bench: setup services
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_evidence.py
	$(PY) bench/bench_jobs.py

ablation: setup
	$(PY) bench/ablation.py

lint: setup
	$(VENV)/bin/ruff check omero_hwsi qupath_bridge tests bench

typecheck: setup
	$(VENV)/bin/mypy omero_hwsi qupath_bridge

clean:
	rm -rf $(DEMO_OUT) .pytest_cache bench/output
