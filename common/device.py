"""Device, distributed backend and autocast dtype, chosen the same way in every project.

Never hard-code "cuda": everything goes through `get_device()` so the code runs on CPU-only machines
(gloo, bf16 autocast) and on CUDA (NCCL, bf16 or fp16 + GradScaler).
"""
from __future__ import annotations

import os

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def get_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` picks CUDA when present (the local rank's GPU under torchrun), else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda asked for, but torch.cuda.is_available() is False")
        if dev.index is None:
            idx = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            dev = torch.device("cuda", idx % torch.cuda.device_count())
    return dev


def dist_backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision name, or None for fp32 (no autocast).

    fp16 needs a GradScaler and has no fast CPU kernels, so it is refused on CPU with a clear error.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 needs a CUDA device (GradScaler, fp16 kernels); on CPU use --precision bf16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matmuls run in hardware: any CUDA GPU torch supports bf16 on, or a CPU with
    avx512_bf16 / AMX. Elsewhere (e.g. AVX2-only CPUs) oneDNN emulates bf16, many times slower than fp32,
    so the benches measure fp32 there and say so rather than publish an emulation number as "bf16"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from common.provenance import cpu_flags
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def fast_dtype(device: torch.device | str = "auto") -> str:
    """"bf16" where bf16 runs in hardware on `device` ("auto": the device get_device picks), else "fp32"."""
    return "bf16" if bf16_native(get_device(device) if device == "auto" else device) else "fp32"


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued device work so a host-side timer measures it (no-op on CPU)."""
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        torch.cuda.synchronize(dev)
