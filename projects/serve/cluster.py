"""The service at scale on one machine: N uvicorn replicas behind nginx, supervised, stopped exactly.

    python -m projects.serve.cluster up --replicas 2 --detach      # `make serve`: returns once nginx answers
    python -m projects.serve.cluster status                        # what runs, from the run directory
    python -m projects.serve.cluster restart                       # rolling restart, drops no request
    python -m projects.serve.cluster down                          # `make serve-stop`: what `up` started
    python -m projects.serve.cluster up --replicas 1 --max-replicas 2   # with the autoscaler (autoscale.py)

Without --detach, `up` runs the supervisor in the foreground and Ctrl-C stops everything. What it starts:
  - one `uvicorn projects.serve.app:app` process per replica on 127.0.0.1:<replica_port + i>, each with its
    own threads (OMP/MKL/torch = --threads) and, with --pin, its own cores (taskset), because two replicas
    sharing cores with full thread pools each run slower than one;
  - nginx (Debian's) from projects/serve/nginx.conf.template on --host:--port: least_conn, passive health
    checks, retries of embeddings/search on another replica, unbuffered SSE for completions;
  - optionally redis-server (--redis-port) for the shared embedding cache, passed on as REDIS_URL.
Everything it writes -- replica and nginx logs, rendered nginx.conf, PID files, cluster.json -- goes to
--run-dir (default runs/serve/cluster). `down` reads the PID files and signals only those processes, after
checking each one's command line is the one started (a recycled PID is never killed).

The supervisor restarts a replica that dies (a SIGKILL, an OOM) on the same port, and keeps the nginx
upstream to replicas that answer /readyz: a starting replica is listed `down`, added (`nginx -s reload`)
once ready. A replica leaves by being marked down, nginx reloaded, the old nginx workers allowed to finish,
and then SIGTERM, on which uvicorn stops accepting and drains in-flight requests (--graceful-s) -- that is
how rolling restarts (SIGHUP to the supervisor) and scale-downs lose nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).with_name("nginx.conf.template")


@dataclass
class ClusterConfig:
    app: str = "projects.serve.app:app"
    """the ASGI app each replica runs (module:attribute)"""
    host: str = "127.0.0.1"
    """address nginx listens on"""
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
    """front-door admission: embeddings + search requests nginx lets through at once, per ready replica;
    past it nginx itself answers 429 + Retry-After in microseconds and the replicas never see the excess
    (0 = no limit at nginx; the replicas' bounded queues still refuse, but each refusal costs their event loop)"""
    nice: int = 0
    """scheduling niceness of the replicas (the serving bench uses 10: its load generator shares the cores,
    and a client's CPU is not the server's to take)"""
    graceful_s: int = 30
    """on SIGTERM a replica drains in-flight requests for up to this long (uvicorn --timeout-graceful-shutdown)"""
    ready_timeout_s: float = 300.0
    """a replica not answering /readyz by then is killed and started again"""
    max_start_failures: int = 3
    """a replica that dies this many times in a row before getting ready stops the cluster (crash loop)"""
    redis_port: int = 0
    """> 0: start redis-server on 127.0.0.1:this (shared embedding cache) and pass REDIS_URL to replicas;
    0 with REDIS_URL=redis://127.0.0.1:PORT/.. set and nothing listening there: start it on PORT"""
    detach: bool = False
    """up: run the supervisor in the background and return once the service answers"""


# --------------------------------------------------------------------------------------------------------
# small helpers
def parse_config(cls, argv: list[str] | None, description: str, commands: tuple[str, ...] = ()):
    """argparse flags generated from a dataclass (--field-name, help = the field's docstring); unknown flags
    exit 2 with one line. With `commands`, the first argument must be one of them: returns (cmd, config)."""
    import ast
    import inspect
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {a.target.id: b.value.value for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if commands:
        p.add_argument("command", choices=commands)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        doc = docs.get(f.name)
        doc = doc and doc.replace("%", "%%")   # argparse %-formats help: "4% of" would break --help
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=doc)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=f.default, help=doc)
    ns = vars(p.parse_args(argv))
    cmd = ns.pop("command", None)
    cfg = cls(**ns)
    return (cmd, cfg) if commands else cfg


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by its parent) is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 0.5) -> bool:
    import httpx
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def render_nginx(cfg: ClusterConfig, run_dir: Path, servers: list[tuple[int, bool]]) -> str:
    """The nginx.conf for these replicas: [(port, up)]; replicas not up are listed `down` (nginx needs at
    least one server in an upstream, and keeping the list stable keeps least_conn's counters meaningful)."""
    if not servers:
        raise ValueError("nginx needs at least one replica in the upstream")
    lines = [f"        server 127.0.0.1:{port} max_fails={cfg.max_fails} fail_timeout={cfg.fail_timeout_s}s"
             + ("" if up else " down") + ";" for port, up in servers]
    user = pwd.getpwuid(os.geteuid()).pw_name
    values = {
        # as root, nginx would switch its workers to `nobody`, who cannot write the run directory
        "user_directive": f"user {user};" if os.geteuid() == 0 else "",
        "worker_processes": str(cfg.worker_processes),
        "run_dir": str(run_dir),
        "host": cfg.host,
        "port": str(cfg.port),
        "upstream_servers": "\n".join(lines),
        "read_timeout_s": "60",
        "stream_read_timeout_s": "300",
        "next_upstream_tries": str(cfg.next_upstream_tries),
        "next_upstream_timeout_s": "30",
        # one shared counter (zone) for the whole server, so the limit holds across nginx workers
        "inflight_limit": (f"limit_conn inflight {cfg.max_inflight * max(1, sum(up for _, up in servers))};"
                           if cfg.max_inflight > 0 else "# no front-door limit (--max-inflight 0)"),
    }
    text = TEMPLATE.read_text()
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    if "{{" in text:
        raise ValueError(f"unfilled placeholder in {TEMPLATE}: {text[text.index('{{'):][:40]}")
    return text


def nginx_cmd(cfg: ClusterConfig, run_dir: Path, *extra: str) -> list[str]:
    return [cfg.nginx, "-p", str(run_dir), "-c", str(run_dir / "nginx.conf"), "-e",
            str(run_dir / "nginx-error.log"), *extra]


def nginx_test(cfg: ClusterConfig, run_dir: Path) -> None:
    """`nginx -t` on the rendered config; raises RuntimeError with nginx's own message."""
    r = subprocess.run(nginx_cmd(cfg, run_dir, "-t", "-q"), capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nginx -t rejected {run_dir / 'nginx.conf'}: {r.stderr.strip()}")


# --------------------------------------------------------------------------------------------------------
# the supervisor
@dataclass(eq=False)
class Replica:
    port: int
    proc: subprocess.Popen
    started: float
    state: str = "starting"          # starting -> ready -> draining (-> gone)
    restarts: int = 0
    drain_since: float = 0.0
    termed: bool = False             # SIGTERM sent (draining)
    failures: int = 0                # consecutive deaths before ever becoming ready (a crash loop)
    restart_at: float | None = None  # died: when to start its successor

    @property
    def pid(self) -> int:
        return self.proc.pid


class Cluster:
    """Owns the replica processes and nginx; `tick()` advances everything one step (called every 0.25 s)."""

    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.run_dir = (REPO_ROOT / cfg.run_dir).resolve() if not Path(cfg.run_dir).is_absolute() \
            else Path(cfg.run_dir)
        self.replicas: list[Replica] = []
        self.nginx: subprocess.Popen | None = None
        self.redis: subprocess.Popen | None = None
        self.stopping = False
        self.rolling: list[int] = []     # ports still to be replaced by a rolling restart
        self.events: list[str] = []
        self.autoscaler = None
        self._rolling_new: Replica | None = None
        self.log = open(self.run_dir / "supervisor.log", "a", buffering=1) if self.run_dir.exists() else None

    # -- bookkeeping --------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        self.events = (self.events + [line])[-50:]
        print(line, file=self.log or sys.stderr, flush=True)

    def write_state(self) -> None:
        state = {
            "supervisor_pid": os.getpid(),
            "url": f"http://{self.cfg.host}:{self.cfg.port}",
            "nginx_pid": self.nginx.pid if self.nginx else None,
            "redis_pid": self.redis.pid if self.redis else None,
            "replicas": [{"port": r.port, "pid": r.pid, "state": r.state, "restarts": r.restarts}
                         for r in self.replicas],
            "ready": sum(r.state == "ready" for r in self.replicas),
            "config": dataclasses.asdict(self.cfg),
            "events": self.events[-20:],
        }
        write_atomic(self.run_dir / "cluster.json", json.dumps(state, indent=1) + "\n")

    def _pidfile(self, name: str, pid: int | None) -> None:
        p = self.run_dir / f"{name}.pid"
        if pid is None:
            p.unlink(missing_ok=True)
        else:
            write_atomic(p, f"{pid}\n")

    # -- replicas -----------------------------------------------------------------------------------------
    def _free_port(self) -> int:
        used = {r.port for r in self.replicas}
        for port in range(self.cfg.replica_port, self.cfg.replica_port + 64):
            if port not in used and port != self.cfg.port and port_free("127.0.0.1", port):
                return port
        raise RuntimeError(f"no free replica port in {self.cfg.replica_port}..{self.cfg.replica_port + 63}")

    def _cores(self, slot: int) -> str:
        n = os.cpu_count() or 1
        t = max(1, self.cfg.threads)
        return ",".join(str((slot * t + i) % n) for i in range(t))

    def spawn(self, port: int, restarts: int = 0, failures: int = 0) -> Replica:
        cfg = self.cfg
        env = dict(os.environ)
        t = str(max(1, cfg.threads))
        # one thread pool per process, sized to its share of the machine (the app sets torch and faiss
        # threads from SERVE_THREADS; OMP/MKL cover the pools created before it does)
        env.update(OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, SERVE_THREADS=t, PYTHONUNBUFFERED="1")
        # Overload answers 429, not 503: nginx retries 503s on another replica and counts them against
        # max_fails, so under overload 503s would mark healthy replicas dead ("no live upstreams", 502).
        # A 429 goes straight back to the client with its Retry-After.
        env.setdefault("SERVE_OVERLOAD_STATUS", "429")
        if self.redis is not None and not env.get("REDIS_URL"):
            env["REDIS_URL"] = f"redis://127.0.0.1:{cfg.redis_port}/0"
        cmd = [sys.executable, "-m", "uvicorn", cfg.app, "--host", "127.0.0.1", "--port", str(port),
               "--timeout-graceful-shutdown", str(cfg.graceful_s), "--no-access-log", "--log-level", "warning",
               # longer than nginx keeps idle upstream connections (keepalive_timeout in the upstream block):
               # otherwise nginx reuses a connection uvicorn just closed and a non-retried POST gets a 502
               "--timeout-keep-alive", "75"]
        if cfg.nice:
            cmd = ["nice", "-n", str(cfg.nice)] + cmd
        if cfg.pin and shutil.which("taskset"):
            slot = sorted({r.port for r in self.replicas} | {port}).index(port)
            cmd = ["taskset", "-c", self._cores(slot)] + cmd
        log = open(self.run_dir / f"replica-{port}.log", "ab")
        # own session: a Ctrl-C meant for the supervisor must not reach the replicas before nginx is told
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        r = Replica(port, proc, time.monotonic(), restarts=restarts, failures=failures)
        self._pidfile(f"replica-{port}", proc.pid)
        self.say(f"replica :{port} started (pid {proc.pid})")
        return r

    def add_replica(self) -> Replica:
        r = self.spawn(self._free_port())
        self.replicas.append(r)
        self.apply_upstream()  # listed as down until ready
        return r

    def retire(self, r: Replica, why: str) -> None:
        """Take a replica out of nginx now; it gets SIGTERM once the old nginx workers are done with it."""
        if r.state == "draining":
            return
        r.state = "draining"
        r.drain_since = time.monotonic()
        self.say(f"replica :{r.port} leaving ({why})")
        self.apply_upstream()

    def _old_nginx_workers(self) -> int:
        """nginx workers still finishing requests under a previous config ("is shutting down")."""
        if self.nginx is None:
            return 0
        try:
            kids = Path(f"/proc/{self.nginx.pid}/task/{self.nginx.pid}/children").read_text().split()
        except OSError:
            return 0
        return sum("shutting down" in cmdline(int(k)) for k in kids)

    # -- nginx --------------------------------------------------------------------------------------------
    def apply_upstream(self) -> None:
        servers = [(r.port, r.state == "ready") for r in self.replicas]
        if not servers:
            return
        write_atomic(self.run_dir / "nginx.conf", render_nginx(self.cfg, self.run_dir, servers))
        if self.nginx is not None and self.nginx.poll() is None:
            nginx_test(self.cfg, self.run_dir)
            # reload = new workers on the new config; old workers finish what they hold, then exit
            subprocess.run(nginx_cmd(self.cfg, self.run_dir, "-s", "reload"), check=True, capture_output=True)
            self.say("nginx reloaded: " + " ".join(f":{p}{'' if up else '(down)'}" for p, up in servers))
        self.write_state()

    def start_nginx(self) -> None:
        nginx_test(self.cfg, self.run_dir)
        log = open(self.run_dir / "nginx-stderr.log", "ab")
        self.nginx = subprocess.Popen(nginx_cmd(self.cfg, self.run_dir), stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        # nginx writes nginx.pid itself (the `pid` directive); wait for it so `down` can always find it
        deadline = time.monotonic() + 10
        while not (self.run_dir / "nginx.pid").exists() and self.nginx.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.nginx.poll() is not None:
            raise RuntimeError(f"nginx exited at start: see {self.run_dir / 'nginx-error.log'}")
        self.say(f"nginx on {self.cfg.host}:{self.cfg.port} (pid {self.nginx.pid})")

    def start_redis(self) -> None:
        if not shutil.which("redis-server"):
            raise RuntimeError("--redis-port needs redis-server (apt-get install redis-server)")
        port = self.cfg.redis_port
        log = open(self.run_dir / "redis.log", "ab")
        # bounded memory, LRU eviction, nothing persisted: it is a cache
        self.redis = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--maxmemory", "256mb",
             "--maxmemory-policy", "allkeys-lru", "--save", "", "--appendonly", "no", "--dir", str(self.run_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._pidfile("redis", self.redis.pid)
        self.say(f"redis on 127.0.0.1:{port} (pid {self.redis.pid})")

    # -- the loop -----------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        if cfg.replicas < 1:
            raise ValueError("--replicas must be >= 1")
        if cfg.max_replicas and cfg.max_replicas < cfg.replicas:
            raise ValueError("--max-replicas must be 0 (no autoscaling) or >= --replicas")
        if not shutil.which(cfg.nginx):
            raise RuntimeError(f"{cfg.nginx} not found: apt-get install nginx (scripts/system_deps.sh)")
        if not port_free(cfg.host, cfg.port):
            raise RuntimeError(f"{cfg.host}:{cfg.port} is in use (another `cluster up`? try `cluster down`)")
        (self.run_dir / "nginx-tmp").mkdir(parents=True, exist_ok=True)
        self.log = self.log or open(self.run_dir / "supervisor.log", "a", buffering=1)
        self._pidfile("supervisor", os.getpid())
        if not cfg.redis_port and os.environ.get("REDIS_URL"):
            # REDIS_URL naming a local port where nothing listens yet: start that redis (it is ours to stop)
            from urllib.parse import urlparse
            u = urlparse(os.environ["REDIS_URL"])
            if u.hostname in ("127.0.0.1", "localhost") and port_free("127.0.0.1", u.port or 6379):
                self.cfg = cfg = dataclasses.replace(cfg, redis_port=u.port or 6379)
        if cfg.redis_port:
            self.start_redis()
        for _ in range(cfg.replicas):
            r = self.spawn(self._free_port())
            self.replicas.append(r)
        self.apply_upstream()
        self.start_nginx()
        if cfg.max_replicas > cfg.replicas:
            from projects.serve.autoscale import Autoscaler
            self.autoscaler = Autoscaler(min_replicas=cfg.replicas, max_replicas=cfg.max_replicas)
        self.write_state()

    def tick(self) -> None:
        now = time.monotonic()
        changed = False
        for r in list(self.replicas):
            dead = r.proc.poll() is not None
            if r.state == "draining":
                if dead:
                    self.replicas.remove(r)
                    self._pidfile(f"replica-{r.port}", None)
                    self.say(f"replica :{r.port} drained and exited ({r.proc.returncode})")
                    changed = True
                elif not r.termed and now - r.drain_since >= 1.0 and (  # (reload is asynchronous)
                        self._old_nginx_workers() == 0 or now - r.drain_since > min(10, self.cfg.graceful_s)):
                    r.proc.send_signal(signal.SIGTERM)   # uvicorn: stop accepting, drain, exit
                    r.termed = True
                elif now - r.drain_since > self.cfg.graceful_s + 15:
                    r.proc.kill()
                continue
            if dead:
                # died on its own (SIGKILL, OOM, crash): start a new one on the same port at once -- unless
                # it never got ready, which is a crash loop: back off, and give up after a few
                fails = r.failures + (r.state == "starting")
                if fails >= self.cfg.max_start_failures:
                    tail = (self.run_dir / f"replica-{r.port}.log").read_text(errors="replace").strip()
                    raise RuntimeError(f"replica :{r.port} failed to start {fails} times in a row; last log "
                                       f"line: {tail.splitlines()[-1] if tail else '(empty)'} "
                                       f"(see {self.run_dir}/replica-{r.port}.log)")
                wait = min(30.0, 2.0 ** fails) if fails else 0.0
                if r.restart_at is None:
                    self.say(f"replica :{r.port} died (exit {r.proc.returncode}); restarting"
                             + (f" in {wait:.0f}s" if wait else ""))
                    r.restart_at = now + wait
                if now >= r.restart_at:
                    self.replicas[self.replicas.index(r)] = self.spawn(r.port, r.restarts + 1, fails)
                    changed = True
                continue
            if r.state == "starting":
                if http_ok(f"http://127.0.0.1:{r.port}/readyz"):
                    r.state, r.failures = "ready", 0
                    self.say(f"replica :{r.port} ready after {now - r.started:.1f}s")
                    changed = True
                elif now - r.started > self.cfg.ready_timeout_s:
                    self.say(f"replica :{r.port} not ready after {self.cfg.ready_timeout_s}s; killing it")
                    r.proc.kill()
        if self.nginx is not None and self.nginx.poll() is not None and not self.stopping:
            self.say(f"nginx exited ({self.nginx.returncode}); restarting it")
            (self.run_dir / "nginx.pid").unlink(missing_ok=True)
            self.start_nginx()
        changed |= self._roll()
        if self.autoscaler is not None:
            changed |= self._autoscale()
        if changed:
            self.apply_upstream()

    def _roll(self) -> bool:
        """One step of a rolling restart: start a replacement, and retire the old one once it is ready."""
        if not self.rolling:
            return False
        port = self.rolling[0]
        old = next((r for r in self.replicas if r.port == port and r.state != "draining"), None)
        if old is None:
            self.rolling.pop(0)
            return False
        new = self._rolling_new
        if new is None or new not in self.replicas:
            self._rolling_new = self.spawn(self._free_port())
            self.replicas.append(self._rolling_new)
            return True
        if new.state == "ready":
            self.retire(old, "rolling restart")
            self._rolling_new = None
            self.rolling.pop(0)
            return True
        return False

    def _autoscale(self) -> bool:
        live = [r for r in self.replicas if r.state in ("starting", "ready")]
        ready = [r for r in live if r.state == "ready"]
        want = self.autoscaler.step([f"http://127.0.0.1:{r.port}/metrics" for r in ready], len(live),
                                    starting=len(live) - len(ready))
        if want is None or want == len(live) or self.rolling:
            return False
        if want > len(live):
            self.say(f"autoscaler: {len(live)} -> {want} replicas ({self.autoscaler.reason})")
            for _ in range(want - len(live)):
                self.replicas.append(self.spawn(self._free_port()))
            return True
        self.say(f"autoscaler: {len(live)} -> {want} replicas ({self.autoscaler.reason})")
        for r in sorted(ready, key=lambda r: -r.port)[:len(live) - want]:
            self.retire(r, "autoscaler scale-down")
        return True

    def shutdown(self) -> None:
        """Stop accepting at nginx first (graceful quit lets it finish in-flight requests), then the
        replicas with SIGTERM (they drain), then redis; SIGKILL only past the grace period."""
        self.stopping = True
        self.say("stopping")
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)
        for r in self.replicas:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)
        procs = [r.proc for r in self.replicas] + [p for p in (self.nginx, self.redis) if p is not None]
        deadline = time.monotonic() + self.cfg.graceful_s + 5
        if self.redis is not None:
            self.redis.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for r in self.replicas:
            self._pidfile(f"replica-{r.port}", None)
        self._pidfile("redis", None)
        (self.run_dir / "nginx.pid").unlink(missing_ok=True)
        self.replicas = []
        self.nginx = self.redis = None
        self.write_state()
        self._pidfile("supervisor", None)
        self.say("stopped")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGINT, lambda *_: setattr(self, "stopping", True))
        signal.signal(signal.SIGHUP, lambda *_: self.rolling.extend(
            r.port for r in self.replicas if r.state == "ready" and r.port not in self.rolling))
        try:
            self.start()
            while not self.stopping:
                self.tick()
                time.sleep(0.25)
        except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as e:
            self.say(f"error: {e}")
            print(f"error: {e}", file=sys.stderr)
            self.shutdown()
            return 1
        self.shutdown()
        return 0


# --------------------------------------------------------------------------------------------------------
# commands
def resolve_run_dir(cfg: ClusterConfig) -> Path:
    p = Path(cfg.run_dir)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def started_pids(run_dir: Path) -> dict[str, int]:
    """{name: pid} from the run directory's PID files, only for processes still running what we started."""
    out = {}
    for f in sorted(run_dir.glob("*.pid")):
        try:
            pid = int(f.read_text().split()[0])
        except (ValueError, IndexError, OSError):
            continue
        name = f.stem
        cl = cmdline(pid)
        expect = {"supervisor": "projects.serve.cluster", "nginx": str(run_dir), "redis": "redis-server"}.get(
            name, f"--port {name.removeprefix('replica-')}")
        if pid_alive(pid) and expect in cl:
            out[name] = pid
    return out


def up(cfg: ClusterConfig) -> int:
    run_dir = resolve_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if started_pids(run_dir):
        print(f"error: a cluster from {run_dir} is running (`python -m projects.serve.cluster down` first)",
              file=sys.stderr)
        return 1
    for f in run_dir.glob("*.pid"):   # stale files of processes that are gone
        f.unlink()
    if not cfg.detach:
        return Cluster(cfg).run()
    argv = [sys.executable, "-m", "projects.serve.cluster", "up", "--no-detach"] + [
        a for f in dataclasses.fields(cfg) if f.name != "detach" for a in _flag(f.name, getattr(cfg, f.name))]
    log = open(run_dir / "supervisor.out", "ab")
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
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


def _flag(name: str, value) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    return [flag, str(value)]


def down(cfg: ClusterConfig, timeout_s: float | None = None) -> int:
    """Stop what the PID files name: the supervisor (which stops its children in order), then anything of
    ours it left behind (a supervisor that was itself SIGKILLed)."""
    run_dir = resolve_run_dir(cfg)
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
    run_dir = resolve_run_dir(cfg)
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
    pid = started_pids(resolve_run_dir(cfg)).get("supervisor")
    if pid is None:
        print("error: no supervisor running", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGHUP)
    print(f"rolling restart requested (supervisor pid {pid}); follow {resolve_run_dir(cfg)}/supervisor.log")
    return 0


def main(argv: list[str] | None = None) -> int:
    cmd, cfg = parse_config(ClusterConfig, argv, __doc__, commands=("up", "down", "status", "restart"))
    return {"up": up, "down": down, "status": status, "restart": restart}[cmd](cfg)


if __name__ == "__main__":
    sys.exit(main())
