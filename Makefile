# omero-hwsi developer and demo commands. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
EXTRAS ?= worker,qupath,dev
STAMP := $(VENV)/.installed
DEMO_SLIDE ?= tests/data/CMU-1-Small-Region.svs
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: help setup services demo test test-fast bench lint typecheck clean

help:
	@echo "make demo       set up, then tile and extract the embedded demo slide into $(DEMO_OUT)/"
	@echo "make test       set up, start local services, run every test (slow ones included)"
	@echo "make test-fast  the edit loop: tests not marked slow"
	@echo "make services   install (if missing) and start PostgreSQL, Redis and RabbitMQ"
	@echo "make bench      run the benchmarks in bench/ (prints ratios)"

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
	mkdir -p $(DEMO_OUT)
	$(VENV)/bin/hwsi info $(DEMO_SLIDE) | tee $(DEMO_OUT)/info.txt
	$(VENV)/bin/hwsi extract $(DEMO_SLIDE) --out $(DEMO_OUT)/features
	HWSI_FEATURE_DIR=$(CURDIR)/$(DEMO_OUT)/features $(VENV)/bin/hwsi tiles $(DEMO_SLIDE) --out $(DEMO_OUT)/tiles
	@echo "demo output in $(DEMO_OUT)/: features/ (the feature store), tiles/ (open thumbnail.png;"
	@echo "drag the .geojson files onto $(DEMO_SLIDE) in QuPath)"

test: setup services
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" -x -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/bench_extract.py
	$(PY) bench/bench_memory.py
	$(PY) bench/bench_evidence.py

lint: setup
	$(VENV)/bin/ruff check omero_hwsi qupath_bridge tests bench

typecheck: setup
	$(VENV)/bin/mypy omero_hwsi

clean:
	rm -rf $(DEMO_OUT) .pytest_cache bench/output
