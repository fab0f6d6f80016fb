"""The C++ kernels (csrc/: blockquant.cpp, gemv.cpp, attention.cpp, common.h): built once per machine,
loaded on first use, with a PyTorch fallback.

    .venv/bin/python -m projects.infer.kernels        # build (or find) the extension; prints where it lives

`make setup` (the first step of `make test` and `make bench`) runs the line above when the build is missing.
The build is `torch.utils.cpp_extension` with `-O3 -march=native -fopenmp` (AVX-512 VNNI, AVX-512 or AVX2
paths by what this CPU has; OpenMP because at::parallel_for splits the rows over torch's threads), cached
under `~/.cache/mlsys/kernels/<cpu tag>-<source hash>/` (common.env.machine_cache_root: shared by clones and
venvs), so another CPU or an edited source never loads a wrong binary. Without a compiler or headers (or `MLSYS_KERNELS=0`), `ops()` is None and the layers that use them
(blockquant.py, gemv.py, model.py's decode attention) compute the same result with PyTorch ops.

The ops are registered with fake (meta) implementations, so torch.compile traces each as one call.
"""
from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from common.env import cpu_tag, machine_cache_root

CSRC = Path(__file__).with_name("csrc")
SOURCES = sorted(CSRC.glob("*.cpp"))  # one library; each file registers its own ops
HEADERS = sorted(CSRC.glob("*.h"))


def build_dir() -> Path:
    h = hashlib.sha256((torch.__version__ + "".join(f.name + f.read_text() for f in SOURCES + HEADERS)).encode())
    h = h.hexdigest()[:8]
    return machine_cache_root() / "kernels" / f"{cpu_tag()}-{h}"


def built() -> bool:
    """Whether this CPU's build of the current source is there (set-up checks this without compiling)."""
    return (build_dir() / "mlsys_kernels.so").is_file()


def build(verbose: bool = False) -> Path:
    """Compile (or find) the extension for this CPU, torch and source, and load it into the process."""
    from torch.utils.cpp_extension import load
    out = build_dir()
    if built():
        # loaded as it is: cpp_extension.load would re-run ninja, which recompiles whenever this checkout's or
        # venv's paths differ from the build's (another clone, a worktree) -- a whole compile, memory and
        # minutes, inside a replica's start -- although the folder's name already pins CPU, torch and source
        torch.ops.load_library(str(out / "mlsys_kernels.so"))
        return out
    out.mkdir(parents=True, exist_ok=True)
    load(name="mlsys_kernels", sources=[str(f) for f in SOURCES], build_directory=str(out), is_python_module=False,
         extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
         verbose=verbose)
    return out


@lru_cache(maxsize=1)
def ops():
    """torch.ops.mlsys when the extension is built (or builds now) on an x86 CPU; None otherwise."""
    if os.environ.get("MLSYS_KERNELS", "1") == "0" or os.uname().machine != "x86_64":
        return None
    try:
        build()
    except (OSError, RuntimeError, ImportError) as e:  # no compiler / headers: the fallback path
        print(f"mlsys kernels unavailable ({type(e).__name__}: {str(e)[:200]}); using dequantize + F.linear",
              file=sys.stderr)
        return None
    _register_fakes()
    return torch.ops.mlsys


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the ops are loaded (torch.compile reads this once at trace time, as a constant)."""
    return ops() is not None


@torch.compiler.assume_constant_result
def has_bf16_gemv() -> bool:
    """Whether mlsys::bf16_linear has a CPU kernel here (it is built for AVX-512 CPUs only)."""
    return ops() is not None and torch._C._dispatch_has_kernel_for_dispatch_key("mlsys::bf16_linear", "CPU")


def _register_fakes() -> None:
    @torch.library.register_fake("mlsys::q4_1_linear")
    def _(x, qs, d, m, n):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("mlsys::q8_0_linear")
    def _(x, qs, d, n):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("mlsys::q4_1_dequantize")
    def _(qs, d, m, n, dtype):
        return qs.new_empty(n, qs.shape[1] * 32, dtype=dtype)

    @torch.library.register_fake("mlsys::q8_0_dequantize")
    def _(qs, d, n, dtype):
        return qs.new_empty(n, qs.shape[1] * 32, dtype=dtype)

    @torch.library.register_fake("mlsys::bf16_linear")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("mlsys::decode_attention")
    def _(q, k, v, mask):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


if __name__ == "__main__":
    print(build(verbose="-v" in sys.argv))
