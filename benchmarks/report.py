"""Rewrite the generated parts of README.md and docs/*.md from benchmarks/results/*.json, and the plots.

    python -m benchmarks.report            # rewrite in place
    python -m benchmarks.report --check    # exit 1 if any generated section differs from the records

A generated section sits between `<!-- bench:NAME -->` and `<!-- /bench -->`; NAME is a bench (its table),
`goals` (every bench's goals in one table), `NAME:notes`, or `NAME:TABLE` for a second table a record
carries in extra.tables.TABLE ({columns, units, rows}). A bench with no record says "not run yet" —
stale numbers are never kept. Numbers are only ever formatted from a record, never typed.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
from pathlib import Path

from benchmarks.record import BENCHES, RESULTS_DIR, load_records, write_atomic
from common.env import REPO_ROOT

DOCS = REPO_ROOT / "docs"
MARKER = re.compile(r"(<!-- bench:(?P<name>[\w:-]+) -->\n)(?P<body>.*?)(<!-- /bench -->)", re.S)


def fmt(v) -> str:
    """The one number format used in every table (the README test re-derives cells with it)."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}".rstrip("0").rstrip(".") if a < 1 else f"{v:.2f}"
        return f"{v:.2e}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _bytes_h(n) -> str:
    if not n:
        return "?"
    return f"{n / 2**30:.0f} GiB"


def provenance_line(rec: dict) -> str:
    p = rec["provenance"]
    m = p["machine"]
    commit = (p.get("commit") or "unknown")[:10] + (" (dirty tree)" if p.get("dirty") else "")
    gpu = f"{m['gpu_count']}× {m['gpu_names'][0]}" if m.get("gpu_count") else "no GPU"
    feats = f" ({', '.join(m['cpu_features'])})" if m.get("cpu_features") else ""
    libs = ", ".join(f"{k} {v}" for k, v in sorted(p.get("libs", {}).items()) if v)
    return (f"<sub>Measured by `{rec['bench']}` bench, preset `{rec.get('preset', 'default')}`, at commit "
            f"`{commit}` on {p['date_utc']}: {m['cpu_model']}, {m['cpu_cores']} cores{feats}, "
            f"{_bytes_h(m.get('total_memory_bytes'))} RAM, {gpu}; torch {p['torch']}"
            f"{', CUDA ' + p['cuda'] if p.get('cuda') else ''}, Python {p['python']}; {libs}. "
            f"{_wall(rec)}Record: `benchmarks/results/{rec['bench']}.json`.</sub>")


def _wall(rec: dict) -> str:
    w = rec.get("wall_s")
    return f"The run took {w / 60:.1f} min. " if isinstance(w, (int, float)) else ""


# records written by something other than `make bench-NAME`
MAKE_TARGET = {"train_check": "make train-check", "hardening": ".venv/bin/python -m benchmarks.run hardening",
               "fresh": "sudo .venv/bin/python -m benchmarks.fresh --purge --user mlsys-fresh"}


def render_table(rec: dict) -> str:
    cols, units = rec["columns"], rec["units"]
    head = [c + (f" ({units[c]})" if units.get(c) else "") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rec["rows"]:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n\n" + provenance_line(rec) + "\n"


def render_notes(rec: dict) -> str:
    return "".join(f"- {n}\n" for n in rec.get("notes", [])) or "_no notes in the record_\n"


def render_goals(records: dict[str, dict]) -> str:
    lines = ["| bench | goal | metric | target | measured | met |", "|---|---|---|---|---|---|"]
    for bench, rec in sorted(records.items()):
        for g in rec.get("goals", []):
            met = "✅ yes" if g["met"] else "❌ no"
            lines.append(f"| {bench} | `{g['name']}` | {fmt(g['metric'])} | {g['op']} {fmt(g['target'])} | "
                         f"{fmt(g['measured'])} | {met} |")
    if len(lines) == 2:
        return "_not run yet: `make bench`_\n"
    notes = [f"- `{g['name']}`: {g['note']}" for r in records.values() for g in r.get("goals", []) if g.get("note")]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def render_profile(rec: dict) -> str:
    """The decode step's time split (record extra.profiles, from projects/infer/profile.py)."""
    runs = rec.get("extra", {}).get("profiles") or []
    if not runs:
        return "_no profile in this record (the bench ran with --no-profile or not on a CPU)_\n"
    keys = [("weight_matmuls_ms", "weight matmuls"), ("attention_ms", "attention"),
            ("elementwise_ms", "fused elementwise"), ("overhead_ms", "framework overhead")]
    lines = ["| decode step (SmolLM2-135M, batch 1, context " + str(runs[0].get("ctx", "?")) + ") | ms/token | "
             "tokens/s | " + " | ".join(f"{label} (ms)" for _, label in keys) + " |",
             "|---|---|---|" + "---|" * len(keys)]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['label']} | failed: {r['error']} |" + " |" * (len(keys) + 1))
            continue
        lines.append(f"| {r['label']} | {fmt(r['ms_per_token'])} | {fmt(r['tok_s'])} | " +
                     " | ".join(fmt(r[k]) for k, _ in keys) + " |")
    return "\n".join(lines) + "\n\n" + provenance_line(rec) + "\n"


def render_section(name: str, records: dict[str, dict]) -> str:
    if name == "goals":
        return render_goals(records)
    bench, _, part = name.partition(":")
    rec = records.get(bench)
    if rec is None:
        return f"_not run yet: `{MAKE_TARGET.get(bench, f'make bench-{bench}')}`_\n"
    if part == "notes":
        return render_notes(rec)
    if part == "profile":
        return render_profile(rec)
    if part:   # a second table of the bench, with its own columns and units (extra.tables.<part>)
        table = ((rec.get("extra") or {}).get("tables") or {}).get(part)
        if table is None:
            return f"_no `{part}` table in this record yet: `{MAKE_TARGET.get(bench, f'make bench-{bench}')}`_\n"
        return render_table({**rec, **table})
    return render_table(rec)


def render_text(text: str, records: dict[str, dict]) -> str:
    return MARKER.sub(lambda m: m.group(1) + render_section(m.group("name"), records) + m.group(4), text)


def generated_files() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def write_plots(records: dict[str, dict]) -> list[Path]:
    out = []
    for bench, rec in records.items():
        module = BENCHES.get(bench)
        if module is None or importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        if hasattr(mod, "plot"):
            import matplotlib
            matplotlib.use("Agg")
            out += list(mod.plot(rec, DOCS) or [])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that generated sections match the records")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of <bench>.json records")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    records = load_records(args.results)
    stale = []
    for path in generated_files():
        if not path.exists():
            continue
        old = path.read_text()
        new = render_text(old, records)
        if new != old:
            stale.append(path)
            if not args.check:
                write_atomic(path, new)
    if args.check:
        for s in stale:
            print(f"stale: {s.relative_to(REPO_ROOT)} differs from benchmarks/results (run `make report`)")
        return 1 if stale else 0
    for s in stale:
        print(f"rewrote {s.relative_to(REPO_ROOT)}")
    if not args.no_plots:
        for png in write_plots(records):
            print(f"wrote {Path(png).relative_to(REPO_ROOT) if Path(png).is_absolute() else png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
