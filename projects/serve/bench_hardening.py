"""The faults a deployment meets, injected one by one: does the service survive each?

    python -m benchmarks.run hardening          # or: python -m projects.serve.bench_hardening

Each fault is injected by a test of its own (the test's docstring says how) that passes only when the
service ends up answering and nothing else was killed or deleted. This runs exactly those tests, in one
pytest process, and records per fault: passed / failed / skipped (with pytest's reason), and seconds. The
goal `faults_survived` is the count that passed; every fault must. A skipped fault (a Debian package
missing) counts as not survived: it was not shown. Then `auth_fuzz`: requests with missing, malformed, altered,
random and revoked API keys against every /v1 route; goal `unauthorized_requests_served` == 0. Then
`replica_memory`: one replica started with deploy/k8s/deployment.yaml's settings, driven with the generation
load (and full embedding batches, and one prompt near the context length), its process tree's peak PSS (less
the GPU-only libraries of a CUDA torch wheel, which the image's CPU wheel does not have) against the manifest's
memory limit; goal `replica_rss_mb` <= 80% of it. Last `slow_clients`: normal clients at half
capacity through nginx, alone and beside 200 connections trickling request bodies (slowclients.py); goal
`slow_client_goodput` >= 0.95, their goodput with the slow connections over without, the slow ones answered
408 by the body deadline.
"""
from __future__ import annotations

import re
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
MANIFEST = REPO_ROOT / "deploy" / "k8s" / "deployment.yaml"
COLUMNS = ["fault", "outcome", "seconds", "test"]


@dataclass
class HardeningConfig:
    timeout_s: int = 600
    """per-test timeout (pytest-timeout)"""
    auth_fuzz_requests: int = 600
    """requests with fuzzed Authorization headers (in process: the real app, MiniLM and stories260K)"""
    memory_index_dir: str = "runs/serve/index-100k"
    """the index the memory check's replica serves (the serving bench's; the image's full-corpus index is
    accounted for by its extra vectors' bytes)"""
    memory_load_s: float = 40.0
    """seconds of generation load (with the shared system prompt, so the prefix cache fills) in the memory check"""
    memory_port: int = 18731
    """127.0.0.1 port of the memory check's replica"""
    slow_connections: int = 200
    """slow clients: connections trickling request bodies at 1 byte/s (projects/serve/slowclients.py)"""
    slow_level_s: float = 15.0
    """seconds of each open-loop level of normal clients at half capacity, with and without the slow ones"""
    slow_rounds: int = 2
    """levels of each kind, interleaved (without, with, without, with): the goal compares their medians"""
    slow_port: int = 18740
    """nginx port of the slow-client check's cluster (its replicas take the next ones)"""


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


def auth_fuzz(n: int, seed: int = 0) -> dict:
    """Requests to every /v1/* route of an app with API keys, under Authorization headers that must all be
    refused: none, empty, other schemes, the valid key altered (a character flipped, cut, extended, case,
    whitespace, control bytes), random keys, a revoked key (deleted from the key file while serving). The
    valid key is sent too, as the control that the routes do answer. Counts what was not refused with 401."""
    import asyncio
    import hashlib
    import random
    import httpx
    import torch
    from projects.infer.weights import load
    from projects.serve.app import create_app
    from projects.serve.engine import GenerationEngine
    from projects.serve.model import Embedder
    from projects.serve.settings import Settings
    rng = random.Random(seed)
    valid, revoked = "sk-" + "".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=40)), "sk-revoked-key-0"
    model, tok = load("stories260k", "cpu", torch.float32)

    def bad() -> bytes | None:
        k = valid
        i = rng.randrange(len(k))
        return rng.choice([
            None, b"", b"Bearer", b"Bearer ", f"Basic {k}".encode(), k.encode(), f"Bearer  {k[:-1]}".encode(),
            f"Bearer {k[:i]}".encode(), f"Bearer {k}x".encode(), f"Bearer {k.upper()}".encode(),
            f"Bearer {k[:i]}{chr(ord(k[i]) ^ 1)}{k[i + 1:]}".encode(), f"Bearer {k}\x00".encode(),
            f"Bearer {revoked}".encode(), ("Bearer " + "".join(rng.choices("xyz0123-_", k=rng.randrange(1, 300)))).encode(),
            b"Bearer \xff\xfe" + k.encode(), f"Token {k}".encode(), f"Bearer {k} {k}".encode()])
    routes = [("POST", "/v1/embeddings", {"input": "a cat"}), ("POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2}),
              ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
              ("GET", "/v1/models", None), ("POST", "/v1/search", {"query": "cat"})]

    async def main(keyfile: Path) -> tuple[int, int, int]:
        tok.chat_template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
        eng = GenerationEngine(model, tok, n_slots=2, model_id="stories260k")
        app = create_app(Settings(offline=True, index_dir="", gen_model="", warmup=False, api_keys_file=str(keyfile)),
                         embedder=Embedder(offline=True), engine=eng)
        served = refused = control_ok = 0
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://s") as c:
                await c.get("/v1/models", headers={"Authorization": f"Bearer {revoked}"})
                keyfile.write_text(f"sha256:{hashlib.sha256(valid.encode()).hexdigest()} bench\n")   # revoke
                await asyncio.sleep(1.1)                                # past the key file's re-read interval
                for _ in range(n):
                    method, path, body = rng.choice(routes)
                    h = bad()
                    r = await c.request(method, path, json=body, headers={} if h is None else {"Authorization": h})
                    served += r.status_code != 401
                    refused += r.status_code == 401
                for method, path, body in routes:
                    r = await c.request(method, path, json=body, headers={"Authorization": f"Bearer {valid}"})
                    control_ok += r.status_code != 401
        return served, refused, control_ok
    with tempfile.TemporaryDirectory() as d:
        keyfile = Path(d) / "keys.txt"
        keyfile.write_text("".join(f"sha256:{hashlib.sha256(k.encode()).hexdigest()} {name}\n"
                                   for k, name in ((valid, "bench"), (revoked, "old"))))
        served, refused, control = asyncio.run(main(keyfile))
    return {"requests": n, "served": served, "refused_401": refused, "valid_key_answered": control,
            "routes": len(routes)}


def manifest_replica() -> tuple[dict[str, str], int]:
    """(the serve container's literal env values, its memory limit in bytes) from deploy/k8s/deployment.yaml."""
    import yaml
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9}
    for doc in yaml.safe_load_all(MANIFEST.read_text()):
        if doc and doc.get("kind") == "Deployment":
            c = doc["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: str(e["value"]) for e in c.get("env", []) if "value" in e}
            lim = str(c["resources"]["limits"]["memory"])
            unit = next((u for u in sorted(units, key=len, reverse=True) if lim.endswith(u)), "")
            return env, int(float(lim.removesuffix(unit)) * units.get(unit, 1))
    raise ValueError(f"no Deployment in {MANIFEST}")


def _tree(pid: int):
    """A process and its descendants (from /proc/<pid>/task/*/children), those still alive."""
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, ValueError):
            continue
        yield p


def _kib(path: str, field: str) -> int:
    """A `Field:  N kB` line of a /proc file, in bytes (0 if the process is gone)."""
    try:
        return 1024 * int(next(ln.split()[1] for ln in Path(path).read_text().splitlines() if ln.startswith(field)))
    except (OSError, StopIteration, ValueError):
        return 0


def tree_peak_rss(pid: int) -> int:
    """Sum of VmHWM (peak resident set) over a process and its descendants: an upper bound of the tree's peak
    (the processes' peaks need not coincide, and pages they share count in each)."""
    return sum(_kib(f"/proc/{p}/status", "VmHWM:") for p in _tree(pid))


def tree_pss(pid: int) -> int:
    """Sum of Pss (proportional set size: a shared page split among its sharers) over a process and its
    descendants now: what the tree's resident pages cost once each, as a container's memory counts them (the
    replica and its embedding worker map the same torch libraries; VmHWM counts them in both)."""
    return sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in _tree(pid))


# GPU-only libraries of torch's CUDA wheel (PyPI's default build, which a venv here has) -- libtorch_cuda, the
# CUDA runtime, cuBLAS, cuDNN, NCCL, nvrtc, nvJitLink, triton: the image installs the CPU wheel, which has none
GPU_LIB = re.compile(r"/site-packages/.*/lib(torch_cuda|c10_cuda|caffe2_nvrtc|cu|nccl|nv|triton)[^/]*\.so[^/]*$")


def tree_pss_gpu_libs(pid: int) -> int:
    """Sum of Pss over the GPU_LIB mappings of a process and its descendants: pages a CPU-wheel install of
    the same code would not have."""
    total = 0
    for p in _tree(pid):
        try:
            lines = Path(f"/proc/{p}/smaps").read_text().splitlines()
        except OSError:
            continue
        gpu = False
        for ln in lines:
            if ln[:1].isdigit() or ln[:1] in "abcdef":          # a mapping's header line: range perms ... path
                gpu = bool(GPU_LIB.search(ln))
            elif gpu and ln.startswith("Pss:"):
                total += 1024 * int(ln.split()[1])
    return total


def replica_memory(cfg: HardeningConfig) -> dict:
    """One replica (`uvicorn --factory`) with the manifest's SERVE_* settings, driven past its capacity: the
    generation mix after a shared system prompt (every KV row busy, the prefix cache filling), one prompt near
    gen_ctx (prefill's largest activations), full embedding batches; then its process tree's peak RSS."""
    import asyncio
    import os
    import subprocess
    from projects.serve import loadtest
    from projects.serve.workload import GenWorkload, Workload, load_texts, system_prompt, words_from
    from projects.serve.index import wordnet_passages
    from projects.serve.procs import http_ok
    from projects.serve.settings import Settings
    manifest_env, limit = manifest_replica()
    index = Path(cfg.memory_index_dir)
    index = index if index.is_absolute() else REPO_ROOT / index
    if not (index / "index.faiss").is_file():
        raise FileNotFoundError(f"{index} has no index: `make setup-bench` builds it")
    env = {**os.environ, **manifest_env, "SERVE_INDEX_DIR": str(index)}
    port = cfg.memory_port
    log = open(tempfile.mkstemp(prefix="hardening-replica-", suffix=".log")[1], "w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "projects.serve.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        # the largest sampled tree PSS, start-up included: [without the GPU-only libraries, with them, their
        # share at that sample]
        pss = [0, 0, 0]

        def take():
            total, gpu = tree_pss(proc.pid), tree_pss_gpu_libs(proc.pid)
            if total - gpu > pss[0]:
                pss[0], pss[2] = total - gpu, gpu
            pss[1] = max(pss[1], total)
        while not http_ok(f"http://127.0.0.1:{port}/readyz"):
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"the replica did not get ready (log: {log.name})")
            take()
            time.sleep(0.25)
        take()
        ready_rss, ready_pss = tree_peak_rss(proc.pid), list(pss)
        texts = load_texts("wordnet", 4000)
        st = Settings.from_env(env)

        async def sample():
            while True:
                take()
                await asyncio.sleep(0.25)

        async def drive() -> dict:
            sampler = asyncio.create_task(sample())
            async with loadtest.make_client(f"http://127.0.0.1:{port}", timeout_s=600) as client:
                # the longest prompt the replica takes: max_chars characters, shortened until it fits gen_ctx
                long, r_long = words_from(texts, 0, st.max_chars)[:st.max_chars], None
                for _ in range(8):
                    r_long = await loadtest.send(client, "completions", "/v1/completions",
                                                 {"prompt": long, "max_tokens": 8, "temperature": 0.0}, 0.0, 600)
                    if r_long.status != "400":
                        break
                    long = long[:int(0.85 * len(long))]
                emb = Workload(texts, {"embeddings": 1.0}, texts_per_request=32)
                s_emb, _ = await loadtest.run_level(client, emb, 4.0, 5.0, timeout_s=120)
                gen = GenWorkload(texts, system=system_prompt(texts, 300))
                s_gen, res = await loadtest.run_level(client, gen, 3.0, cfg.memory_load_s, timeout_s=600)
            sampler.cancel()
            return {"long_prompt_status": r_long.status, "long_prompt_chars": len(long),
                    "embedding_requests": s_emb["sent"], "generation_requests": s_gen["sent"],
                    "generation_ok": sum(r.status == "200" for r in res)}
        load = asyncio.run(drive())
        peak = tree_peak_rss(proc.pid)
        ctx = st.gen_ctx
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    n_full = len(wordnet_passages())
    n_index = sum(1 for _ in open(index / "docs.jsonl"))
    per_vector = sum(f.stat().st_size for f in (index / "index.faiss", index / "docs.jsonl")) / max(n_index, 1)
    extra = max(0, n_full - n_index) * per_vector
    return {"limit_bytes": limit, "ready_peak_rss_bytes": ready_rss, "peak_rss_bytes": peak,
            "ready_pss_bytes": ready_pss[0], "peak_pss_bytes": pss[0], "peak_pss_with_gpu_libs_bytes": pss[1],
            "gpu_libs_pss_bytes": pss[2],
            "index_vectors": n_index, "full_corpus_vectors": n_full, "full_index_extra_bytes": extra,
            "manifest_env": manifest_env, "gen_ctx": ctx, **load}


def slow_clients(cfg: HardeningConfig) -> dict:
    """The serving bench's embeddings deployment (nginx, 2 replicas, dynamic batching, its index): capacity
    (closed loop), then open-loop levels of normal clients at half of it, alternately alone and beside
    `slow_connections` connections from another address that trickle request bodies (slowclients.py, its
    own process, started a few seconds before the level so that its connections are already in place)."""
    import asyncio
    import dataclasses
    import json
    import subprocess

    from common.device import fast_dtype
    from projects.serve import bench, loadtest
    from projects.serve.workload import Workload, load_texts
    bcfg = dataclasses.replace(bench.BenchConfig(), embed_dtype=fast_dtype(), port=cfg.slow_port)
    texts = load_texts("wordnet", bcfg.pool, seed=0)
    wl = Workload(texts, {"embeddings": 1.0})
    settings = bench.served_settings(bcfg, max_batch_size=bcfg.max_batch_size)
    cluster = bench.cluster_config(bcfg, bcfg.replicas, bcfg.threads)
    head_s = 3.0
    levels, attacks = [], []
    with bench.Served("slow-clients", cluster, settings) as s:
        cap = asyncio.run(bench._capacity(s, wl, bcfg, seed=7))
        for i in range(2 * cfg.slow_rounds):
            slow = i % 2 == 1
            proc = None
            if slow:
                out = s.run_dir / f"slowclients-{i}.json"
                proc = subprocess.Popen(
                    [sys.executable, "-m", "projects.serve.slowclients", "--url", s.url, "--connections",
                     str(cfg.slow_connections), "--seconds", str(head_s + cfg.slow_level_s + 1), "--out", str(out)],
                    cwd=REPO_ROOT)
                time.sleep(head_s)

            async def level(seed=10 + i):
                async with loadtest.make_client(s.url) as c:
                    return await loadtest.run_level(c, wl, 0.5 * cap, cfg.slow_level_s, slo_ms=bcfg.slo_ms,
                                                    seed=seed)
            summary, _ = asyncio.run(level())
            summary["slow_clients"] = slow
            levels.append(summary)
            print(f"[slow-clients] {'with   ' if slow else 'without'} {loadtest.format_row(summary)}",
                  file=sys.stderr, flush=True)
            if proc is not None:
                proc.wait(timeout=head_s + cfg.slow_level_s + 60)
                attacks.append(json.loads(out.read_text()))
            time.sleep(1.0)
        body_timeout_s = settings.body_timeout_s
    med = lambda slow: float(np.median([lv["goodput_rps"] for lv in levels if lv["slow_clients"] == slow]))  # noqa: E731
    return {"capacity_rps": cap, "rate_rps": 0.5 * cap, "levels": levels, "slow": attacks,
            "goodput_without": med(False), "goodput_with": med(True), "body_timeout_s": body_timeout_s,
            "per_address_limit": cluster.admitted(bcfg.replicas),
            "deployment": bench.deployment(bcfg.replicas, bcfg.threads), "embed_dtype": bcfg.embed_dtype}


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
    fuzz = auth_fuzz(cfg.auth_fuzz_requests)
    goals = [goal("faults_survived", f"faults injected one by one (each by its test) after which the service "
                  f"answers and nothing else was killed or deleted, of {len(rows)}", survived, len(rows), "==",
                  note="a skipped test (missing Debian package) counts as not shown"),
             goal("unauthorized_requests_served", f"requests without a valid API key answered other than 401, of "
                  f"{fuzz['requests']} fuzzed (missing, malformed, altered, random and revoked keys) over "
                  f"{fuzz['routes']} /v1 routes", fuzz["served"], 0, "==",
                  note=f"control: the valid key was answered on {fuzz['valid_key_answered']} of {fuzz['routes']} routes")]
    mem = replica_memory(cfg)
    extra_mib = mem["full_index_extra_bytes"] / 2 ** 20
    worst = mem["peak_pss_bytes"] / 2 ** 20 + extra_mib
    goals.append(goal("replica_rss_mb", "peak memory (MiB) of a replica's process tree at deploy/k8s's settings "
                      "through start-up and the generation load: the largest sampled sum of PSS without the "
                      "pages of GPU-only libraries (the image's torch is the CPU wheel), plus the full-corpus "
                      "index's extra vectors", worst, round(0.8 * mem["limit_bytes"] / 2 ** 20), "<=",
                      note=f"80% of the manifest's memory limit ({mem['limit_bytes'] / 2 ** 30:g} GiB); PSS sampled "
                           f"every 0.25 s: {mem['peak_pss_bytes'] / 2 ** 20:.0f} MiB peak "
                           f"({mem['ready_pss_bytes'] / 2 ** 20:.0f} MiB up to ready) with the "
                           f"{mem['index_vectors']:,}-vector bench index, + {extra_mib:.0f} MiB for the image's "
                           f"{mem['full_corpus_vectors']:,}; this venv's CUDA wheel (libtorch_cuda, cuBLAS, nvrtc, "
                           f"nvJitLink, triton, ...) held {mem['gpu_libs_pss_bytes'] / 2 ** 20:.0f} MiB of PSS at "
                           f"that sample, left out (with them: {mem['peak_pss_with_gpu_libs_bytes'] / 2 ** 20:.0f} "
                           f"MiB peak + the index's extra); upper bound, VmHWM summed over the processes (shared "
                           f"pages counted in each): {mem['peak_rss_bytes'] / 2 ** 20:.0f} MiB "
                           f"({mem['ready_peak_rss_bytes'] / 2 ** 20:.0f} MiB when ready); load: a "
                           f"{mem['long_prompt_chars']:,}-character prompt (HTTP {mem['long_prompt_status']}; "
                           f"gen_ctx {mem['gen_ctx']}), {mem['embedding_requests']} batches of 32 texts, "
                           f"{mem['generation_requests']} completions over a shared system prompt "
                           f"({mem['generation_ok']} answered 200)"))
    sc = slow_clients(cfg)
    answered = sum((Counter(a["answered"]) for a in sc["slow"]), Counter())
    cut = [a["answer_s"].get("408", {}) for a in sc["slow"]]
    held = sum(a["held_past_limit"] for a in sc["slow"])
    goals.append(goal("slow_client_goodput", f"goodput of normal clients at 0.5x capacity through nginx beside "
                      f"{cfg.slow_connections} connections trickling request bodies at 1 byte/s, over the same "
                      f"level without them (medians of {cfg.slow_rounds} interleaved levels each)",
                      sc["goodput_with"] / sc["goodput_without"], 0.95, ">=",
                      note=f"{sc['deployment']}, {sc['embed_dtype']}, capacity {sc['capacity_rps']:.0f} req/s, "
                           f"levels at {sc['rate_rps']:.0f} req/s: goodput {sc['goodput_without']:.1f} without, "
                           f"{sc['goodput_with']:.1f} with; the slow connections (from another address, nginx "
                           f"admitting {sc['per_address_limit']} in flight per address): answered "
                           f"{dict(sorted(answered.items()))}, the 408s "
                           f"(body_timeout_s {sc['body_timeout_s']:g}) after at most "
                           f"{max((c.get('max') or 0) for c in cut):.1f} s, {held} held past "
                           f"{sc['slow'][0]['held_limit_s']:g} s unanswered" if answered else "the slow clients got no answer"))
    rec = make_record("hardening", cfg, rows, goals, units=UNITS, columns=COLUMNS, notes=notes,
                      extra={"pytest_wall_s": round(time.perf_counter() - t0, 1), "auth_fuzz": fuzz,
                             "replica_memory": mem, "slow_clients": sc})
    path = write_record(rec)
    print(f"{survived}/{len(rows)} faults survived; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
