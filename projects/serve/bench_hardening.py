"""The faults a deployment meets, injected one by one: does the service survive each?

    python -m benchmarks.run hardening          # or: python -m projects.serve.bench_hardening

Each fault is injected by a test of its own (the test's docstring says how) that passes only when the
service ends up answering and nothing else was killed or deleted. This runs exactly those tests, in one
pytest process, and records per fault: passed / failed / skipped (with pytest's reason), and seconds. The
goal `faults_survived` is the count that passed; every fault must. A skipped fault (a Debian package
missing) counts as not survived: it was not shown.
"""
from __future__ import annotations

import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from common import config
from common.env import REPO_ROOT

# fault -> the test that injects it (path::name)
FAULTS = {
    "Kubernetes service-link SERVE_* variables in the pod's environment":
        "projects/serve/tests/test_app.py::test_app_starts_under_the_environment_the_kubelet_injects",
    "two `make serve` at once":
        "projects/serve/tests/test_scale.py::test_a_second_up_stops_before_touching_the_running_clusters_files",
    "a stale PID file naming an unrelated process":
        "projects/serve/tests/test_scale.py::test_pid_files_name_exactly_the_processes_we_started",
    "a corrupt newest training checkpoint (rotation must keep the one just written)":
        "projects/train/tests/test_train.py::test_rotation_never_deletes_the_checkpoint_just_written",
    "a rolling restart whose replacement dies while starting":
        "projects/serve/tests/test_supervisor.py::"
        "test_a_rolling_replacement_that_cannot_start_leaves_the_old_replica_and_no_extra",
    "a replica in a crash loop while others serve":
        "projects/serve/tests/test_supervisor.py::test_a_crash_looping_replica_is_retried_while_the_others_serve",
    "a full disk (and a config nginx -t refuses) during a config write":
        "projects/serve/tests/test_supervisor.py::test_a_refused_nginx_config_or_a_full_disk_keeps_the_last_good_config",
    "Redis returning garbage":
        "projects/serve/tests/test_cache.py::test_garbage_in_redis_is_a_miss_not_an_error",
    "Redis hanging (accepts, never answers)":
        "projects/serve/tests/test_cache.py::test_a_hanging_redis_opens_the_breaker_so_requests_stop_waiting_for_it",
    "the index rebuilt while replicas load it":
        "projects/serve/tests/test_index.py::test_saving_over_a_served_index_never_leaves_no_index",
    "replicas converting the GGUF at once":
        "projects/infer/tests/test_infer.py::test_replicas_converting_the_gguf_together_convert_it_once",
    "a replica SIGKILLed under load, then a rolling restart under load (real nginx)":
        "projects/serve/tests/test_scale.py::test_replica_kill_rolling_restart_and_exact_stop",
}
UNITS = {"fault": "", "test": "", "outcome": "", "seconds": "s"}
COLUMNS = ["fault", "outcome", "seconds", "test"]


@dataclass
class HardeningConfig:
    timeout_s: int = 600
    """per-test timeout (pytest-timeout)"""


def run_tests(tests: list[str], timeout_s: int) -> dict[str, tuple[str, float, str]]:
    """{test id: (passed|failed|skipped, seconds, message)} from one pytest run's JUnit XML."""
    import subprocess
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--timeout={timeout_s}",
                        f"--junitxml={xml}", *tests], cwd=REPO_ROOT)
        out = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            path = case.get("classname", "").replace(".", "/") + ".py"
            tid = f"{path}::{case.get('name')}"
            kind, msg = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    kind, msg = "failed", (child.get("message") or "")[:200]
                elif child.tag == "skipped":
                    kind, msg = "skipped", (child.get("message") or "")[:200]
            out[tid] = (kind, float(case.get("time", 0)), msg)
    return out


def main(argv: list[str] | None = None) -> int:
    from benchmarks.record import goal, make_record, write_record
    cfg = config.parse(HardeningConfig, argv, prog="python -m projects.serve.bench_hardening",
                       description=__doc__.splitlines()[0])
    t0 = time.perf_counter()
    got = run_tests(list(FAULTS.values()), cfg.timeout_s)
    rows, notes = [], []
    for fault, test in FAULTS.items():
        kind, secs, msg = got.get(test, ("failed", 0.0, "not collected (renamed or removed?)"))
        rows.append({"fault": fault, "outcome": kind, "seconds": round(secs, 2), "test": test.split("::")[-1]})
        if msg:
            notes.append(f"{fault}: {kind}: {msg}")
    survived = sum(r["outcome"] == "passed" for r in rows)
    goals = [goal("faults_survived", f"faults injected one by one (each by its test) after which the service "
                  f"answers and nothing else was killed or deleted, of {len(rows)}", survived, len(rows), "==",
                  note="a skipped test (missing Debian package) counts as not shown")]
    rec = make_record("hardening", cfg, rows, goals, units=UNITS, columns=COLUMNS, notes=notes,
                      extra={"pytest_wall_s": round(time.perf_counter() - t0, 1)})
    path = write_record(rec)
    print(f"{survived}/{len(rows)} faults survived; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
