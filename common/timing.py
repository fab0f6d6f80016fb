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


def timed(fn: Callable[[], object], *, warmup: int = 0, repeats: int = 5,
          device: torch.device | str | None = None) -> tuple[float, object]:
    """(median seconds per call, the last call's output): `repeats` synchronized calls after `warmup`."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out
