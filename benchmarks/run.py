"""Run benches and rewrite the README tables: `python -m benchmarks.run all|train|infer|quant|compress|serve [--full]`.

Each bench is a module (`benchmarks.record.BENCHES`: `python -m projects.<project>.bench`, the quantization
table `projects.infer.bench_quant` and the compression one `projects.infer.bench_compress`), run in its own
process (a clean peak-RSS counter, its own thread settings), writing benchmarks/results/<name>.json; then
`benchmarks.report` rewrites README.md and docs/*.png from whatever records exist. A bench whose file does
not exist yet is skipped with a message; an unknown name is an error (exit 2).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import report
from benchmarks.record import BENCHES
from common.env import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="+", metavar="NAME", help=f"all, or any of: {', '.join(BENCHES)}")
    p.add_argument("--full", action="store_true", help="run each bench's full matrix, not its default subset")
    p.add_argument("--no-report", action="store_true", help="do not rewrite README/docs afterwards")
    args = p.parse_args(argv)
    names = list(BENCHES) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"error: unknown bench {unknown[0]!r}; choose from: all, {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        module = BENCHES[name]
        if not (REPO_ROOT / (module.replace(".", "/") + ".py")).exists():
            print(f"skip {name}: {module} is not built yet")
            continue
        cmd = [sys.executable, "-m", module] + (["--full"] if args.full else [])
        print(f"== bench {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=REPO_ROOT)
        print(f"== bench {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    if not args.no_report:
        report.main([])
    if failed:
        print(f"error: bench(es) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
