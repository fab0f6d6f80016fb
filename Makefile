# Two commands set everything up on a fresh machine: `make test` and `make bench`. Both first run the set-up
# (target `setup`): .venv (reinstalled when pyproject.toml or constraints.txt change), then scripts/setup.sh:
# the Debian packages, the SmolLM2 GGUF and, for the benches, the bench index; each only when missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where ../shared lives (offline assets); the code reads MLSYS_ASSETS when set.
export MLSYS_ASSETS ?= $(abspath ../shared/assets)
# Offline mode (assets from ../shared and PyPI packages instead of the hub) is on when ../shared/assets is
# there and off otherwise; say `MLSYS_OFFLINE=0 make bench` to use the hub and torchvision downloads.
export MLSYS_OFFLINE ?= $(if $(wildcard $(MLSYS_ASSETS)/README.md),1,0)
export HF_HUB_OFFLINE ?= $(MLSYS_OFFLINE)
export WANDB_MODE ?= offline
# The served FAISS index (`make index`, all ~166k WordNet passages); INDEX_LIMIT=N builds it over the first N.
INDEX_DIR ?= runs/serve/index
# The serving bench's index: the first 100k passages (the ANN goals are stated on >= 100k), to keep a fresh
# `make bench` within its 25-minute budget on 2 cores (the encoding is most of it: bf16 where the CPU does bf16,
# one 1-thread process per core).
BENCH_INDEX_DIR ?= runs/serve/index-100k
export BENCH_INDEX_LIMIT ?= 100000

.PHONY: help env setup setup-bench llamacpp system-deps test test-fast bench bench-train bench-infer bench-quant bench-compress bench-serve report \
	train-check index serve serve-stop clean-env

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[1m%-14s\033[0m %s\n",$$1,$$2}'

# .just-installed: scripts/setup.sh reports the rebuild in its one line, then removes it
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[all]'
	@touch $(STAMP) $(VENV)/.just-installed

env: $(STAMP) ## create .venv (only if missing or pyproject/constraints changed) and build the C++ kernels

setup: env ## the set-up `make test` runs first: .venv, C++ kernels, Debian packages, SmolLM2 GGUF (each only when missing)
	@bash scripts/setup.sh

setup-bench: env ## the set-up `make bench` runs first: `setup` plus the bench index and llama.cpp (the peer rows)
	@bash scripts/setup.sh --bench-index $(BENCH_INDEX_DIR) --llamacpp

llamacpp: env ## build llama-cpp-python once per CPU (wheel cache outside the clone) for the inference benches' peer rows
	bash scripts/build_llamacpp.sh

system-deps: ## install the Debian packages the tests and benches use (root; skipped when present)
	bash scripts/system_deps.sh

test: setup ## set up what is missing, then run the whole test suite (CPU, offline, ~15 min on 2 cores)
	$(BIN)/python -m pytest -q

test-fast: setup ## the suite without tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup-bench ## set up what is missing, run every bench (benchmarks.record.BENCHES: train, infer, quant, compress, serve, hardening), rewrite README tables and docs/*.png
	$(BIN)/python -m benchmarks.run all

bench-train: setup ## training bench only (then rewrites README)
	$(BIN)/python -m benchmarks.run train

bench-infer: setup ## inference benches: float (ours vs HF) and quantization (then rewrites README)
	$(BIN)/python -m benchmarks.run infer quant

bench-quant: setup ## quantization bench only (then rewrites README)
	$(BIN)/python -m benchmarks.run quant

bench-compress: setup ## pruning + distillation + int4/int8 bench only (then rewrites README)
	$(BIN)/python -m benchmarks.run compress

bench-serve: setup-bench ## serving bench only (then rewrites README)
	$(BIN)/python -m benchmarks.run serve

train-check: setup ## real-learning check: ResNet-50 on Fashion-MNIST for a few CPU minutes (docs/train.md)
	$(BIN)/python -m projects.train.learning_check

index: setup $(INDEX_DIR)/manifest.json ## build the served FAISS index over WordNet (once; progress bar)

$(INDEX_DIR)/manifest.json:
	$(BIN)/python -m projects.serve.index --out $(INDEX_DIR) $(if $(INDEX_LIMIT),--limit $(INDEX_LIMIT))

serve: index ## start REPLICAS (2) uvicorn replicas behind nginx; returns when ready
	SERVE_INDEX_DIR=$(INDEX_DIR) $(BIN)/python -m projects.serve.cluster up --detach \
		--replicas $(or $(REPLICAS),2) --threads $(or $(THREADS),1)

serve-stop: ## stop exactly what `make serve` started (PID files in runs/serve/cluster)
	$(BIN)/python -m projects.serve.cluster down

report: env ## rewrite README tables and plots from benchmarks/results/*.json (no measuring)
	$(BIN)/python -m benchmarks.report

clean-env: ## remove .venv
	rm -rf $(VENV)
