"""The supervisor behind `python -m projects.serve.cluster` (cluster.py is its command line and
ClusterConfig): `Cluster`, which owns the replica processes, nginx and optionally redis-server, restarts what
dies and rolls restarts through nginx without dropping a request.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.env import REPO_ROOT
from common.files import write_atomic
from projects.serve.nginx import nginx_cmd, nginx_test, render_nginx
from projects.serve.procs import cmdline, http_ok, port_free, start_time

if TYPE_CHECKING:
    from projects.serve.cluster import ClusterConfig


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
        self.run_dir = cfg.resolved_run_dir()
        self.replicas: list[Replica] = []
        self.nginx: subprocess.Popen | None = None
        self.redis: subprocess.Popen | None = None
        self.stopping = False
        self.rolling: list[int] = []     # ports still to be replaced by a rolling restart
        self.events: list[str] = []
        self.autoscaler = None
        self._rolling_port: int | None = None   # the port of the current rolling replacement
        self._good_conf: str | None = None      # the last nginx.conf nginx accepted
        self._retry_apply_at: float | None = None
        self._apply_failures = 0
        self.log = open(self.run_dir / "supervisor.log", "a", buffering=1) if self.run_dir.exists() else None

    # -- bookkeeping --------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        """Log a line; never raises (a full disk must not take the supervisor down with its log)."""
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        self.events = (self.events + [line])[-50:]
        try:
            print(line, file=self.log or sys.stderr, flush=True)
        except OSError:
            with contextlib.suppress(OSError):
                print(line, file=sys.stderr, flush=True)

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
        try:
            write_atomic(self.run_dir / "cluster.json", json.dumps(state, indent=1) + "\n")
        except OSError as e:   # full disk: the state file is for `status`; serving goes on
            self.say(f"warning: cannot write cluster.json ({e.strerror})")

    def _pidfile(self, name: str, pid: int | None) -> None:
        p = self.run_dir / f"{name}.pid"
        if pid is None:
            p.unlink(missing_ok=True)
            return
        try:
            write_atomic(p, f"{pid} {start_time(pid)}\n")  # the start time: cluster.started_pids' identity check
        except OSError as e:   # full disk: this supervisor still stops it; only a `down` after its death cannot
            self.say(f"warning: cannot write {p.name} ({e.strerror})")

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
        # Overload answers 429, not 503, behind nginx (this rule lives here alone): nginx retries 503s on
        # another replica and counts them against max_fails, so under overload 503s would mark healthy
        # replicas dead ("no live upstreams", 502). A 429 goes straight back to the client with Retry-After.
        env["SERVE_OVERLOAD_STATUS"] = "429"
        if self.redis is not None and not env.get("REDIS_URL"):
            env["REDIS_URL"] = f"redis://127.0.0.1:{cfg.redis_port}/0"
        cmd = [sys.executable, "-m", "uvicorn", "--factory", cfg.app, "--host", "127.0.0.1", "--port", str(port),
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
        """Render nginx.conf for the replicas' states and reload nginx. Once nginx runs, a failure (nginx -t
        refuses, a full disk) keeps it serving on the last config it accepted, and is retried with backoff."""
        servers = [(r.port, r.state == "ready") for r in self.replicas]
        if not servers:
            return
        text = render_nginx(self.cfg, self.run_dir, servers)
        conf = self.run_dir / "nginx.conf"
        running = self.nginx is not None and self.nginx.poll() is None
        try:
            write_atomic(conf, text)
            if running:
                nginx_test(self.cfg, self.run_dir)
                # reload = new workers on the new config; old workers finish what they hold, then exit
                subprocess.run(nginx_cmd(self.cfg, self.run_dir, "-s", "reload"), check=True, capture_output=True)
                self.say("nginx reloaded: " + " ".join(f":{p}{'' if up else '(down)'}" for p, up in servers))
            self._good_conf, self._retry_apply_at, self._apply_failures = text, None, 0
        except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
            if not running:
                raise
            self._apply_failures += 1
            wait = min(60.0, 2.0 ** self._apply_failures)
            self._retry_apply_at = time.monotonic() + wait
            self.say(f"error: nginx config not applied ({e}); nginx keeps serving the previous one; "
                     f"retrying in {wait:.0f}s")
            if self._good_conf is not None:   # a restart of nginx must find a config it accepts
                with contextlib.suppress(OSError):
                    write_atomic(conf, self._good_conf)
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
                # it never got ready, which is a crash loop: back off; with nothing else serving, give up
                fails = r.failures + (r.state == "starting")
                serving = any(o.state == "ready" and o.proc.poll() is None for o in self.replicas if o is not r)
                if fails >= self.cfg.max_start_failures:
                    try:
                        tail = (self.run_dir / f"replica-{r.port}.log").read_text(errors="replace").strip()
                    except OSError:
                        tail = ""
                    why = (f"replica :{r.port} failed to start {fails} times in a row; last log line: "
                           f"{tail.splitlines()[-1] if tail else '(empty)'} (see {self.run_dir}/replica-{r.port}.log)")
                    if not serving:
                        raise RuntimeError(why)
                    if r.port == self._rolling_port:   # a replacement that cannot start: keep the old one
                        self.replicas.remove(r)
                        self._pidfile(f"replica-{r.port}", None)
                        self.say(f"error: {why}; rolling restart of :{self.rolling.pop(0)} abandoned, the old "
                                 "replica keeps serving")
                        self._rolling_port = None
                        changed = True
                        continue
                    if r.restart_at is None:
                        self.say(f"error: {why}; the others keep serving; retrying with backoff")
                wait = min(300.0 if fails >= self.cfg.max_start_failures else 30.0, 2.0 ** fails) if fails else 0.0
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
        if self._retry_apply_at is not None and now >= self._retry_apply_at:
            changed = True
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
        # the replacement by its port: if it dies while starting, tick() restarts it on that port (a new
        # Replica object), and that restart is still this step's replacement, not a reason for another one
        new = next((r for r in self.replicas if r.port == self._rolling_port), None)
        if new is None:
            new = self.spawn(self._free_port())
            self._rolling_port = new.port
            self.replicas.append(new)
            return True
        if new.state == "ready":
            self.retire(old, "rolling restart")
            self._rolling_port = None
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
