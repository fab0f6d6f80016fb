"""Peak memory: the CUDA caching allocator's peak on GPU, the process's peak RSS (VmHWM) on CPU.

On Linux the RSS high-water mark can be reset by writing "5" to /proc/self/clear_refs, so a peak can be
taken around one phase of a process, not only since its start.
"""
from __future__ import annotations

import resource
import sys

import torch


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    kib = _read_status_kib("VmRSS")
    return (kib or 0) * 1024


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """Reset the peak counter; returns False where the platform cannot (then the peak is since start)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes at the high-water mark since the last reset (CUDA: allocated tensors; CPU: resident set)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    kib = _read_status_kib("VmHWM")
    if kib is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r if sys.platform == "darwin" else r * 1024)
    return kib * 1024


def tensor_bytes(tensors) -> int:
    """Bytes held by these tensors locally (a DTensor counts only its local shard)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
