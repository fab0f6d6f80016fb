"""A fresh machine, measured: the README's two commands in a clean clone with ../shared beside it.

    sudo .venv/bin/python -m benchmarks.fresh --purge --user mlsys-fresh

1. --purge (root): remove the Debian packages that scripts/system_deps.sh installs, so the run starts where
   a fresh Debian machine does (iproute2, part of the base system, stays).
2. --user NAME: as that non-root user (created if missing), in a clone of its own, `make test`: it must print
   the one set-up command and pass, the tests that need a package skipping with that command as the reason.
3. As root, in a clean clone: `make test`, then `make bench` in the same clone, as a new user would.
4. The record benchmarks/results/fresh.json: per run its exit status, wall time, the tests' or benches' own
   time and the rest (set-up: .venv, Debian packages, assets, bench index), the pytest counts and every skip
   reason. The bench records that `make bench` wrote in the clone are copied into benchmarks/results/ and
   the README rewritten (--no-copy keeps them out).

Clones HEAD: commit first. pip runs with its download cache off (PIP_NO_CACHE_DIR=1), as on a new machine.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import report
from benchmarks.record import RESULTS_DIR, goal, make_record, write_record
from common import config
from common.env import SETUP_HINT
from common.env import REPO_ROOT

PACKAGES = ("nginx", "redis-server", "wordnet-base", "dataset-fashion-mnist")  # scripts/system_deps.sh, less iproute2
SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in ([\d.]+)s")
BENCH_DONE = re.compile(r"^== bench (\w+): exit (-?\d+) after (\d+) s")
# the environment a new user's shell has: none of this session's project or hub settings
DROP = ("MLSYS_", "HF_", "SERVE_", "VIRTUAL_ENV", "PYTHONPATH", "WANDB_")


def installed(pkg: str) -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return "install ok installed" in r.stdout


def purge() -> None:
    present = [p for p in PACKAGES if installed(p)]
    if present:
        print(f"fresh: purging {' '.join(present)}", flush=True)
        subprocess.run(["apt-get", "purge", "-y", "-qq", *present], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        subprocess.run(["apt-get", "autoremove", "-y", "-qq"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def clone(parent: Path, owner: str | None) -> Path:
    """parent/main, a clone of HEAD, with parent/shared -> the real ../shared beside it."""
    parent.mkdir(parents=True, exist_ok=True)
    os.symlink(REPO_ROOT.parent / "shared", parent / "shared")
    subprocess.run(["git", "clone", "--quiet", str(REPO_ROOT), str(parent / "main")], check=True)
    if owner:
        subprocess.run(["chown", "-R", f"{owner}:{owner}", str(parent)], check=True)
    return parent / "main"


def run(cmd: list[str], cwd: Path, log: Path, user: str | None) -> tuple[int, float, list[str]]:
    """Run `cmd` in a new user's environment (as `user` when given), teeing its output to log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(DROP)}
    env |= {"PIP_NO_CACHE_DIR": "1", "PYTHONUNBUFFERED": "1"}
    if user:
        pw = pwd.getpwnam(user)
        # a user's own login: the system Python (root's pyenv lives in /root, which others cannot read)
        env |= {"HOME": pw.pw_dir, "USER": user, "LOGNAME": user, "PATH": "/usr/local/bin:/usr/bin:/bin"}
    ids = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []} if user else {}
    lines = []
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             **ids)
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
            lines.append(line.rstrip("\n"))
        rc = p.wait()
    return rc, time.perf_counter() - t0, lines


def pytest_summary(lines: list[str]) -> dict:
    """Counts and seconds from pytest's last line; skip reasons from its -ra summary."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "work_s": None}
    for line in reversed(lines):
        m = SUMMARY.match(line.strip())
        if m:
            for part in m.group(1).split(", "):
                n, what = part.split(" ", 1)
                key = {"error": "errors", "errors": "errors"}.get(what, what)
                if key in out:
                    out[key] = int(n)
            out["work_s"] = float(m.group(2))
            break
    out["skip_reasons"] = [line.split(": ", 1)[-1] for line in lines if line.startswith("SKIPPED")]
    return out


def measure(name: str, cmd: list[str], cwd: Path, log: Path, user: str | None = None) -> dict:
    print(f"fresh: {name}: {' '.join(cmd)} in {cwd}", flush=True)
    rc, wall, lines = run(cmd, cwd, log, user)
    row = {"run": name, "user": user or "root", "exit": rc, "wall_s": wall,
           "setup_lines": [line for line in lines if line.startswith("set-up:")]}
    if cmd[-1] == "test":
        row |= pytest_summary(lines)
    else:
        done = [BENCH_DONE.match(line) for line in lines]
        row["benches"] = {m.group(1): {"exit": int(m.group(2)), "s": int(m.group(3))} for m in done if m}
        row["work_s"] = sum(b["s"] for b in row["benches"].values()) or None
    if row.get("work_s") is not None:
        row["setup_s"] = wall - row["work_s"]
    for k in ("wall_s", "work_s", "setup_s"):
        if row.get(k) is not None:
            row[k.replace("_s", "_min")] = row[k] / 60
    print(f"fresh: {name}: exit {rc} after {wall / 60:.1f} min", flush=True)
    return row


@dataclass
class FreshConfig:
    purge: bool = False
    """remove the Debian packages first (root)"""
    user: str = ""
    """also run `make test` as this non-root user (created if missing)"""
    bench: bool = True
    """run `make bench` after `make test`"""
    copy: bool = True
    """copy the clone's bench records into benchmarks/results"""
    workdir: str = ""
    """where the clones go (default: a new temp folder)"""


def main(argv: list[str] | None = None) -> int:
    args = config.parse(FreshConfig, argv, prog="python -m benchmarks.fresh", description=__doc__.splitlines()[0])
    if os.geteuid() != 0:
        print("error: run as root (it installs and purges Debian packages, as `make test` does as root)",
              file=sys.stderr)
        return 2
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True,
                      text=True).stdout.strip():
        print("warning: uncommitted changes are not in the clone (it clones HEAD)", file=sys.stderr)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mlsys-fresh-"))
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # the non-root user's clone lives below it
    if args.purge:
        purge()
    before = {p: installed(p) for p in PACKAGES}
    rows = []
    if args.user:
        if subprocess.run(["id", args.user], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--create-home", args.user], check=True)
        repo = clone(work / "user", args.user)
        rows.append(measure("make test (non-root)", ["make", "test"], repo, work / "user-test.log", args.user))
    repo = clone(work / "root", None)
    rows.append(measure("make test", ["make", "test"], repo, work / "test.log"))
    if args.bench:
        rows.append(measure("make bench", ["make", "bench"], repo, work / "bench.log"))
    if args.copy and args.bench:
        for rec in sorted((repo / "benchmarks" / "results").glob("*.json")):
            if rec.name != "fresh.json":
                shutil.copy2(rec, RESULTS_DIR / rec.name)
    rec = build_record(args, rows, before)
    # what ran is the clone (HEAD of this checkout, clean), not this working tree
    rec["provenance"] |= {"commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                                                   text=True).stdout.strip(), "dirty": False}
    write_record(rec)
    report.main([])
    print(f"fresh: logs in {work}")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


def build_record(args, rows: list[dict], before: dict) -> dict:
    root_test = next((r for r in rows if r["run"] == "make test"), None)
    user_test = next((r for r in rows if r["run"] == "make test (non-root)"), None)
    bench = next((r for r in rows if r["run"] == "make bench"), None)
    goals = []
    if root_test:
        goals.append(goal("fresh_make_test_failures", "failed + errored tests of `make test` as root in a fresh clone",
                          root_test["failed"] + root_test["errors"] if root_test.get("work_s") else None, 0, "==",
                          f"{root_test['passed']} passed, {root_test['skipped']} skipped"))
        missing = [s for s in root_test["skip_reasons"] if SETUP_HINT in s or "GGUF missing" in s]
        goals.append(goal("fresh_skips_for_missing_packages", "skips of that run caused by a missing package or "
                          "asset", len(missing), 0, "==", "; ".join(missing) or "other skips: " +
                          ("; ".join(root_test["skip_reasons"]) or "none")))
    if user_test:
        named = sum(SETUP_HINT in line for line in user_test["setup_lines"])
        goals.append(goal("nonroot_make_test_failures", "failed + errored tests of `make test` as a non-root user "
                          "with the packages missing", user_test["failed"] + user_test["errors"]
                          if user_test.get("work_s") else None, 0, "==",
                          f"{user_test['passed']} passed, {user_test['skipped']} skipped; the set-up printed "
                          f"{named} line(s) naming `{SETUP_HINT}`"))
    if bench:
        goals.append(goal("fresh_make_bench_exit", "exit status of `make bench` after that `make test`",
                          bench["exit"], 0, "==", ", ".join(f"{k} {v['s'] / 60:.1f} min"
                                                           for k, v in bench.get("benches", {}).items())))
    notes = [
        "Each run is the README's command in a clean clone of the commit below, with ../shared beside it and "
        "no .venv, .cache or bench index; pip's download cache off. setup_min is the wall time less the tests' "
        "own time (pytest's) or the benches' own times: the .venv, the Debian packages, the GGUF, the bench "
        "index, and make / pytest start-up.",
        "Debian packages before the first run: " + ", ".join(f"{k} {'present' if v else 'absent'}"
                                                               for k, v in before.items())
        + (" (purged first)" if args.purge else "") + ".",
    ]
    for r in rows:
        if r.get("setup_lines"):
            notes.append(f"{r['run']}: " + " / ".join(r["setup_lines"]))
        if r.get("skip_reasons"):
            notes.append(f"{r['run']}: skipped: " + "; ".join(r["skip_reasons"]))
    cols = ["run", "user", "exit", "setup_min", "work_min", "wall_min", "passed", "failed", "skipped"]
    units = {c: "" for c in cols} | {"setup_min": "min", "work_min": "min", "wall_min": "min"}
    return make_record("fresh", args, rows, goals, units=units, columns=cols, preset="default", notes=notes)


if __name__ == "__main__":
    sys.exit(main())
