"""The result record every bench writes to benchmarks/results/<bench>.json.

    {
      "bench": "infer",                      # name, = file name
      "config": {...},                       # the resolved dataclass the bench ran with
      "preset": "default" | "full" | ...,    # which embedded matrix was run
      "units": {"tok_per_s": "tokens/s"},    # unit of every metric key used in rows
      "columns": ["model", "dtype", ...],    # the keys shown in the README table, in order
      "rows": [{"model": "...", "tok_per_s": 81.2, ...}, ...],   # one per measured configuration
      "goals": [{"name", "metric", "measured", "target", "op", "met", "note"}],
      "notes": ["..."],                      # what was counted, why a goal is missed, ...
      "provenance": {...}                    # common.provenance.provenance()
    }

A goal is met when `measured <op> target`; a goal that could not be measured has measured None and met
False, with a note saying why. Records are written atomically (temp file + rename).
"""
from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import sys
import time
from pathlib import Path

from common.files import write_atomic  # noqa: F401  (re-exported: report.py, bench_worker.py)
from common.env import REPO_ROOT
from common.provenance import provenance

RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# bench name (= results/<name>.json) -> the module that measures it (and may define `plot(rec, docs_dir)`).
# `quant` is project 2's second bench: the quantization table beside `infer`'s float one; `compress` its third
# (pruning + distillation + quantization), after `quant`, whose record it compares against.
BENCHES = {
    "train": "projects.train.bench",
    "infer": "projects.infer.bench",
    "quant": "projects.infer.bench_quant",
    "compress": "projects.infer.bench_compress",
    "serve": "projects.serve.bench",
    "hardening": "projects.serve.bench_hardening",
}
OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def goal(name: str, metric: str, measured: float | None, target: float, op: str = ">=", note: str = "") -> dict:
    """One stated goal of a bench and whether this run met it."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}")
    ok = measured is not None and not (isinstance(measured, float) and math.isnan(measured)) \
        and bool(OPS[op](measured, target))
    return {"name": name, "metric": metric, "measured": measured, "target": target, "op": op, "met": ok,
            "note": note}


def _plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None  # JSON has no NaN; a missing value is None
    if isinstance(x, Path):
        return str(x)
    return x


def make_record(bench: str, config, rows: list[dict], goals: list[dict], *, units: dict[str, str],
                columns: list[str], preset: str = "default", notes: list[str] = (),
                libs: list[str] = (), extra: dict | None = None) -> dict:
    """Assemble a record; every metric key in `columns` must have a unit (labels map to "")."""
    missing = [c for c in columns if c not in units]
    if missing:
        raise ValueError(f"columns without a unit: {missing}")
    rec = {
        "bench": bench,
        "preset": preset,
        "config": _plain(config),
        "units": dict(units),
        "columns": list(columns),
        "rows": _plain(rows),
        "goals": _plain(goals),
        "notes": list(notes),
        "provenance": provenance(list(libs)),
        # seconds since this process started (the bench's whole run, model loading and compiles included)
        "wall_s": round(time.time() - _process_start(), 1),
    }
    if extra:
        rec["extra"] = _plain(extra)
    return rec


def _process_start() -> float:
    """This process's start time (Linux /proc; else the import time of this module)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def write_record(rec: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """Write the record atomically, then say where and how each goal came out (stderr)."""
    path = Path(results_dir) / f"{rec['bench']}.json"
    write_atomic(path, json.dumps(rec, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    for g in rec["goals"]:
        m = "—" if g["measured"] is None else f"{g['measured']:.4g}"
        print(f"  {g['name']}: {m} {g['op']} {g['target']} -> {'met' if g['met'] else 'NOT met'}", file=sys.stderr)
    return path


def save_figure(fig, docs_dir: Path, name: str) -> Path:
    """docs_dir/name from a matplotlib figure (tight layout, 120 dpi), the figure closed."""
    import matplotlib.pyplot as plt
    path = Path(docs_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_records(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    out = {}
    for p in sorted(Path(results_dir).glob("*.json")):
        with open(p) as f:
            rec = json.load(f)
        out[rec["bench"]] = rec
    return out
