# ravfm: `make` lists the targets. Everything runs inside .venv (made by `make setup`).
SHELL := /bin/bash
TORCH_VERSION ?= 2.13.0
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RAVFM := $(VENV)/bin/ravfm
JOB ?= jobs/smoke.yaml
ADDRESS ?= $(RAY_ADDRESS)
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint format train-criteo train-avazu train-movielens score serve submit bench bench-e2e bench-accuracy peers clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup: ## create .venv: torch==$(TORCH_VERSION) first, then ravfm with dev extras (pinned by constraints.txt)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@$(PY) -c "import torch, ray, polars; print('ravfm ready: torch', torch.__version__, '| ray', ray.__version__, '| polars', polars.__version__)"

test: ## run every test this machine can run (Ray end-to-end included; GPU tests skip)
	$(PY) -m pytest -q $(ARGS)

test-fast: ## the tests that start no Ray cluster and are not slow
	$(PY) -m pytest -q -m "not ray and not slow" $(ARGS)

lint: ## ruff check and format check
	$(VENV)/bin/ruff check ravfm tests bench
	$(VENV)/bin/ruff format --check ravfm tests bench

format: ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix ravfm tests bench
	$(VENV)/bin/ruff format ravfm tests bench

train-criteo: ## train FM on Criteo (CRITEO=path-or-URL, else synthetic Criteo-shaped data)
	$(RAVFM) train --config jobs/criteo_fm.yaml $(if $(CRITEO),data.source=$(CRITEO)) $(ARGS)

train-avazu: ## train FM on Avazu (AVAZU=path-or-URL, else synthetic Avazu-shaped data)
	$(RAVFM) train --config jobs/avazu_fm.yaml $(if $(AVAZU),data.source=$(AVAZU)) $(ARGS)

train-movielens: ## train VFM on MovieLens (MOVIELENS=dir-or-URL, else synthetic)
	$(RAVFM) train --config jobs/movielens_vfm.yaml $(if $(MOVIELENS),data.source=$(MOVIELENS)) $(ARGS)

score: ## batch-score: make score CHECKPOINT=... INPUT=... OUTPUT=... [KEEP=col,...]
	$(RAVFM) score --checkpoint $(CHECKPOINT) --input $(INPUT) --output $(OUTPUT) --keep "$(KEEP)"

serve: ## serve a checkpoint over HTTP on Ray Serve: make serve CHECKPOINT=runs/NAME/checkpoints [ARGS=--watch]
	$(RAVFM) serve --checkpoint $(CHECKPOINT) $(ARGS)

submit: ## submit a job to a Ray cluster: make submit JOB=jobs/criteo_fm.yaml ADDRESS=http://HEAD:8265
	$(RAVFM) submit $(JOB) $(if $(ADDRESS),--address $(ADDRESS)) $(ARGS)

bench: ## run every benchmark; tables to stdout, JSON to bench/results/
	$(PY) -m bench.run_all

bench-e2e: peers ## ravfm train + score as a user runs them, beside xLearn, TorchRec and PyTorch (ARGS="--rows 10000000" for the scale case)
	$(PY) -m bench.e2e $(ARGS)

bench-accuracy: ## train each model on the real samples; writes bench/results/accuracy.json
	$(PY) -m bench.accuracy

peers: ## .peers-venv: xLearn, TorchRec, myFM for the benchmarks (each peer apart; status in .peers-venv/peers-status.json)
	$(PYTHON) bench/peers/install.py --venv .peers-venv

clean: ## remove caches (keeps .venv, data/ and runs/)
	rm -rf .pytest_cache .ruff_cache $$(find . -name __pycache__ -not -path './.venv/*')
