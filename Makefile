# Two commands set everything up on a fresh machine: `make bench` and `make test`.
# Both create .venv first (idempotent; reinstalls when pyproject.toml or constraints.txt change).
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where ../shared lives (offline assets); the code reads MLSYS_ASSETS when set.
export MLSYS_ASSETS ?= $(abspath ../shared/assets)

.PHONY: help env system-deps test test-fast bench bench-train bench-infer bench-serve report clean-env

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[1m%-14s\033[0m %s\n",$$1,$$2}'

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[all]'
	@touch $(STAMP)

env: $(STAMP) ## create .venv (only if missing or pyproject/constraints changed)

system-deps: ## install the Debian packages the tests and benches use (root; skipped when present)
	bash scripts/system_deps.sh

test: env ## run the whole test suite (CPU, offline, ~15 min on 2 cores)
	$(BIN)/python -m pytest -q

test-fast: env ## the suite without tests marked slow
	$(BIN)/python -m pytest -q -m "not slow"

bench: env ## run every bench on its default config, rewrite README tables and docs/*.png
	$(BIN)/python -m benchmarks.run all

bench-train: env ## training bench only (then rewrites README)
	$(BIN)/python -m benchmarks.run train

bench-infer: env ## inference bench only (then rewrites README)
	$(BIN)/python -m benchmarks.run infer

bench-serve: env ## serving bench only (then rewrites README)
	$(BIN)/python -m benchmarks.run serve

report: env ## rewrite README tables and plots from benchmarks/results/*.json (no measuring)
	$(BIN)/python -m benchmarks.report

clean-env: ## remove .venv
	rm -rf $(VENV)
