"""Where a number came from: commit, date, machine (no hostname), software versions."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from common.env import REPO_ROOT


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


# The harness's own outputs: one `make bench` rewrites them bench after bench, and a record must not call the
# next bench's tree dirty because the previous bench wrote its result.
HARNESS_OUTPUTS = ("benchmarks/results", "docs/*.png")


def git_info() -> dict:
    """commit, and dirty = tracked files other than the harness's outputs differ from it."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                  *(f":(exclude){p}" for p in HARNESS_OUTPUTS))
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict:
    flags = cpu_flags()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_features": sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                           "amx_int8", "amx_tile") if f in flags),
        "gpu_names": gpus,
        "gpu_count": len(gpus),
        "total_memory_bytes": total_memory_bytes(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
    }


def lib_versions(names: list[str]) -> dict[str, str | None]:
    out = {}
    for n in names:
        try:
            out[n] = importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance(libs: list[str] = ()) -> dict:
    """The provenance block of every result record."""
    return {
        **git_info(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "libs": lib_versions(sorted(set(libs) | {"numpy"})),
        "argv": sys.argv[1:],
    }
