"""The supervisor degrades instead of failing whole: a rolling restart whose replacement cannot start keeps
the old replica (and no extra one), a replica in a crash loop is retried while the others serve, a config
nginx refuses or a full disk leaves nginx on its last good config. Fake processes and a fake clock: no
nginx or uvicorn, milliseconds."""
from __future__ import annotations

import errno

import pytest

from projects.serve import supervisor
from projects.serve.cluster import ClusterConfig
from projects.serve.supervisor import Cluster, Replica


class FakeProc:
    _next = 10_000_000

    def __init__(self, dies: bool):
        FakeProc._next += 1
        self.pid = FakeProc._next
        self.returncode = 1 if dies else None

    def poll(self):
        return self.returncode

    def kill(self):
        self.returncode = -9

    def send_signal(self, sig):
        self.returncode = 0


class FullDisk:
    def write(self, s):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")


class World:
    """A clock, which ports start badly, and which replicas answer /readyz."""

    def __init__(self, monkeypatch, tmp_path, broken_ports=()):
        self.now = 1000.0
        self.broken = set(broken_ports)
        self.spawned: list[int] = []
        cfg = ClusterConfig(run_dir=str(tmp_path), replicas=2, replica_port=9100, max_start_failures=3)
        tmp_path.mkdir(exist_ok=True)
        self.c = c = Cluster(cfg)
        monkeypatch.setattr(supervisor.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(supervisor, "port_free", lambda host, port: True)
        monkeypatch.setattr(supervisor, "http_ok", lambda url: True)   # alive = ready
        monkeypatch.setattr(supervisor, "start_time", lambda pid: 1)

        def spawn(port, restarts=0, failures=0):
            self.spawned.append(port)
            return Replica(port, FakeProc(port in self.broken), self.now, restarts=restarts, failures=failures)
        monkeypatch.setattr(c, "spawn", spawn)
        c.replicas = [spawn(9100), spawn(9101)]

    def run(self, seconds: float, step: float = 0.25):
        end = self.now + seconds
        while self.now < end:
            self.c.tick()
            self.now += step

    def live(self) -> list[int]:
        return sorted(r.port for r in self.c.replicas if r.state != "draining" and r.proc.poll() is None)


def test_a_rolling_replacement_that_cannot_start_leaves_the_old_replica_and_no_extra(monkeypatch, tmp_path):
    w = World(monkeypatch, tmp_path, broken_ports={9102})
    w.run(1)
    assert w.live() == [9100, 9101]
    w.c.rolling = [9100]
    w.run(120)                        # the replacement on :9102 dies at every start (backoff 2, 4 s)
    assert w.c.rolling == [] and w.live() == [9100, 9101]        # the old one kept, nothing extra
    assert w.spawned.count(9102) == 3 and not any(p > 9102 for p in w.spawned)
    assert any("rolling restart of :9100 abandoned" in e for e in w.c.events)


def test_a_crash_looping_replica_is_retried_while_the_others_serve(monkeypatch, tmp_path):
    w = World(monkeypatch, tmp_path)
    w.run(1)
    w.broken.add(9101)
    next(r for r in w.c.replicas if r.port == 9101).proc.returncode = -9   # killed; every restart dies
    w.run(600)
    assert w.live() == [9100]                                    # still serving with what is healthy
    assert w.spawned.count(9101) >= 5                            # retried, with backoff (not 2400 times)
    assert w.spawned.count(9101) < 30
    w.broken.clear()
    w.run(400)
    assert w.live() == [9100, 9101]                              # and back once it can start


def test_nothing_serving_and_a_crash_loop_stops_the_cluster(monkeypatch, tmp_path):
    w = World(monkeypatch, tmp_path, broken_ports={9100, 9101})
    with pytest.raises(RuntimeError, match="failed to start 3 times"):
        w.run(60)


def test_a_refused_nginx_config_or_a_full_disk_keeps_the_last_good_config(monkeypatch, tmp_path):
    w = World(monkeypatch, tmp_path)
    c = w.c
    reloads = []
    monkeypatch.setattr(supervisor.subprocess, "run", lambda *a, **k: reloads.append(a))
    monkeypatch.setattr(supervisor, "nginx_test", lambda cfg, run_dir: None)
    c.apply_upstream()
    c.nginx = FakeProc(dies=False)                              # nginx running from here on
    good = (tmp_path / "nginx.conf").read_text()

    def refuse(cfg, run_dir):
        raise RuntimeError("nginx -t rejected: unknown directive")
    monkeypatch.setattr(supervisor, "nginx_test", refuse)
    c.replicas[1].state = "starting"
    c.apply_upstream()                                           # no exception: nginx keeps serving
    assert (tmp_path / "nginx.conf").read_text() == good and c._retry_apply_at is not None
    assert any("nginx config not applied" in e for e in c.events)

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(supervisor, "write_atomic", full)
    c.log = FullDisk()                                           # writing the log now fails too
    monkeypatch.setattr(supervisor, "nginx_test", lambda cfg, run_dir: None)
    w.run(5)                                                     # retries: no exception anywhere
    assert c.nginx.poll() is None and w.live() == [9100, 9101]


def test_every_hardening_fault_names_a_test_that_exists():
    """bench_hardening runs these by name: a renamed test must fail here, not vanish from the record."""
    import re
    from common.env import REPO_ROOT
    from projects.serve.bench_hardening import FAULTS
    for fault, test in FAULTS.items():
        path, name = test.split("::")
        assert re.search(rf"^def {name}\(", (REPO_ROOT / path).read_text(), re.M), (fault, test)
