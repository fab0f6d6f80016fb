"""Serving at scale: nginx config, the supervisor (replica kill, rolling restart, exact stop), the open-loop
load generator (Poisson schedule, percentiles, goodput, no coordinated omission), the autoscaler's policy,
and the Dockerfile / Kubernetes manifests against the app's settings. Loopback only.

The nginx behaviour tests run a *stand-in* app (`projects/serve/standin.py`: the same routes, a few ms of sleep
instead of models) behind the real nginx and the real supervisor: starting the real app (MiniLM, the FAISS
index, the generator) several times would not fit this file's ~2 minute budget. The serving bench measures
the same replica kill on the real app (`failed_requests_on_replica_kill`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common.env import missing
from projects.serve import autoscale, cluster, loadstats, loadtest, nginx, procs
from projects.serve.workload import Workload, parse_mix

REPO = Path(__file__).resolve().parents[3]
HAVE_NGINX = shutil.which("nginx") is not None
NO_NGINX = missing("nginx")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(n: int) -> int:
    """A base port with n free consecutive ports after it."""
    for _ in range(50):
        base = free_port()
        if base + n < 65000 and all(procs.port_free("127.0.0.1", base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


# --------------------------------------------------------------------------------------------------------
# nginx template
def test_nginx_template_renders_with_the_routing_rules(tmp_path):
    cfg = cluster.ClusterConfig(port=18000, next_upstream_tries=3)
    text = nginx.render_nginx(cfg, tmp_path, [(18101, True), (18102, False)])
    assert "{{" not in text and "least_conn;" in text
    assert "server 127.0.0.1:18101 max_fails=1 fail_timeout=2s;" in text
    assert "server 127.0.0.1:18102 max_fails=1 fail_timeout=2s down;" in text
    blocks = {}
    for chunk in text.split("location ")[1:]:
        head, body = chunk.split("{", 1)
        blocks[head.strip()] = body.split("}", 1)[0]
    idem = blocks["~ ^/v1/(embeddings|search)$"]
    assert "proxy_next_upstream error timeout http_502 http_503 non_idempotent;" in idem
    assert "proxy_next_upstream_tries 3;" in idem
    comp = blocks["~ ^/v1/(chat/)?completions$"]                # chat streams too: unbuffered, no retry
    assert "proxy_buffering off;" in comp and "non_idempotent" not in comp
    # non_idempotent nowhere but the idempotent routes
    assert sum("non_idempotent;" in b for b in blocks.values()) == 1
    # front-door admission for every route, per client address, scaled by the replicas that are up (1 of 2)
    server = text.split("server {", 1)[1].split("location ", 1)[0]
    assert "limit_conn perclient 64;" in server and "limit_conn_zone $binary_remote_addr zone=perclient" in text
    assert "error_page 429 = @overloaded;" in idem and "error_page 429 = @overloaded;" in server
    assert "add_header Retry-After 1 always;" in blocks["@overloaded"]
    # a body still arriving streams to the replica (whose body deadline cuts a trickle), on every proxied route
    assert all("proxy_request_buffering off;" in blocks[k] for k in ("~ ^/v1/(embeddings|search)$",
                                                                     "~ ^/v1/(chat/)?completions$", "/"))
    off = nginx.render_nginx(cluster.ClusterConfig(max_inflight=0), tmp_path, [(18101, True)])
    assert "limit_conn perclient" not in off
    with pytest.raises(ValueError):
        nginx.render_nginx(cfg, tmp_path, [])


@pytest.mark.skipif(not HAVE_NGINX, reason=NO_NGINX)
def test_nginx_accepts_the_rendered_config(tmp_path):
    cfg = cluster.ClusterConfig(port=free_port())
    (tmp_path / "nginx-tmp").mkdir()
    (tmp_path / "nginx.conf").write_text(nginx.render_nginx(cfg, tmp_path, [(18101, True), (18102, True)]))
    nginx.nginx_test(cfg, tmp_path)   # raises with nginx's message if rejected
    (tmp_path / "nginx.conf").write_text("http { bogus_directive on; }")
    with pytest.raises(RuntimeError, match="nginx -t rejected"):
        nginx.nginx_test(cfg, tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NGINX, reason=NO_NGINX)
def test_nginx_own_errors_answer_in_the_apps_json_shape(tmp_path):
    """No replica reachable (502), a body over nginx's limit (413), /metrics or /nginx_status asked from another
    address than the machine's own (403): JSON like the app's errors, not HTML."""
    import httpx
    cfg = cluster.ClusterConfig(port=free_port())
    (tmp_path / "nginx-tmp").mkdir()
    dead = free_range(2)
    (tmp_path / "nginx.conf").write_text(nginx.render_nginx(cfg, tmp_path, [(dead, True), (dead + 1, True)]))
    proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{cfg.port}"
        for _ in range(100):
            try:
                httpx.get(url + "/nginx_status", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        if os.geteuid() == 0:   # started as root: the workers, which face clients, are not root
            workers = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                       for c in (t / "children").read_text().split()]
            uids = {next(ln.split()[1] for ln in Path(f"/proc/{w}/status").read_text().splitlines()
                         if ln.startswith("Uid:")) for w in workers}
            assert workers and uids == {str(pwd.getpwnam("nobody").pw_uid)}, uids
        got = {"down": httpx.post(url + "/v1/embeddings", json={"input": "x"}, timeout=10),
               "chat": httpx.post(url + "/v1/chat/completions", json={"messages": []}, timeout=10),
               "health": httpx.get(url + "/readyz", timeout=10),
               "big": httpx.post(url + "/v1/embeddings", content=b"x" * (9 << 20),
                                 headers={"content-type": "application/json"}, timeout=10),
               "metrics": httpx.get(url + "/metrics", timeout=10)}
        # another address: the service answers it, but not the machine's own metrics and status
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=10) as other:
            got["other_health"] = other.get(url + "/readyz")
            got["other_metrics"] = other.get(url + "/metrics")
            got["other_status"] = other.get(url + "/nginx_status")
    finally:
        proc.terminate()
        proc.wait(10)
    for k in ("other_metrics", "other_status"):
        assert got[k].status_code == 403 and got[k].json()["error"]["type"] == "forbidden", (k, got[k].text[:200])
    for k in ("down", "chat", "health", "metrics", "other_health"):   # passed on (to replicas that are down)
        r = got[k]
        assert r.status_code in (502, 503) and r.json()["error"]["type"] == "unavailable", (k, r.text[:200])
        assert r.headers["content-type"].startswith("application/json") and "retry-after" in r.headers
    assert got["big"].status_code == 413 and got["big"].json()["error"]["type"] == "request_too_large"


# --------------------------------------------------------------------------------------------------------
# load generator: schedule, workload, summary
def test_poisson_schedule_has_the_offered_rate_and_exponential_gaps():
    rng = np.random.default_rng(0)
    rate, dur = 200.0, 50.0
    t = loadtest.poisson_arrivals(rate, dur, rng)
    assert abs(len(t) / dur - rate) < 0.03 * rate             # mean rate (sd of the count is ~1%)
    assert t[0] >= 0 and t[-1] < dur and np.all(np.diff(t) > 0)
    gaps = np.diff(t)
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05            # exponential: CV = 1 (a fixed pace gives 0)
    assert abs((gaps < 1 / rate).mean() - (1 - np.exp(-1))) < 0.02
    with pytest.raises(ValueError):
        loadtest.poisson_arrivals(0, 1, rng)


def test_workload_mix_and_zipf():
    texts = [f"text {i}" for i in range(1000)]
    wl = Workload(texts, parse_mix("embeddings=3,search=1"), zipf=1.1)
    rng = np.random.default_rng(0)
    reqs = [wl.request(rng) for _ in range(4000)]
    routes = [r for r, _, _ in reqs]
    assert abs(routes.count("embeddings") / 4000 - 0.75) < 0.03
    first = [b.get("input", b.get("query")) for _, _, b in reqs]
    h = (1 / np.arange(1, 1001) ** 1.1).sum()
    assert abs(first.count("text 0") / 4000 - 1 / h) < 0.02     # P(rank 1) = 1/H(1000, 1.1)
    with pytest.raises(ValueError, match="unknown route"):
        parse_mix("embed=1")


def test_summary_percentiles_goodput_and_errors_are_exact():
    R = loadstats.Result
    # 100 OK requests with latencies 1..100 ms, 10 refused at 2 ms, 5 connection errors
    res = [R("embeddings", i, i, i + (i + 1) / 1000, "200") for i in range(100)]
    res += [R("search", 0, 0, 0.002, "503") for _ in range(10)]
    res += [R("search", 0, 0, 0.5, "ConnectError") for _ in range(5)]
    s = loadstats.summarize(res, t0=0.0, offered_rps=1.0, duration_s=10.0, slo_s=0.050)
    lat = np.arange(1, 101)
    assert s["p50_ms"] == pytest.approx(np.percentile(lat, 50))
    assert s["p99_ms"] == pytest.approx(np.percentile(lat, 99))
    assert s["max_ms"] == pytest.approx(100)
    assert s["errors"] == {"503": 10, "ConnectError": 5} and s["failed"] == 15 and s["refused"] == 10
    assert s["reject_p99_ms"] == pytest.approx(2)
    wall = 99 + 0.1                                   # last answer at 99.1 s
    assert s["achieved_rps"] == pytest.approx(100 / wall)
    assert s["goodput_rps"] == pytest.approx(50 / wall)  # latencies 1..50 ms meet a 50 ms SLO
    assert s["goodput_fraction"] == pytest.approx(50 / 115)


class _FakeServer:
    """A tiny ASGI app under uvicorn on a thread: 'fast' 10 ms, 'slow' 200 ms, 'fail' 503, 'stall' stops
    the server's event loop for 0.5 s (a GC pause, a stuck batch)."""

    def __init__(self):
        import uvicorn

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            body = b""
            while True:
                msg = await receive()
                body += msg.get("body", b"")
                if not msg.get("more_body"):
                    break
            text = json.loads(body)["input"] if body else ""
            status = 503 if text.startswith("fail") else 200
            if text.startswith("stall"):
                time.sleep(0.5)   # blocks the loop: everything queued behind it waits
            elif status == 200:
                await asyncio.sleep(0.2 if text.startswith("slow") else 0.01)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": b"{}"})

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_loadtest_against_a_fake_server_counts_latency_errors_and_goodput():
    texts = ["fast a", "slow b", "fail c"]
    wl = Workload(texts, {"embeddings": 1.0})
    rate, dur, seed = 40.0, 3.0, 7
    rng = np.random.default_rng(seed)                 # the same stream run_level will draw
    arrivals = loadtest.poisson_arrivals(rate, dur, rng)
    kinds = [wl.request(rng)[2]["input"].split()[0] for _ in arrivals]

    async def go(port):
        async with loadtest.make_client(f"http://127.0.0.1:{port}") as c:
            return await loadtest.run_level(c, wl, rate, dur, slo_ms=100, seed=seed)

    with _FakeServer() as srv:
        s, results = asyncio.run(go(srv.port))
    assert len(results) == len(arrivals)
    assert [r.status for r in results] == ["503" if k == "fail" else "200" for k in kinds]
    assert s["errors"] == {"503": kinds.count("fail")}
    lat = {k: [r.latency for r, kk in zip(results, kinds) if kk == k] for k in ("fast", "slow")}
    # each as the server made it (asyncio's timer may wake a hair before the 0.2 s a perf_counter measures)
    assert max(lat["fast"]) < 0.1 and min(lat["slow"]) >= 0.19
    assert s["goodput_fraction"] == pytest.approx(kinds.count("fast") / len(kinds))
    assert s["p99_ms"] >= 190


def test_breakdown_splits_the_tail_by_the_replica_timing_headers():
    R = loadstats.Result
    fast = [R("embeddings", 0.0, 0.0, 0.030, "200", queue_ms=5.0, inference_ms=20.0) for _ in range(198)]
    slow = [R("embeddings", 0.0, 0.0, 0.100, "200", queue_ms=60.0, inference_ms=30.0) for _ in range(2)]
    b = loadstats.summarize(fast + slow, t0=0.0, offered_rps=1.0, duration_s=1.0, slo_s=1.0)["breakdown"]
    assert b["median"]["queue_ms"] == pytest.approx(5.0) and b["median"]["other_ms"] == pytest.approx(5.0)
    assert b["p99_tail"]["n"] == 2 and b["p99_tail"]["queue_ms"] == pytest.approx(60.0)
    assert b["p99_tail"]["other_ms"] == pytest.approx(10.0)
    no_headers = [R("embeddings", 0.0, 0.0, 0.03, "200") for _ in range(200)]
    assert loadstats.summarize(no_headers, 0.0, 1.0, 1.0, 1.0)["breakdown"] is None   # e.g. through a proxy


def test_sweep_runs_a_named_level_longer():
    """The level whose tail is a goal gets its own duration; the others keep the sweep's."""
    wl = Workload(["fast a"], {"embeddings": 1.0})

    async def go(port):
        async with loadtest.make_client(f"http://127.0.0.1:{port}") as c:
            return await loadtest.sweep(c, wl, 40.0, [0.25, 0.5], 0.5, slo_ms=100, timeout_s=5, seed=1,
                                        progress=False, durations={0.5: 2.0})

    with _FakeServer() as srv:
        short, long = asyncio.run(go(srv.port))
    assert [short["load_fraction"], long["load_fraction"]] == [0.25, 0.5]
    assert 0.5 <= short["wall_s"] < 1.0 and long["wall_s"] >= 2.0
    assert long["sent"] > 2 * short["sent"] and long["failed"] == 0


def test_latency_counts_from_the_schedule_so_a_stall_is_not_hidden():
    # Open loop at 50/s while the server stalls 0.5 s once: every request due during the stall waits for
    # it. A closed-loop client would have sent ~1 request in that window; here ~25 see the stall.
    wl = Workload(["fast"], {"embeddings": 1.0})
    arrivals = np.arange(0, 2.0, 0.02)

    async def go(port):
        async with loadtest.make_client(f"http://127.0.0.1:{port}") as c:
            async def staller():
                await asyncio.sleep(0.5)
                await c.post("/", json={"input": "stall"})
            t = asyncio.create_task(staller())
            s, res = await loadtest.run_level(c, wl, 50, 2.0, arrivals=arrivals)
            await t
            return s, res

    with _FakeServer() as srv:
        s, results = asyncio.run(go(srv.port))
    slow = sum(r.latency > 0.2 for r in results)
    assert slow >= 15, f"only {slow} requests saw the stall"
    assert s["max_ms"] >= 400


def test_a_connection_closed_before_any_response_is_sent_once_more_and_counted():
    # What an nginx reload does to a client: an idle keep-alive connection is closed as the next request
    # goes out. The request never reached an app; the load generator resends it once, and says so.
    async def go(close_first: int):
        conns = []

        async def handle(reader, writer):
            conns.append(1)
            await reader.readuntil(b"\r\n\r\n")
            if len(conns) <= close_first:
                writer.close()   # no status line: "Server disconnected without sending a response"
                return
            body = b'{"data": []}'
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, loadtest.make_client(f"http://127.0.0.1:{port}") as c:
            r = await loadtest.send(c, "embeddings", "/v1/embeddings", {"input": "x"}, 0.0, timeout_s=5)
        return r, len(conns)

    r, n = asyncio.run(go(close_first=1))
    assert (r.status, r.retried, n) == ("200", True, 2)
    r, n = asyncio.run(go(close_first=2))        # once only: a server that keeps failing is a failure
    assert (r.status, r.retried, n) == ("ServerDisconnectedError", True, 2)
    s = loadstats.summarize([r], t0=0.0, offered_rps=1.0, duration_s=1.0, slo_s=1.0)
    assert (s["failed"], s["retried"]) == (1, 1)


# --------------------------------------------------------------------------------------------------------
# autoscaler policy and metrics
def test_histogram_quantile_and_metrics_parsing():
    text = """# TYPE serve_request_duration_seconds histogram
serve_request_duration_seconds_bucket{route="/v1/embeddings",le="0.1"} 90
serve_request_duration_seconds_bucket{route="/v1/embeddings",le="0.5"} 99
serve_request_duration_seconds_bucket{route="/v1/embeddings",le="+Inf"} 100
serve_request_duration_seconds_count{route="/v1/embeddings"} 100
serve_request_duration_seconds_sum{route="/v1/embeddings"} 5
serve_request_duration_seconds_bucket{route="/v1/completions",le="0.1"} 0
serve_request_duration_seconds_bucket{route="/v1/completions",le="0.5"} 0
serve_request_duration_seconds_bucket{route="/v1/completions",le="+Inf"} 50
# TYPE serve_queue_depth gauge
serve_queue_depth{queue="embed"} 3
serve_queue_depth{queue="search"} 2
"""
    samples = autoscale.parse_metrics(text)
    assert autoscale.queue_depth(samples) == 5
    b = autoscale.latency_buckets(samples)           # completions excluded
    assert b == {0.1: 90, 0.5: 99, float("inf"): 100}
    assert autoscale.histogram_quantile(0.5, b) == pytest.approx(0.1 * 50 / 90)
    assert autoscale.histogram_quantile(0.99, b) == pytest.approx(0.5)
    assert autoscale.histogram_quantile(0.999, b) == pytest.approx(0.5)   # past the last bound
    assert autoscale.histogram_quantile(0.5, {}) is None


def test_autoscaler_policy_scales_up_fast_and_down_slowly():
    a = autoscale.Autoscaler(min_replicas=1, max_replicas=3, target_queue=8, slo_ms=250, scale_down_after_s=30)
    assert a.decide(1, [20.0], 0.1, now=0) == 3           # ceil(1 * 20 / 8) = 3
    assert a.decide(1, [20.0], 0.1, now=0, starting=1) == 1  # wait for the starting one
    assert a.decide(2, [1.0, 1.0], 0.4, now=0) == 3       # p99 over the SLO: one more
    assert a.decide(3, [0.0] * 3, 0.01, now=0) == 3       # low load: not yet ...
    assert a.decide(3, [0.0] * 3, 0.01, now=29) == 3
    assert a.decide(3, [0.0] * 3, 0.01, now=31) == 2      # ... only after scale_down_after_s, by one
    assert a.decide(2, [0.0] * 2, 0.2, now=40) == 2       # p99 not calm: no scale-down, timer reset
    assert a.decide(1, [0.0], None, now=100) == 1         # never under the minimum
    assert a.decide(3, [100.0] * 3, 1.0, now=100) == 3    # never over the maximum


# --------------------------------------------------------------------------------------------------------
# the supervisor behind real nginx
def _state(run_dir: Path) -> dict:
    return json.loads((run_dir / "cluster.json").read_text())


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NGINX, reason=NO_NGINX)
def test_replica_kill_rolling_restart_and_exact_stop(tmp_path):
    run_dir = tmp_path / "run"
    port, base = free_port(), free_range(8)
    args = ["--app", "projects.serve.standin:create_app", "--port", str(port),
            "--replica-port", str(base), "--replicas", "2", "--run-dir", str(run_dir), "--graceful-s", "10",
            "--ready-timeout-s", "60"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # not ours to stop
    try:
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "up", "--detach", *args], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr + (run_dir / "supervisor.log").read_text()
        st = _state(run_dir)
        victim = st["replicas"][0]
        wl = Workload([f"text {i}" for i in range(100)], {"embeddings": 0.7, "search": 0.3})
        killed = []

        def kill_once(elapsed):
            if elapsed >= 1.0 and not killed:
                os.kill(victim["pid"], signal.SIGKILL)
                killed.append(elapsed)

        async def steady(on_tick, workload, seconds):
            async with loadtest.make_client(f"http://127.0.0.1:{port}") as c:
                return await loadtest.run_level(c, workload, 60, seconds, slo_ms=1000, on_tick=on_tick)

        s, _ = asyncio.run(steady(kill_once, wl, 3.0))
        assert killed and s["sent"] > 100
        assert s["failed"] == 0, f"client saw failures: {s['errors']}"
        # the supervisor restarts it on the same port, and nginx gets it back when ready
        _wait(lambda: any(x["port"] == victim["port"] and x["pid"] != victim["pid"] and x["state"] == "ready"
                          for x in _state(run_dir)["replicas"]), 30, "the killed replica to come back")

        # rolling restart of every replica under load, streamed completions included: nothing fails
        before = {x["pid"] for x in _state(run_dir)["replicas"]}
        wl_mix = Workload([f"text {i}" for i in range(100)],
                                   {"embeddings": 0.5, "search": 0.2, "completions": 0.3}, max_tokens=10)

        assert subprocess.run([sys.executable, "-m", "projects.serve.cluster", "restart", *args],
                              cwd=REPO, capture_output=True).returncode == 0

        async def rolling():
            async with loadtest.make_client(f"http://127.0.0.1:{port}") as c:
                task = asyncio.create_task(loadtest.run_level(c, wl_mix, 40, 12.0, slo_ms=1000))
                while not task.done():
                    st = _state(run_dir)
                    if {x["pid"] for x in st["replicas"]}.isdisjoint(before) and st["ready"] == 2:
                        break
                    await asyncio.sleep(0.2)
                return await task

        s, results = asyncio.run(rolling())
        after = _state(run_dir)
        assert {x["pid"] for x in after["replicas"]}.isdisjoint(before), after["events"]
        assert sum(r.route == "completions" for r in results) > 20
        assert s["failed"] == 0, f"rolling restart lost requests: {s['errors']}"

        # stop: exactly the processes in the PID files, nothing else
        started = cluster.started_pids(run_dir)
        assert set(started) >= {"supervisor", "nginx", f"replica-{after['replicas'][0]['port']}"}
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "down", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not any(procs.pid_alive(p) for p in started.values())
        assert not list(run_dir.glob("*.pid"))
        assert bystander.poll() is None
        assert procs.port_free("127.0.0.1", port)
    finally:
        subprocess.run([sys.executable, "-m", "projects.serve.cluster", "down", *args], cwd=REPO,
                       capture_output=True, timeout=60)
        bystander.kill()
        bystander.wait()


# --------------------------------------------------------------------------------------------------------
# Dockerfile and Kubernetes manifests against the app's settings
def _dockerfile() -> dict:
    """ENV (name -> value), EXPOSE ports and the CMD of deploy/Dockerfile (continuation lines joined)."""
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    out = {"env": {}, "expose": [], "cmd": None}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENV":
            for pair in rest.split():
                k, _, v = pair.partition("=")
                out["env"][k] = v
        elif word == "EXPOSE":
            out["expose"] += [int(p.split("/")[0]) for p in rest.split()]
        elif word == "CMD":
            out["cmd"] = json.loads(rest)
    return out


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_up_waits_until_nginx_itself_routes_to_the_replicas():
    """A reload takes effect when nginx's new workers take over; until then the old ones (every replica
    `down`) answer 502. `up` returns only after /readyz succeeds through nginx several times in a row."""
    import http.server
    answers = [502, 200, 502, 200, 200, 200]

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(answers.pop(0) if answers else 200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        cfg = cluster.ClusterConfig(host="0.0.0.0", port=srv.server_address[1])
        assert not cluster._front_answers(cfg)       # 502
        assert not cluster._front_answers(cfg)       # 200 then 502: not yet
        assert cluster._front_answers(cfg)           # three in a row
    finally:
        srv.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NGINX, reason=NO_NGINX)
def test_nginx_refuses_past_max_inflight_without_waiting(tmp_path):
    # 1 replica, 2 requests admitted at once: of 8 simultaneous slow (0.2 s) embeddings, 2 are served and
    # 6 refused by nginx itself -- 429, Retry-After, the app's error shape -- before any slot frees up
    import httpx
    run_dir = tmp_path / "run"
    port, base = free_port(), free_range(4)
    args = ["--app", "projects.serve.standin:create_app", "--port", str(port), "--replica-port",
            str(base), "--replicas", "1", "--run-dir", str(run_dir), "--max-inflight", "2", "--nice", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "up", "--detach", *args], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        assert "limit_conn perclient 2;" in (run_dir / "nginx.conf").read_text()
        pid = _state(run_dir)["replicas"][0]["pid"]
        assert os.getpriority(os.PRIO_PROCESS, pid) == 5

        async def burst():
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
                async def one(i):
                    t0 = time.perf_counter()
                    resp = await c.post("/v1/embeddings", json={"input": f"slow {i}"})
                    return resp, time.perf_counter() - t0
                return await asyncio.gather(*(one(i) for i in range(8)))

        got = asyncio.run(burst())
        ok = [t for resp, t in got if resp.status_code == 200]
        refused = [(resp, t) for resp, t in got if resp.status_code == 429]
        assert (len(ok), len(refused)) == (2, 6), [resp.status_code for resp, _ in got]
        assert all(resp.headers["retry-after"] == "1" and resp.json()["error"]["type"] == "overloaded"
                   for resp, _ in refused)
        assert max(t for _, t in refused) < min(ok)   # refused at once, not after a slot freed
    finally:
        subprocess.run([sys.executable, "-m", "projects.serve.cluster", "down", *args], cwd=REPO,
                       capture_output=True, timeout=60)


def _trickle(sock: socket.socket, path: str = "/v1/embeddings", length: int = 1000) -> None:
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: serve\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n{{".encode())


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NGINX, reason=NO_NGINX)
def test_a_client_trickling_bodies_holds_only_its_own_share_and_is_cut(tmp_path):
    """One client (127.0.0.2) trickles request bodies a byte at a time (never a stalled read) on as many
    connections as nginx admits per address: its next request is refused at once (429), another client's
    (127.0.0.1) are served as if nothing happened, and every trickle is answered 408 by the replica's body
    deadline (SERVE_BODY_TIMEOUT_S) and its connection closed. Under one shared count the trickles would hold
    every slot, and nothing would cut them."""
    import select

    import httpx
    run_dir = tmp_path / "run"
    port, base = free_port(), free_range(4)
    args = ["--app", "projects.serve.standin:create_app", "--port", str(port), "--replica-port",
            str(base), "--replicas", "1", "--run-dir", str(run_dir), "--max-inflight", "2", "--nice", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", SERVE_BODY_TIMEOUT_S="2")
    slow: list[socket.socket] = []
    try:
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "up", "--detach", *args], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=90)
        assert r.returncode == 0, r.stderr
        t0 = time.monotonic()
        for _ in range(2):
            slow.append(socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)))
            _trickle(slow[-1])
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as third:
            third.sendall(b'POST /v1/embeddings HTTP/1.1\r\nHost: serve\r\nContent-Type: application/json\r\n'
                          b'Content-Length: 13\r\n\r\n{"input":"x"}')
            third.settimeout(2)
            assert third.recv(4096).startswith(b"HTTP/1.1 429"), "a third request from the same address"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            others = [c.post("/v1/embeddings", json={"input": f"other {i}"}).status_code for i in range(6)]
        assert others == [200] * 6, others
        answers: dict[int, tuple[bytes, float]] = {}
        closed: dict[int, float] = {}
        while len(closed) < len(slow) and time.monotonic() - t0 < 20:
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                if i not in answers:
                    with contextlib.suppress(OSError):
                        sock.send(b"a")
                if select.select([sock], [], [], 0)[0]:
                    data = b""
                    with contextlib.suppress(OSError):
                        data = sock.recv(65536)
                    if data and i not in answers:
                        answers[i] = (data, time.monotonic() - t0)
                    elif not data:
                        closed[i] = time.monotonic() - t0
            time.sleep(0.2)
        assert sorted(answers) == [0, 1], answers
        for data, at in answers.values():
            # (the stand-in has FastAPI's error shape; test_app checks the app's)
            assert data.startswith(b"HTTP/1.1 408") and b"not received within 2 s" in data, data[:300]
            assert 2.0 <= at < 5.0, at
        assert sorted(closed) == [0, 1] and max(closed.values()) < 15, closed
    finally:
        for sock in slow:
            sock.close()
        subprocess.run([sys.executable, "-m", "projects.serve.cluster", "down", *args], cwd=REPO,
                       capture_output=True, timeout=60)


def test_slowclients_keeps_its_connections_trickling_and_counts_what_the_server_did():
    """slowclients.py against a server that answers 408 and closes 1 s after a connection's headers: every
    connection trickles (the server sees bytes arrive a period apart), is counted once per answer with its
    time, and is replaced; none is reported held."""
    from projects.serve import slowclients
    gaps: list[float] = []

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        loop = asyncio.get_running_loop()
        t, end = loop.time(), loop.time() + 1.0
        while loop.time() < end:
            try:
                if await asyncio.wait_for(reader.read(1), end - loop.time()):
                    gaps.append(loop.time() - t)
                    t = loop.time()
            except asyncio.TimeoutError:
                break
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await slowclients.run(slowclients.SlowConfig(
                url=f"http://127.0.0.1:{port}", connections=3, rate_bps=4.0, seconds=3.2, held_limit_s=2.0))
    got = asyncio.run(main())
    assert got["answered"].get("408", 0) >= 6 and set(got["answered"]) == {"408"}, got
    assert 1.0 <= got["answer_s"]["408"]["p50"] < 1.5, got["answer_s"]
    assert got["closed_after_answer_s"]["n"] == got["answered"]["408"] and got["held_past_limit"] == 0, got
    assert got["errors"] == {} and 0.2 <= float(np.median(gaps[1:])) < 0.35, (got, gaps[:8])


def test_the_memory_check_reads_the_manifest_and_a_process_trees_peak(tmp_path):
    """bench_hardening's replica_rss_mb inputs: the Deployment's literal env and memory limit in bytes, and the
    peak RSS summed over a process and its children (a child holding 200 MB counts)."""
    import yaml
    from projects.serve.bench_hardening import GPU_LIB, manifest_replica, tree_peak_rss, tree_pss, tree_pss_gpu_libs
    sp = "7f00-7f01 r-xp 00000000 08:01 42   /v/lib/python3.11/site-packages/"
    gpu = ["nvidia/cublas/lib/libcublasLt.so.13", "torch/lib/libtorch_cuda.so", "triton/_C/libtriton.so",
           "nvidia/cu13/lib/libnvrtc.so.13", "torch/lib/libc10_cuda.so"]
    cpu = ["torch/lib/libtorch_cpu.so", "torch/lib/libc10.so", "torch/lib/libgomp-a34b3233.so.1",
           "numpy.libs/libscipy_openblas64_-ff651d7f.so"]
    assert all(GPU_LIB.search(sp + f) for f in gpu) and not any(GPU_LIB.search(sp + f) for f in cpu)
    assert not GPU_LIB.search("7f00-7f01 r-xp 00000000 08:01 42   /usr/lib/x86_64-linux-gnu/libcurl.so.4")
    assert 0 <= tree_pss_gpu_libs(os.getpid()) <= tree_pss(os.getpid())
    env, limit = manifest_replica()
    dep = next(d for f in (REPO / "deploy" / "k8s").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())
               if d and d["kind"] == "Deployment")
    mem = dep["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert mem.endswith("Gi") and limit == int(mem[:-2]) * 2 ** 30
    assert env["SERVE_GEN_QUANT"] and "SERVE_API_KEYS" not in env     # a secretKeyRef is not a literal value
    code = "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"
    alone = tree_peak_rss(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 20
        while tree_peak_rss(os.getpid()) < alone + (150 << 20) and time.time() < deadline:
            time.sleep(0.2)
        assert tree_peak_rss(os.getpid()) >= alone + (150 << 20)
        assert tree_pss(os.getpid()) >= (150 << 20)       # the child's private pages, now
    finally:
        child.kill()
        child.wait()


def test_dockerfile_and_k8s_manifests_match_the_app():
    import yaml
    from projects.serve.middleware import Metrics
    from projects.serve.settings import Settings
    settings_env = set(Settings().to_env())
    docs = {}
    for f in sorted((REPO / "deploy" / "k8s").glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            docs[d["kind"]] = d
    dep, svc, hpa = docs["Deployment"], docs["Service"], docs["HorizontalPodAutoscaler"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    df = _dockerfile()

    # one port everywhere: uvicorn's --port in the image, EXPOSE, containerPort, the Service's target
    port = int(_flag(df["cmd"], "--port"))
    assert df["expose"] == [port]
    assert c["ports"][0]["containerPort"] == port and c["ports"][0]["name"] == "http"
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", port)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] == dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert df["cmd"][:3] == ["uvicorn", "--factory", "projects.serve.app:create_app"]

    # probes hit the app's real routes, by the port's name
    from projects.serve.app import router
    paths = {r.path for r in router.routes}
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] in paths and c[probe]["httpGet"]["port"] == "http"
    # draining: the pod outlives uvicorn's graceful shutdown plus the preStop sleep
    graceful = int(_flag(df["cmd"], "--timeout-graceful-shutdown"))
    pre = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > graceful + pre
    assert pod["enableServiceLinks"] is False  # the kubelet's SERVE_* service links stay out of the pod
    # least privilege: not root (the image's own uid), no escalation, no capabilities, a read-only root
    # filesystem with a writable /tmp, no service-account token, the default seccomp profile
    psc, csc = pod["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert f"--uid {psc['runAsUser']}" in (REPO / "deploy" / "Dockerfile").read_text()
    assert csc["allowPrivilegeEscalation"] is False and csc["readOnlyRootFilesystem"] is True
    assert csc["capabilities"]["drop"] == ["ALL"] and pod["automountServiceAccountToken"] is False
    vols = {v["name"]: v for v in pod["volumes"]}
    assert any(m["mountPath"] == "/tmp" and "emptyDir" in vols[m["name"]] for m in c["volumeMounts"])
    # a pinned image: a version tag or digest, never :latest or none
    image = c["image"]
    assert ("@sha256:" in image or ":" in image) and not image.endswith(":latest")
    for k in ("cpu", "memory"):
        assert c["resources"]["requests"][k] and c["resources"]["limits"][k]
    # the image never reaches the hub at start (models baked from pinned PyPI packages) and installs a lock
    assert df["env"].get("HF_HUB_OFFLINE") == "1" and df["env"].get("MLSYS_OFFLINE") == "1"
    lock = {ln.split("==")[0] for ln in (REPO / "deploy" / "constraints.lock").read_text().splitlines()
            if "==" in ln}
    import tomllib
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    import re
    wanted = {re.split(r"[\[<>=!~ ]", d)[0].lower().replace("_", "-") for k in ("serve", "infer") for d in extras[k]}
    assert wanted <= {n.replace("_", "-") for n in lock}, wanted - lock
    assert "-c deploy/constraints.lock" in (REPO / "deploy" / "Dockerfile").read_text()

    # every SERVE_* variable is a Settings field, and the values parse (from_env raises on either)
    # (variables from a Secret have valueFrom instead of a value: their names are checked, their values
    # are the operator's)
    assert {e["name"] for e in c["env"] if "value" not in e} <= settings_env
    k8s_env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    for env in (k8s_env, df["env"]):
        serve = {k: v for k, v in env.items() if k.startswith("SERVE_")}
        assert set(serve) <= settings_env, set(serve) - settings_env
        s = Settings.from_env(serve)
        assert str(s.threads) == env["OMP_NUM_THREADS"]          # thread pools sized alike
    assert c["resources"]["limits"]["cpu"] == k8s_env["SERVE_THREADS"]

    # the HPA scales this Deployment on the gauge the app exports, with the local autoscaler's target
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (m,) = hpa["spec"]["metrics"]
    from prometheus_client import generate_latest
    exported = generate_latest(Metrics().registry).decode()
    assert f"# TYPE {m['pods']['metric']['name']} gauge" in exported
    assert m["pods"]["metric"]["name"] == autoscale.QUEUE_METRIC
    assert float(m["pods"]["target"]["averageValue"]) == autoscale.Autoscaler().target_queue
    assert hpa["spec"]["minReplicas"] <= dep["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_NGINX, reason=NO_NGINX)
def test_down_stops_the_orphans_of_a_killed_supervisor(tmp_path):
    run_dir = tmp_path / "run"
    args = ["--app", "projects.serve.standin:create_app", "--port", str(free_port()),
            "--replica-port", str(free_range(4)), "--replicas", "2", "--run-dir", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "up", "--detach", *args], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        started = cluster.started_pids(run_dir)
        assert len(started) == 4                       # supervisor, nginx, 2 replicas
        os.kill(started["supervisor"], signal.SIGKILL)  # nobody left to stop the children in order
        _wait(lambda: not procs.pid_alive(started["supervisor"]), 10, "the supervisor to die")
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "down", *args], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "stopped nginx" in r.stdout, r.stdout + r.stderr
        assert not any(procs.pid_alive(p) for p in started.values())
    finally:
        subprocess.run([sys.executable, "-m", "projects.serve.cluster", "down", *args], cwd=REPO,
                       capture_output=True, timeout=60)


def test_pid_files_name_exactly_the_processes_we_started(tmp_path):
    """After a restart a PID file may name someone else: only the same start time and the exact command-line
    tokens count (`--port 8101` is not `--port 81010`; a redis-server or python we did not start is not ours)."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--port", "81010"])
    try:
        _wait(lambda: "81010" in procs.cmdline(other.pid), 10, "the bystander to start")
        start = procs.start_time(other.pid)
        assert start is not None
        (tmp_path / "replica-8101.pid").write_text(f"{other.pid}\n")              # a substring, not the port
        (tmp_path / "replica-81010.pid").write_text(f"{other.pid} {start + 1}\n")   # the PID, reused later
        (tmp_path / "redis.pid").write_text(f"{other.pid} {start}\n")               # not a redis-server
        (tmp_path / "supervisor.pid").write_text(f"{os.getpid()}\n")                # pytest, not the supervisor
        assert cluster.started_pids(tmp_path) == {}
        (tmp_path / "replica-81010.pid").write_text(f"{other.pid} {start}\n")
        assert cluster.started_pids(tmp_path) == {"replica-81010": other.pid}
    finally:
        other.kill()
        other.wait()


def test_a_second_up_stops_before_touching_the_running_clusters_files(tmp_path):
    """While a supervisor holds the run directory's lock, another `up` exits 1 and leaves its PID files alone
    (it used to delete them as stale, and its shutdown then removed the winner's)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = cluster.lock(run_dir)
    assert fd is not None
    (run_dir / "supervisor.pid").write_text("999999999 1\n")     # a stale-looking file of the running cluster
    try:
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "up", "--run-dir", str(run_dir),
                            "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "another `up`" in r.stderr, r.stderr
        assert (run_dir / "supervisor.pid").exists()
    finally:
        os.close(fd)
    fd2 = cluster.lock(run_dir)                                    # released with its holder
    assert fd2 is not None
    os.close(fd2)
