"""Timing the way gpt-fast and airbench do it: warm-up outside the timed region, synchronize, repeat,
report medians and tail percentiles, not means of a single run."""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from common.device import synchronize


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default "linear" method), q in [0, 100]."""
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float]) -> dict[str, float]:
    """median, p50/p90/p99, min, max, mean, std and n of a sample."""
    if not xs:
        raise ValueError("summarize of an empty sequence")
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "p50": percentile(xs, 50),
        "p90": percentile(xs, 90),
        "p99": percentile(xs, 99),
        "min": min(xs),
        "max": max(xs),
        "mean": statistics.fmean(xs),
        "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0,
    }


def time_fn(fn: Callable[[], object], *, warmup: int = 2, repeats: int = 5,
            device: torch.device | str | None = None) -> list[float]:
    """Seconds per call of `fn`, `repeats` times, after `warmup` untimed calls; synchronized."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return out
