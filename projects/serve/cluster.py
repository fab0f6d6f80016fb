"""The service at scale on one machine: N uvicorn replicas behind nginx, supervised, stopped exactly.

    python -m projects.serve.cluster up --replicas 2 --detach      # `make serve`: returns once nginx answers
    python -m projects.serve.cluster status                        # what runs, from the run directory
    python -m projects.serve.cluster restart                       # rolling restart, drops no request
    python -m projects.serve.cluster down                          # `make serve-stop`: what `up` started
    python -m projects.serve.cluster up --replicas 1 --max-replicas 2   # with the autoscaler (autoscale.py)

Without --detach, `up` runs the supervisor in the foreground and Ctrl-C stops everything. What it starts:
  - one `uvicorn --factory projects.serve.app:create_app` process per replica on 127.0.0.1:<replica_port + i>, each with its
    own threads (OMP/MKL/torch = --threads) and, with --pin, its own cores (taskset), because two replicas
    sharing cores with full thread pools each run slower than one;
  - nginx (Debian's) from projects/serve/nginx.conf.template on --host:--port: least_conn, passive health
    checks, retries of embeddings/search on another replica, unbuffered SSE for completions;
  - optionally redis-server (--redis-port) for the shared embedding cache, passed on as REDIS_URL.
Everything it writes -- replica and nginx logs, rendered nginx.conf, PID files, cluster.json -- goes to
--run-dir (default runs/serve/cluster). `down` reads the PID files and signals only those processes, after
checking each one's start time and command line are the ones started (a recycled PID is never killed). One
cluster per run directory: `up` holds an exclusive lock on its cluster.lock for the supervisor's lifetime
(a detached start hands the locked descriptor to the supervisor), so a second `up` stops before it touches
anything.

The supervisor restarts a replica that dies (a SIGKILL, an OOM) on the same port, and keeps the nginx
upstream to replicas that answer /readyz: a starting replica is listed `down`, added (`nginx -s reload`)
once ready. A replica leaves by being marked down, nginx reloaded, the old nginx workers allowed to finish,
and then SIGTERM, on which uvicorn stops accepting and drains in-flight requests (--graceful-s) -- that is
how rolling restarts (SIGHUP to the supervisor) and scale-downs lose nothing. The supervisor itself is
supervisor.py; this file is its command line.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import config
from common.env import REPO_ROOT
from projects.serve.procs import cmdline, http_ok, pid_alive, start_time
from projects.serve.supervisor import Cluster


# --------------------------------------------------------------------------------------------------------
# the config (its fields are the flags of `up`)
@dataclass
class ClusterConfig:
    app: str = "projects.serve.app:create_app"
    """the ASGI app factory each replica runs (module:function, `uvicorn --factory`)"""
    host: str = "127.0.0.1"
    """address nginx listens on; any other than loopback needs API keys (SERVE_API_KEYS_FILE) or --open"""
    open: bool = False
    """serve /v1/* without API keys on a non-loopback --host (a trusted network)"""
    port: int = 8000
    """port nginx listens on: the service's address"""
    replica_port: int = 8101
    """first replica port; replicas take replica_port, replica_port+1, ... (127.0.0.1 only)"""
    replicas: int = 2
    """replicas to start (and the autoscaler's minimum)"""
    max_replicas: int = 0
    """> replicas turns the autoscaler on, which scales between replicas and this"""
    threads: int = 1
    """intra-op threads per replica (OMP_NUM_THREADS, MKL_NUM_THREADS, SERVE_THREADS)"""
    pin: bool = False
    """pin each replica to its own `threads` cores with taskset (round robin over the machine's cores)"""
    run_dir: str = "runs/serve/cluster"
    """logs, rendered nginx.conf, PID files, cluster.json"""
    nginx: str = "nginx"
    """the nginx binary"""
    worker_processes: int = 1
    """nginx worker processes (1 is plenty for loopback: it proxies, the replicas compute)"""
    max_fails: int = 1
    """passive health check: failures within fail_timeout_s before nginx skips a replica"""
    fail_timeout_s: int = 2
    """passive health check: how long a failed replica is skipped"""
    next_upstream_tries: int = 3
    """at most this many replicas tried per request"""
    max_inflight: int = 64
    """front-door admission: requests one client address may have in flight through nginx at once, per ready
    replica; past it nginx itself answers 429 + Retry-After in microseconds and the replicas never see the
    excess. Per address, not one shared count: nginx counts a request from its headers on, so under one shared
    count a client trickling request bodies would hold every slot (0 = no limit at nginx; the replicas'
    bounded queues still refuse, but each refusal costs their event loop)"""
    nice: int = 0
    """scheduling niceness of the replicas (the serving bench uses 10: its load generator shares the cores,
    and a client's CPU is not the server's to take)"""
    graceful_s: int = 30
    """on SIGTERM a replica drains in-flight requests for up to this long (uvicorn --timeout-graceful-shutdown)"""
    ready_timeout_s: float = 300.0
    """a replica not answering /readyz by then is killed and started again"""
    max_start_failures: int = 3
    """a replica that dies this many times in a row before getting ready: with no replica ready this stops the
    cluster (a crash loop at start); with others serving it is retried with backoff (up to 5 min) and a
    rolling restart's replacement is given up, the old replica kept"""
    redis_port: int = 0
    """> 0: start redis-server on 127.0.0.1:this (shared embedding cache) and pass REDIS_URL to replicas;
    0 with REDIS_URL=redis://127.0.0.1:PORT/.. set and nothing listening there: start it on PORT"""
    detach: bool = False
    """up: run the supervisor in the background and return once the service answers"""

    def resolved_run_dir(self) -> Path:
        p = Path(self.run_dir)
        return p if p.is_absolute() else (REPO_ROOT / p).resolve()

    def admitted(self, replicas_up: int) -> int | None:
        """Requests nginx lets one client address have in flight with this many replicas up (None: no limit)."""
        return self.max_inflight * max(1, replicas_up) if self.max_inflight > 0 else None


# --------------------------------------------------------------------------------------------------------
# commands
def started_pids(run_dir: Path) -> dict[str, int]:
    """{name: pid} from the run directory's PID files, only for processes that are exactly the ones we started:
    the same start time where the file records one (ours do; nginx writes its own), and the command line's
    own tokens (`--port 8101` is not `--port 81010`, and not any redis-server)."""
    out = {}
    for f in sorted(run_dir.glob("*.pid")):
        try:
            fields = f.read_text().split()
            pid, start = int(fields[0]), (int(fields[1]) if len(fields) > 1 and fields[1] != "None" else None)
        except (ValueError, IndexError, OSError):
            continue
        if not pid_alive(pid) or (start is not None and start != start_time(pid)):
            continue
        name, tokens = f.stem, cmdline(pid).split()
        pairs = set(zip(tokens, tokens[1:]))
        if name == "supervisor":
            ours = ("-m", "projects.serve.cluster") in pairs
        elif name == "nginx":
            ours = ("-c", str(run_dir / "nginx.conf")) in pairs
        elif name == "redis":  # redis retitles itself ("redis-server 127.0.0.1:<port>"): its start time is the check
            ours = start is not None and bool(tokens) and tokens[0].endswith("redis-server")
        else:
            ours = ("--port", name.removeprefix("replica-")) in pairs
        if ours:
            out[name] = pid
    return out


LOCK_FD_ENV = "MLSYS_CLUSTER_LOCK_FD"  # the locked descriptor a detached `up` hands to its supervisor


def lock(run_dir: Path) -> int | None:
    """An exclusive flock on run_dir/cluster.lock (or the one inherited from a detaching `up`), held until the
    process exits; None while another `up` or supervisor holds it."""
    inherited = os.environ.pop(LOCK_FD_ENV, None)
    if inherited is not None:
        return int(inherited)
    fd = os.open(run_dir / "cluster.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def up(cfg: ClusterConfig) -> int:
    from projects.serve.settings import Settings
    s = Settings.from_env()
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not (s.api_keys or s.api_keys_file or cfg.open):
        print(f"error: --host {cfg.host} without API keys would serve anyone who reaches it: set "
              "SERVE_API_KEYS_FILE (python -m projects.serve.auth makes keys) or pass --open", file=sys.stderr)
        return 2
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = lock(run_dir)
    if fd is None:
        print(f"error: another `up` is starting or running a cluster from {run_dir} (its supervisor holds "
              f"{run_dir / 'cluster.lock'})", file=sys.stderr)
        return 1
    if started_pids(run_dir):
        print(f"error: a cluster from {run_dir} is running (`python -m projects.serve.cluster down` first)",
              file=sys.stderr)
        return 1
    for f in run_dir.glob("*.pid"):   # stale files of processes that are gone
        f.unlink()
    if not cfg.detach:
        return Cluster(cfg).run()
    argv = [sys.executable, "-m", "projects.serve.cluster", "up", *config.to_argv(dataclasses.replace(cfg, detach=False))]
    log = open(run_dir / "supervisor.out", "ab")
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, pass_fds=(fd,), env={**os.environ, LOCK_FD_ENV: str(fd)})
    log.close()
    deadline = time.monotonic() + cfg.ready_timeout_s + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_lines = (run_dir / "supervisor.log").read_text(errors="replace").splitlines()
            why = next((ln.split(" ", 1)[1] for ln in reversed(log_lines) if " error: " in ln),
                       f"error: the supervisor exited ({proc.returncode})")
            print(f"{why} (logs in {run_dir})", file=sys.stderr)
            return 1
        try:
            state = json.loads((run_dir / "cluster.json").read_text())
        except (OSError, json.JSONDecodeError):
            state = {}
        if state.get("supervisor_pid") == proc.pid and state.get("ready", 0) >= cfg.replicas \
                and _front_answers(cfg):
            print(f"serving on {state['url']} with {state['ready']} replicas (supervisor pid {proc.pid}); "
                  f"logs in {run_dir}; stop with `python -m projects.serve.cluster down`")
            print(_auth_line())
            return 0
        time.sleep(0.25)
    print(f"error: not ready after {cfg.ready_timeout_s:.0f}s; see {run_dir}; stopping", file=sys.stderr)
    down(cfg)
    return 1


def _front_answers(cfg: ClusterConfig, times: int = 3) -> bool:
    """/readyz through nginx, several times in a row. The supervisor records a replica ready as soon as it
    has sent nginx the reload that lists it; until nginx's new workers take over, the old ones still have
    every replica `down` and answer 502 (seen as a flaky first request after `up`)."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "") else cfg.host
    for _ in range(times):
        if not http_ok(f"http://{host}:{cfg.port}/readyz"):
            return False
        time.sleep(0.05)
    return True


def _auth_line() -> str:
    """Whether /v1/* needs API keys, as the replicas read it from this environment (projects.serve.auth)."""
    from projects.serve.settings import Settings
    s = Settings.from_env()
    if s.api_keys or s.api_keys_file:
        return f"auth: on: /v1/* needs `Authorization: Bearer <key>` ({s.api_keys_file or 'SERVE_API_KEYS'})"
    return "auth: off: no API keys configured (set SERVE_API_KEYS_FILE before exposing this port)"


def down(cfg: ClusterConfig, timeout_s: float | None = None) -> int:
    """Stop what the PID files name: the supervisor (which stops its children in order), then anything of
    ours it left behind (a supervisor that was itself SIGKILLed)."""
    run_dir = cfg.resolved_run_dir()
    pids = started_pids(run_dir)
    if not pids:
        print(f"nothing running from {run_dir}")
        for f in run_dir.glob("*.pid"):
            f.unlink()
        return 0
    timeout_s = cfg.graceful_s + 10 if timeout_s is None else timeout_s
    order = ["supervisor", "nginx"] + sorted(n for n in pids if n.startswith("replica-")) + ["redis"]
    for name in order:
        pid = started_pids(run_dir).get(name)   # re-read: the supervisor may have stopped the rest already
        if pid is None:
            continue
        os.kill(pid, signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(pid):
            print(f"{name} (pid {pid}) did not stop in {timeout_s:.0f}s: SIGKILL")
            os.kill(pid, signal.SIGKILL)
        print(f"stopped {name} (pid {pid})")
        (run_dir / f"{name}.pid").unlink(missing_ok=True)
    return 0


def status(cfg: ClusterConfig) -> int:
    run_dir = cfg.resolved_run_dir()
    pids = started_pids(run_dir)
    try:
        state = json.loads((run_dir / "cluster.json").read_text())
    except (OSError, json.JSONDecodeError):
        state = {}
    if not pids:
        print(f"not running ({run_dir})")
        return 1
    print(f"{state.get('url', '?')}: " + ", ".join(f"{n} pid {p}" for n, p in pids.items()))
    for r in state.get("replicas", []):
        print(f"  replica :{r['port']} pid {r['pid']} {r['state']} (restarts {r['restarts']})")
    return 0


def restart(cfg: ClusterConfig) -> int:
    pid = started_pids(cfg.resolved_run_dir()).get("supervisor")
    if pid is None:
        print("error: no supervisor running", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"rolling restart requested (supervisor pid {pid}); follow {cfg.resolved_run_dir()}/supervisor.log")
    return 0


def main(argv: list[str] | None = None) -> int:
    cmd, cfg = config.parse(ClusterConfig, argv, prog="python -m projects.serve.cluster", description=__doc__,
                            commands=("up", "down", "status", "restart"))
    return {"up": up, "down": down, "status": status, "restart": restart}[cmd](cfg)


if __name__ == "__main__":
    sys.exit(main())
