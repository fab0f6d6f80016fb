#!/usr/bin/env bash
# llama.cpp for the peer rows of the inference benches (projects/infer/llamacpp.py). llama-cpp-python has no
# binary wheel on PyPI, so it is built from source ONCE per CPU into a wheel cache outside the clone
# (${XDG_CACHE_HOME:-~/.cache}/mlsys/llama-cpp/<cpu tag>/; a venv rebuild or a new clone reinstalls from it
# in seconds), then installed into .venv. The version is pyproject's `llamacpp` extra.
# Build: GGML_NATIVE (every SIMD extension this CPU has: the peer at its best here) and only the libraries
# the rows use (no tools, tests, examples, server or mtmd). One exception: ggml's AMX backend is left out on
# CPUs with AMX, because in 0.3.36 it crashes (SIGSEGV in ggml_backend_amx_mul_mat, seen on a Sapphire
# Rapids VM) on the first matmul; its AVX-512 VNNI kernels run instead.
#   --check   exit 0 when llama_cpp imports in .venv, 1 otherwise; prints nothing
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
if "$PY" -c "import llama_cpp" 2>/dev/null; then exit 0; fi
if [ "${1:-}" = "--check" ]; then exit 1; fi
spec=$("$PY" -c "import tomllib; print(tomllib.load(open('pyproject.toml','rb'))['project']['optional-dependencies']['llamacpp'][0])")
tag=$("$PY" -c "from common.env import cpu_tag; print(cpu_tag())")
wheels=${XDG_CACHE_HOME:-$HOME/.cache}/mlsys/llama-cpp/$tag
if ! ls "$wheels"/llama_cpp_python-"${spec##*==}"-*.whl >/dev/null 2>&1; then
  flags=""
  if grep -qw amx_int8 /proc/cpuinfo; then flags="-mno-amx-int8 -mno-amx-tile -mno-amx-bf16"; fi
  echo "set-up: building $spec from source, once for this CPU (the longest set-up step; outside the bench's"
  echo "        25-minute budget) into $wheels"
  mkdir -p "$wheels"
  log=$(mktemp)
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_C_FLAGS='$flags' \
-DCMAKE_CXX_FLAGS='$flags'" "$PY" -m pip wheel -v --no-deps --no-binary llama-cpp-python "$spec" -w "$wheels" 2>&1 \
    | tee "$log" | grep --line-buffered -o '^ *\[[0-9]*/[0-9]*\]' | while read -r step; do
        printf '\r  compiling %s' "$step"; done
  echo
  if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "error: the llama-cpp-python build failed; its log: $log" >&2; exit 1
  fi
  rm -f "$log"
fi
"$PY" -m pip install -q --find-links "$wheels" "$spec"
echo "set-up: llama.cpp installed ($spec, from $wheels)"
