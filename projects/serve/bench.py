"""The serving bench: the real service behind nginx on loopback, measured side by side in one run.

    python -m projects.serve.bench                # default preset; make bench-serve
    python -m projects.serve.bench --full         # 10 s levels and capacity runs
    python -m projects.serve.bench --index-dir runs/serve/index-smoke --level-s 2   # a quick smoke run

Needs an index of >= 100k passages (`make bench-serve` builds runs/serve/index-100k: the first 100k of
the ~166k WordNet passages) and nginx.
What it measures, in this order:
  1. the offline ceiling: the same model encoding the same texts in batches of 128 in this process, no
     HTTP, fp32 and bf16 (and bf16's cosine to fp32); and one replica's model alone (its threads) at batch 1
     vs batch 128, the bound on what batching can gain;
  2. ANN: HNSW recall@10 and single-thread speed-up against exact IndexFlatIP on the served index;
  3. generation per-token latency along the sequence with the static KV cache vs recomputing the prefix;
  4. through nginx (cluster.py, the deployment `make serve` runs: 2 replicas x 1 thread, here pinned to
     their own cores), embeddings only, open-loop Poisson load (loadtest.py): batch-1 serving vs dynamic
     batching -- capacity, then a sweep of offered load to 2x capacity (latency vs throughput, overload
     refusals, goodput, replica memory), both deployments up at once and their sweeps interleaved `repeats`
     times (medians) -- and a SIGKILLed replica under steady embeddings + search load;
     cache off vs on under a Zipf stream; the HTTP path alone (standin.py: the same routes, no model), the
     bound the cores put on served throughput; 1 replica x 2 threads on the same cores;
  5. the generation load test (GenWorkload: streamed completions from a fixed mix of prompt and
     output lengths, open loop like vLLM's benchmark_serving) on 1 replica x 1 pinned thread behind nginx:
     the generator alone first (decode tokens/s at batch 1 and at gen_slots rows, prefill times: the
     bounds), then continuous batching (gen_slots rows) against one request at a time (1 row) -- capacity
     and a sweep to 2x capacity: TTFT, TPOT and ITL p50/p99, output tokens/s, goodput under the TTFT + TPOT
     SLO, refusals -- and, with a shared system prompt of gen_system_tokens tokens, the prefix cache on
     against off at the same load.
The load generator runs on the same 2 cores as the service: its CPU is taken from the replicas, so the
served numbers are a lower bound of what a separate client machine would see.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from common import config
from common.env import REPO_ROOT
from common.timing import timed
from projects.serve import loadtest
from projects.serve.workload import GenWorkload, Workload, load_texts, system_prompt
from projects.serve.procs import port_free
from projects.serve.settings import Settings
from projects.serve.cluster import ClusterConfig

KILL_LOAD = 0.3   # offered load of the SIGKILL experiment, as a fraction of the deployment's capacity
STANDIN_APP = "projects.serve.standin:create_app"


@dataclass
class BenchConfig:
    index_dir: str = "runs/serve/index-100k"
    """the served index (`make bench-serve` builds it: python -m projects.serve.index --limit 100000);
    ANN goals need >= 100k passages"""
    embed_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """served embedding dtype: fp32, bf16, or auto = bf16 where it is fast (CUDA, or a CPU with AMX /
    avx512_bf16), else fp32; the ceiling is measured in both where bf16 is fast"""
    slo_ms: float = 500.0
    """latency SLO for embeddings (p99), for goodput and 'throughput at SLO'"""
    level_s: float = 3.0
    """seconds of open-loop arrivals per load level"""
    half_s: float = 10.0
    """seconds of the 0.5x level, whose p99 / p50 is a goal: a p99 over a 3 s level rests on a handful of
    requests and moved widely between runs"""
    capacity_s: float = 4.0
    """seconds of closed-loop saturation to measure capacity"""
    levels: str = "0.1,0.25,0.5,0.75,0.9,0.95,1.0,1.5,2.0"
    """offered load as fractions of measured capacity; finer just under 1.0, where the best rate within the
    SLO lies (at 1.0 itself a Poisson stream's bursts already meet the bounded queue)"""
    repeats: int = 3
    """batch-1 and dynamic-batching sweeps, interleaved (both deployments up at once, the idle one idle):
    their SLO throughputs are the medians, and the table, plots and overload goals use the median run (one
    run of each swung the batching ratios between runs on a 2-core VM; the goal's note lists every run)"""
    replicas: int = ClusterConfig.replicas
    """replicas of the served deployment (batch-1, dynamic batching, cache, SIGKILL), as `make serve` starts"""
    threads: int = ClusterConfig.threads
    """threads per replica, each replica pinned to its own cores; the comparison deployment is 1 replica
    with replicas x threads threads (same cores)"""
    max_batch_size: int = Settings.max_batch_size
    """dynamic batching: most texts per batch (a full batch must fit the SLO with one queued behind it)"""
    max_queue: int = 64
    """queued texts per replica before refusing: bounds the wait to ~max_queue / capacity and refuses the
    excess at once. A count, not seconds: on a slower machine accepted requests wait longer and can miss the
    SLO under overload (goodput_fraction_at_overload's note in the serve record). nginx's front-door admission
    is the cluster's own default (ClusterConfig.max_inflight, as `make serve` runs it)"""
    nice: int = 10
    """replicas' niceness: the load generator shares the 2 cores, and its CPU (a real client's own machine)
    must not show up as server latency, nor the client starve while the replicas compute"""
    zipf: float = 1.1
    """Zipf exponent of the cache experiment's query stream"""
    pool: int = 10000
    """distinct texts the load draws from"""
    ceiling_texts: int = 1024
    """texts encoded for the offline ceiling"""
    gen_model: str = "smollm2-135m"
    """generator for the KV cache experiment (falls back to stories260k if it cannot be loaded; empty =
    skip). stories260k is too small to show attention cost: Python overhead dominates every step"""
    kv_tokens: int = 192
    """sequence length of the KV cache experiment"""
    gen_load: bool = True
    """run the generation load test (5.) on gen_model: the generator alone, 3 deployments started, capacity
    runs, 8 levels of gen_level_requests (+ the answers still streaming) and 2 system-prompt levels (the serve
    record's wall time says what it cost)"""
    gen_quant: Literal["", "int8", "int4", "q4_1", "q8_0"] = "q4_1"
    """the generation deployments' quantization (SERVE_GEN_QUANT; "" for stories260k)"""
    gen_slots: int = 8
    """KV cache rows of the continuous-batching deployment (the one-at-a-time deployment has 1)"""
    gen_ctx: int = 1024
    """KV cache positions per row: the system prompt + the mix's longest prompt (~160 tokens) + 64 new fit"""
    gen_max_queue: int = 16
    """completions waiting for a row before a replica refuses: a bound on memory; gen_max_wait_ms is the one
    that refuses under overload here"""
    gen_max_wait_ms: float = 1000.0
    """a replica refuses a completion whose expected wait for a row exceeds this: half the TTFT SLO, the rest
    left for its own prefill (the mix's longest prompts), the HTTP path and the estimate's error. Seconds, not
    a count: a count's wait grows with the machine's step time (a slower machine missed the SLO with 4)"""
    gen_levels: str = "0.5,0.75,1.0,1.5,2.0"
    """offered generation load as fractions of the measured capacity (one-at-a-time: those <= 1)"""
    gen_level_requests: int = 40
    """completions per generation level, the same ones at every level (Poisson times scaled to its rate): a
    level of fixed seconds gave the light levels a handful, and levels drawing different requests differed
    by their draws as much as by their load (--full: 80)"""
    gen_capacity_s: float = 20.0
    """seconds of closed-loop generation to measure capacity (gen_slots + 1 users; 2 for one-at-a-time); the
    last three quarters count, some tens of completions"""
    gen_ttft_slo_ms: float = 2000.0
    """generation SLO: time to first token (p99 of a level, and per request for goodput)"""
    gen_tpot_slo_ms: float = 200.0
    """generation SLO: time per output token after the first (p99 of a level, and per request for goodput)"""
    gen_system_tokens: int = 400
    """length of the shared system prompt of the prefix cache experiment, in the generator's tokens"""
    gen_system_load: float = 0.5
    """the system-prompt levels' rate, as the share of the engine's time a cache-off request alone takes
    (its prefill + decode, measured offline): light enough that cache-off TTFT is its prefill, not a queue"""
    gen_system_requests: int = 6
    """expected requests of each system-prompt level (its duration = this / rate): cache off, each costs the
    prefill of the whole system prompt and question"""
    ann_queries: int = 1000
    """WordNet lemma queries for recall@10 (0 = skip the ANN goals)"""
    port: int = 18400
    """nginx port of the bench's clusters (replicas use port+11...)"""
    preset: Literal["default", "full"] = "default"
    """which preset this config started from (set by the preset functions)"""


def full() -> BenchConfig:
    """10 s levels and capacity runs; generation: 80 requests per level from 0.25x, 24 per system-prompt
    level."""
    return BenchConfig(level_s=10.0, capacity_s=10.0, gen_levels="0.25,0.5,0.75,1.0,1.25,1.5,2.0",
                       gen_level_requests=80, gen_capacity_s=40.0, gen_system_requests=24, preset="full")


PRESETS = {"default": BenchConfig, "full": full}


# --------------------------------------------------------------------------------------------------------
# in-process measurements
def offline_ceiling(texts: list[str], dtypes=("fp32", "bf16"), batch: int = 128, repeats: int = 3) -> dict:
    """sentences/s encoding `texts` in batches in one process (no HTTP), per dtype; bf16 cosine to fp32."""
    import torch
    from projects.serve.model import Embedder
    torch.set_num_threads(os.cpu_count() or 1)
    out, vecs = {}, {}
    # length-sorted batches, as an offline encoder would do (projects.serve.index.encode_corpus): random
    # batches pad every text to the batch's longest and would understate the ceiling
    texts = sorted(texts, key=len)
    for dt in dtypes:
        emb = Embedder(dtype=dt)
        emb.encode(texts[:batch])                                   # warm-up
        t, vecs[dt] = timed(lambda e=emb: np.concatenate([e.encode(texts[i:i + batch])
                                                          for i in range(0, len(texts), batch)]), repeats=repeats)
        out[dt] = {"texts_per_s": len(texts) / t, "version": emb.version}
        del emb
        gc.collect()
    if "fp32" in vecs and "bf16" in vecs:
        cos = (vecs["fp32"] * vecs["bf16"]).sum(1)
        out["bf16_cosine_min"], out["bf16_cosine_mean"] = float(cos.min()), float(cos.mean())
    return out


def offline_batching(texts: list[str], dtype: str, threads: int, batch: int = 128, n_one: int = 200,
                     served_batch: int = 32) -> dict:
    """texts/s of one replica's model alone (in this process, `threads` threads, the served dtype): one text
    at a time vs length-sorted batches, whose ratio bounds what dynamic batching can gain over batch-1
    serving on this CPU (the served ratio also pays HTTP on the same cores); and batches as a server sees
    them (random lengths) padded to their longest vs packed several texts to a row."""
    import torch
    from projects.serve.model import Embedder
    torch.set_num_threads(threads)
    emb = Embedder(dtype=dtype)
    emb.encode(texts[:batch])                                       # warm-up
    shuffled = list(np.random.default_rng(0).permutation(texts))[:512]

    def rate(sub: list[str], bs: int, pack: bool = True) -> float:
        ts = []
        for _ in range(2):
            t0 = time.perf_counter()
            for i in range(0, len(sub), bs):
                emb.encode_counted(sub[i:i + bs], pack=pack)
            ts.append(time.perf_counter() - t0)
        return len(sub) / float(np.median(ts))

    out = {"threads": threads, "batch": batch, "served_batch": served_batch,
           "batch1_texts_per_s": rate(texts[:n_one], 1), "batch_texts_per_s": rate(sorted(texts, key=len), batch),
           "random_padded_texts_per_s": rate(shuffled, served_batch, pack=False),
           "random_packed_texts_per_s": rate(shuffled, served_batch)}
    torch.set_num_threads(os.cpu_count() or 1)
    out["bound"] = out["batch_texts_per_s"] / out["batch1_texts_per_s"]
    out["packing_gain"] = out["random_packed_texts_per_s"] / out["random_padded_texts_per_s"]
    return out


def kv_cache_latency(name: str, n_tokens: int, n_points: int = 6, reps: int = 3) -> dict:
    """Per-token decode latency (ms) at positions along the sequence: with the static KV cache (one token
    through the model per step) vs without (the whole prefix recomputed every step)."""
    import torch
    from projects.infer.weights import load
    model, _ = load(name, "cpu", torch.float32)
    model.eval()
    n_tokens = min(n_tokens, model.args.max_seq_len)
    ids = torch.randint(0, model.args.vocab_size, (1, n_tokens))
    every = max(1, n_tokens // n_points)
    positions = list(range(every, n_tokens, every))
    res = {"positions": positions, "kv_ms": [], "no_kv_ms": []}

    def ms(fn):
        return 1000 * timed(fn, repeats=reps)[0]

    with torch.inference_mode():
        model.setup_caches(1, n_tokens)
        model(ids[:, :every], torch.arange(every))                  # prefill
        for p in positions:
            model(ids[:, :p], torch.arange(p))                       # the cache holds 0..p-1
            res["kv_ms"].append(ms(lambda: model(ids[:, p:p + 1], torch.tensor([p]))))
        model.remove_caches()
        for p in positions:
            res["no_kv_ms"].append(ms(lambda: model(ids[:, :p + 1])))
    res["model"] = name
    return res


def offline_generation(settings: Settings, wl: GenWorkload, system_tokens: int, threads: int,
                       n_prompts: int = 64) -> dict:
    """The generator alone, built as a replica builds it (app.make_engine: the same weights, quantization and
    KV cache) on a replica's `threads`, no HTTP. Measures the bounds of the generation goals:
      - decode tokens/s at batch 1 and at settings.gen_slots rows (each row at the mix's typical position):
        the model's own batching gain;
      - the prefill of the mix's mean prompt, which continuous batching does not batch (a row is prefilled
        alone), hence `mix_bound`: served tokens/s of gen_slots rows over 1 row at full load, at most
        (P + O s1) / (P + O sB / B) for prefill P, mean max_tokens O and decode steps s1, sB;
      - the shared system prompt: pool text cut to exactly `system_tokens` tokens (returned as `system`),
        and the prefill of system + mean prompt from position 0 (cache off) against the part past the
        prefix cache's full blocks (cache on): `prefix_bound`, the TTFT ratio with no queue and no HTTP.
    `service_off_s` is a cache-off request alone: full prefill + O decode steps at batch 1."""
    import torch
    from projects.serve.app import make_engine
    from projects.serve.engine import _row_view
    torch.set_num_threads(threads)
    eng = make_engine(settings)
    model, tok = eng.model, eng.tokenizer
    ids_of = lambda text, special=True: tok(text, add_special_tokens=special)["input_ids"]  # noqa: E731
    n_special = len(ids_of("a")) - len(ids_of("a", False))            # a BOS the tokenizer puts first
    system = tok.decode(ids_of(system_prompt(wl.texts, 2 * system_tokens), False)[:system_tokens])
    rng = np.random.default_rng(0)
    prompts = [wl.request(rng)[2] for _ in range(n_prompts)]
    p_tok = float(np.mean([len(ids_of(b["prompt"])) for b in prompts]))
    full_tok = float(np.mean([len(ids_of(f"{system}\n\n{b['prompt']}")) for b in prompts]))
    out_tok = float(np.mean([b["max_tokens"] for b in prompts]))
    n_sys = len(ids_of(system, False))
    block = eng.prefix.block_tokens if eng.prefix is not None else None
    cached = (n_special + n_sys) // block * block if block else 0      # full blocks of system tokens only
    vocab = model.args.vocab_size

    def prefill_s(n: int, start: int = 0, repeats: int = 3) -> float:
        ids = torch.randint(0, vocab, (1, n))
        with torch.inference_mode(), _row_view(model, 0):
            return timed(lambda: model(ids, torch.arange(start, start + n)), warmup=1, repeats=repeats)[0]

    def step_s(rows: int) -> float:
        tk = torch.zeros(rows, 1, dtype=torch.long)
        pos = torch.full((rows, 1), int(p_tok + out_tok / 2))
        with torch.inference_mode():
            return timed(lambda: model(tk, pos), warmup=2, repeats=10)[0]

    B = settings.gen_slots
    s1, sB = step_s(1), step_s(B)
    P = prefill_s(round(p_tok))
    full = prefill_s(round(full_tok), repeats=1)
    suffix = prefill_s(round(full_tok) - cached, start=cached) if cached else None
    torch.set_num_threads(os.cpu_count() or 1)
    return {"threads": threads, "slots": B, "system": system, "system_tokens": n_sys,
            "decode_tok_s_1": 1 / s1, "decode_tok_s_b": B / sB, "decode_gain": s1 * B / sB,
            "prompt_tokens_mean": p_tok, "max_tokens_mean": out_tok, "prefill_prompt_s": P,
            "mix_bound": (P + out_tok * s1) / (P + out_tok * sB / B),
            "full_tokens_mean": full_tok, "cached_tokens": cached, "prefill_full_s": full,
            "prefill_suffix_s": suffix, "prefix_bound": full / suffix if suffix else None,
            "service_off_s": full + out_tok * s1}


# --------------------------------------------------------------------------------------------------------
# clusters
class Served:
    """`python -m projects.serve.cluster up --detach` of this cluster, its replicas running these settings;
    leaving the `with` brings it down. The configs cross into the processes once, here: the cluster's as
    flags, the replicas' as SERVE_* variables."""

    def __init__(self, name: str, cluster: ClusterConfig, settings: Settings, env: dict | None = None):
        self.cluster = cluster = dataclasses.replace(cluster, run_dir=str(REPO_ROOT / "runs/serve/bench" / name))
        self.run_dir = Path(cluster.run_dir)
        self.url = f"http://127.0.0.1:{cluster.port}"
        self.args = config.to_argv(cluster)
        # closed-loop capacity runs this many users: no more than nginx admits (refused users would spin)
        self.concurrency = min(64, settings.max_queue, cluster.admitted(cluster.replicas) or 64)
        self.env = {**os.environ, **settings.to_env(), **(env or {})}
        self.name = name

    def __enter__(self):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "projects.serve.cluster", "up", "--detach", *self.args],
                           cwd=REPO_ROOT, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"cluster {self.name} did not start: {r.stderr.strip()}")
        print(f"[{self.name}] ready in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
        return self

    def __exit__(self, *exc):
        subprocess.run([sys.executable, "-m", "projects.serve.cluster", "down", *self.args], cwd=REPO_ROOT,
                       env=self.env, capture_output=True)

    def state(self) -> dict:
        return json.loads((self.run_dir / "cluster.json").read_text())

    def replica_rss_mb(self) -> float:
        """Resident memory of the replicas and their children (each replica's embedding worker process)."""
        def tree(pid: int) -> list[int]:
            try:
                kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                kids = []
            return [pid] + [p for k in kids for p in tree(int(k))]

        total = 0
        for r in self.state()["replicas"]:
            for pid in tree(r["pid"]):
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1]) / 1024
                except OSError:
                    pass
        return total

    def scrape(self) -> list:
        import httpx
        samples = []
        from projects.serve.autoscale import parse_metrics
        for r in self.state()["replicas"]:
            samples += parse_metrics(httpx.get(f"http://127.0.0.1:{r['port']}/metrics", timeout=2).text)
        return samples


def deployment(replicas: int, threads: int) -> str:
    return f"{replicas} replica{'s' * (replicas > 1)} x {threads} thread{'s' * (threads > 1)}"


def served_settings(cfg: BenchConfig, **kw) -> Settings:
    """What every bench replica runs: the bench's index and dtype, embeddings only, no cache unless asked;
    `kw` overrides any of it."""
    return Settings(**{"index_dir": cfg.index_dir, "embed_dtype": cfg.embed_dtype, "gen_model": "",
                       "max_queue": cfg.max_queue, "cache_entries": 0, **kw})


def gen_settings(cfg: BenchConfig, **kw) -> Settings:
    """A generation deployment's replica: the bench's generator, no index, the embedding model in process
    (it still loads and warms up, at batch 8; no request of the generation load touches it)."""
    return served_settings(cfg, **{"index_dir": "", "embed_worker": False, "max_batch_size": 8,
                                   "gen_model": cfg.gen_model, "gen_quant": cfg.gen_quant,
                                   "gen_slots": cfg.gen_slots, "gen_ctx": cfg.gen_ctx,
                                   "gen_max_queue": cfg.gen_max_queue,
                                   "gen_max_wait_ms": cfg.gen_max_wait_ms, **kw})


def cluster_config(cfg: BenchConfig, replicas: int, threads: int, pin: bool = True) -> ClusterConfig:
    return ClusterConfig(port=cfg.port, replica_port=cfg.port + 11, replicas=replicas, threads=threads, pin=pin,
                         graceful_s=10, ready_timeout_s=300, nice=cfg.nice)


def at_slo(levels: list[dict], limits: dict[str, float], key: str = "achieved_rps") -> float:
    """Highest `key` (throughput) among levels with nothing refused or failed whose every `limits` entry
    (e.g. {"p99_ms": 500}) was measured and is within its bound."""
    ok = [s[key] for s in levels if s["failed"] == 0
          and all(s.get(k) is not None and s[k] <= bound for k, bound in limits.items())]
    return max(ok) if ok else 0.0


async def _capacity(served: Served, wl, cfg: BenchConfig, seed: int) -> float:
    async with loadtest.make_client(served.url) as c:
        return await loadtest.measure_capacity(c, wl, cfg.capacity_s, concurrency=served.concurrency, seed=seed)


def sweep_experiment(served: Served, wl, levels: list[float], seed: int, *, capacity_s: float, level_s: float,
                     concurrency: int, **sweep_kw) -> dict:
    """Capacity (closed loop, `concurrency` users), then one open-loop level per fraction of it
    (loadtest.sweep with `sweep_kw`); replica memory before and after, restarts."""
    async def go():
        async with loadtest.make_client(served.url) as c:
            cap = await loadtest.measure_capacity(c, wl, capacity_s, concurrency=concurrency, seed=seed)
            return cap, await loadtest.sweep(c, wl, cap, levels, level_s, seed=seed, **sweep_kw)
    rss0 = served.replica_rss_mb()
    cap, rows = asyncio.run(go())
    st = served.state()
    return {"capacity_rps": cap, "levels": rows, "rss_mb_before": rss0, "rss_mb_after": served.replica_rss_mb(),
            "restarts": sum(r["restarts"] for r in st["replicas"])}


def embeddings_sweep(served: Served, wl, cfg: BenchConfig, levels: list[float], seed: int) -> dict:
    """sweep_experiment for embeddings: the 0.5x level runs half_s; slo_rps = the best rate within the SLO."""
    e = sweep_experiment(served, wl, levels, seed, capacity_s=cfg.capacity_s, level_s=cfg.level_s,
                         concurrency=served.concurrency, slo_ms=cfg.slo_ms, timeout_s=30,
                         durations={0.5: max(cfg.half_s, cfg.level_s)})
    e["slo_rps"] = at_slo(e["levels"], {"p99_ms": cfg.slo_ms})
    return e


def median_run(runs: list[dict]) -> dict:
    """The run whose SLO throughput is the median (the lower middle one of an even count), with every run's
    SLO throughput and capacity beside it."""
    ordered = sorted(runs, key=lambda e: e["slo_rps"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_slo_rps": [e["slo_rps"] for e in runs],
            "runs_capacity_rps": [e["capacity_rps"] for e in runs]}


def cache_experiment(served: Served, cfg: BenchConfig, texts: list[str], seed: int,
                     rate: float | None = None) -> dict:
    """Zipf stream, open loop at `rate` req/s, then closed-loop capacity. Without `rate` (cache off) the
    capacity is measured first and the level runs at half of it; with the cache on, pass the cache-off
    rate: the level then starts from a cold cache, so the first send of a text is a miss and every later
    one a hit (the LRU holds the whole pool), and the hit rate is the counters' change over the level only.
    Capacity is measured after the level, on the warm cache."""
    wl = Workload(texts, {"embeddings": 1.0}, zipf=cfg.zipf)

    def counts() -> tuple[float, float]:
        m = served.scrape()
        return (sum(v for n, _, v in m if n == "serve_cache_hits_total"),
                sum(v for n, _, v in m if n == "serve_cache_misses_total"))

    async def go():
        async with loadtest.make_client(served.url) as c:
            cap = None
            if rate is None:
                cap = await loadtest.measure_capacity(c, wl, cfg.capacity_s, served.concurrency, seed=seed)
            c0 = counts()
            s, res = await loadtest.run_level(c, wl, rate or 0.5 * cap, cfg.level_s, slo_ms=cfg.slo_ms,
                                              seed=seed + 1)
            c1 = counts()
            if cap is None:
                cap = await loadtest.measure_capacity(c, wl, cfg.capacity_s, served.concurrency, seed=seed)
            return cap, s, res, c0, c1
    cap, s, res, c0, c1 = asyncio.run(go())
    hits, misses = c1[0] - c0[0], c1[1] - c0[1]
    hit_lat, miss_lat, seen = [], [], set()
    if rate is not None:
        for r in sorted(res, key=lambda r: r.scheduled):
            if r.status == "200":
                (hit_lat if r.key in seen else miss_lat).append(r.latency * 1000)
            seen.add(r.key)
    return {"capacity_rps": cap, "level": s, "rate": rate or 0.5 * cap,
            "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
            "p50_hit_ms": float(np.median(hit_lat)) if hit_lat else None,
            "p50_miss_ms": float(np.median(miss_lat)) if miss_lat else None}


def kill_experiment(served: Served, cfg: BenchConfig, texts: list[str], rate: float, seed: int) -> dict:
    """Steady embeddings + search at `rate`; SIGKILL one replica a third of the way in; count failures;
    then time until the supervisor has it back and ready."""
    wl = Workload(texts, {"embeddings": 0.7, "search": 0.3})
    victim = served.state()["replicas"][0]
    killed = []
    duration = max(6.0, 2 * cfg.level_s)

    def on_tick(t):
        if t >= duration / 3 and not killed:
            os.kill(victim["pid"], signal.SIGKILL)
            killed.append(time.monotonic())

    async def go():
        async with loadtest.make_client(served.url) as c:
            return await loadtest.run_level(c, wl, rate, duration, slo_ms=cfg.slo_ms, seed=seed, on_tick=on_tick)
    s, _ = asyncio.run(go())
    back = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(r["port"] == victim["port"] and r["pid"] != victim["pid"] and r["state"] == "ready"
               for r in served.state()["replicas"]):
            back = time.monotonic() - killed[0]
            break
        time.sleep(0.2)
    return {"level": s, "failed": s["failed"], "sent": s["sent"], "recovered_s": back}


def generation_sweep(served: Served, wl, cfg: BenchConfig, levels: list[float], slots: int, seed: int) -> dict:
    """sweep_experiment for the generation load: slots + 1 closed-loop users for capacity (one waits while a
    finished user's next request is on its way); `slo_tok_s` = the best output tokens/s of a level whose
    TTFT p99 and TPOT p99 are within the SLO, nothing refused or failed."""
    e = sweep_experiment(served, wl, levels, seed, capacity_s=cfg.gen_capacity_s, level_s=0,
                         level_requests=cfg.gen_level_requests,
                         concurrency=slots + 1, slo_ms=cfg.gen_ttft_slo_ms, tpot_slo_ms=cfg.gen_tpot_slo_ms,
                         timeout_s=60)
    e["slo_tok_s"] = at_slo(e["levels"], {"ttft_p99_ms": cfg.gen_ttft_slo_ms, "tpot_p99_ms": cfg.gen_tpot_slo_ms},
                            key="output_tok_s")
    return e


def system_prompt_level(served: Served, wl, cfg: BenchConfig, rate: float, seed: int) -> dict:
    """One open-loop level of the shared-system-prompt load at `rate` for gen_system_requests / rate
    seconds, after one unmeasured request with the same system prompt (it puts the prompt's blocks into the
    prefix cache, as a deployment's steady state has them; the cache-off deployment gets it too)."""
    async def go():
        async with loadtest.make_client(served.url) as c:
            route, path, body = wl.request(np.random.default_rng(seed + 1000))
            await loadtest.send(c, route, path, body, asyncio.get_running_loop().time(), 120)
            s, _ = await loadtest.run_level(c, wl, rate, cfg.gen_system_requests / rate,
                                            slo_ms=cfg.gen_ttft_slo_ms, tpot_slo_ms=cfg.gen_tpot_slo_ms,
                                            timeout_s=120, seed=seed)
            return s
    s = asyncio.run(go())
    print(loadtest.format_row(s), file=sys.stderr, flush=True)
    return s


def generation_experiment(cfg: BenchConfig, texts: list[str], off: dict, log) -> dict:
    """The served generation load on 1 replica x 1 pinned thread behind nginx, three deployments in turn:
    continuous batching (gen_slots rows, prefix cache on): capacity, the sweep, then the system-prompt
    level; one at a time (1 row, refusing by count alone): capacity and the sweep up to 1x; prefix cache
    off (gen_slots rows): the system-prompt level. The sweeps of both deployments draw the same requests (same seeds); the two
    system-prompt levels draw the same requests at the same times."""
    cl = cluster_config(cfg, 1, 1)
    wl, wl_sys = GenWorkload(texts), GenWorkload(texts, system=off["system"])
    levels = [float(x) for x in cfg.gen_levels.split(",")]
    rate_sys = cfg.gen_system_load / off["service_off_s"]
    out = {"rate_system": rate_sys, "deployment": deployment(1, 1)}
    log(f"generation: continuous batching ({cfg.gen_slots} rows), {out['deployment']}")
    with Served("gen-continuous", cl, gen_settings(cfg)) as s:
        out["continuous"] = generation_sweep(s, wl, cfg, levels, cfg.gen_slots, seed=21)
        log(f"generation: shared system prompt, prefix cache on, {rate_sys:.2f} req/s")
        out["prefix_on"] = system_prompt_level(s, wl_sys, cfg, rate_sys, seed=23)
    log("generation: one request at a time (1 row)")
    # admission by count alone: a level that refused does not count toward throughput at the SLO, so a
    # bound in seconds could only lower the baseline's
    with Served("gen-one", cl, gen_settings(cfg, gen_slots=1, gen_max_wait_ms=0)) as s:
        out["one_at_a_time"] = generation_sweep(s, wl, cfg, [x for x in levels if x <= 1.0], 1, seed=21)
    log(f"generation: shared system prompt, prefix cache off, {rate_sys:.2f} req/s")
    with Served("gen-cache-off", cl, gen_settings(cfg, gen_prefix_cache_mb=0)) as s:
        out["prefix_off"] = system_prompt_level(s, wl_sys, cfg, rate_sys, seed=23)
    return out


# the generation table (docs/serve.md, section serve:generation): one row per level
GEN_UNITS = {"deployment": "", "workload": "", "load": "x", "offered": "req/s", "requests": "", "refused": "",
             "ttft_p50_ms": "ms", "ttft_p99_ms": "ms", "tpot_p50_ms": "ms", "tpot_p99_ms": "ms",
             "itl_p50_ms": "ms", "itl_p99_ms": "ms", "output_tok_s": "tokens/s", "goodput_rps": "req/s"}


def _gen_row(deployment: str, workload: str, lv: dict, load) -> dict:
    return {"deployment": deployment, "workload": workload, "load": load, "offered": lv["offered_rps"],
            "requests": lv["sent"], "refused": lv["refused"], "goodput_rps": lv["goodput_rps"],
            **{k: lv.get(k) for k in GEN_UNITS if k.endswith("_ms") or k == "output_tok_s"}}


GEN_GOALS = {"gen_batching_speedup_at_slo": (3, ">="), "prefix_cache_ttft_speedup": (3, ">="),
             "gen_overload_goodput": (0.95, ">="), "gen_reject_p99_ms": (50, "<=")}


def generation_results(cfg: BenchConfig, off: dict, gen: dict | None, goal) -> tuple[list, dict, list, list]:
    """(rows of the serve table, the generation table, goals, notes) from offline_generation's and
    generation_experiment's numbers; `gen` None: the served part did not run (goals unmeasured)."""
    rows, goals, notes = [], [], []
    B, thr = off["slots"], f"{off['threads']} thread{'s' * (off['threads'] > 1)}"
    model = f"{cfg.gen_model} {cfg.gen_quant or 'float'}"
    rows.append(_row("offline, one replica's generator", f"{model}, batch 1, {thr}", off["decode_tok_s_1"],
                     detail=f"decode tokens/s, no HTTP; prefill of the mix's mean prompt "
                            f"({off['prompt_tokens_mean']:.0f} tokens) {1000 * off['prefill_prompt_s']:.0f} ms"))
    rows.append(_row("offline, one replica's generator", f"{model}, batch {B}, {thr}", off["decode_tok_s_b"],
                     detail=f"decode tokens/s, no HTTP; x{off['decode_gain']:.2f} over batch 1: the model's own "
                            f"batching gain (x{off['mix_bound']:.2f} with the mix's unbatched prefills)"))
    slo = f"TTFT p99 <= {cfg.gen_ttft_slo_ms:g} ms and TPOT p99 <= {cfg.gen_tpot_slo_ms:g} ms"
    if gen is None:
        for name, (target, op) in GEN_GOALS.items():
            goals.append(goal(name, "generation load test", None, target, op, "the generation load test did not run"))
        return rows, {}, goals, notes
    cont, one = gen["continuous"], gen["one_at_a_time"]
    dep = gen["deployment"]
    labels = {"continuous": f"continuous batching ({B} rows), {dep}", "one_at_a_time": f"one at a time (1 row), {dep}"}
    table = []
    for key in ("continuous", "one_at_a_time"):
        e = gen[key]
        for lv in e["levels"]:
            table.append(_gen_row(labels[key], "mix", lv, lv["load_fraction"]))
        best = [lv for lv in e["levels"] if lv.get("output_tok_s") == e["slo_tok_s"] and e["slo_tok_s"]]
        lv = best[0] if best else _level(e["levels"], 0.5)
        f = lambda x: "—" if x is None else f"{x:.0f}"  # noqa: E731
        rows.append(_row("generation via nginx", f"{labels[key]}, {model}", lv.get("output_tok_s"),
                         lv["goodput_rps"], lv.get("ttft_p50_ms"), lv.get("ttft_p99_ms"), lv["failed"],
                         detail=(f"output tokens/s at the best level within {slo} ({lv['load_fraction']:g}x "
                                 if best else f"no level within {slo}; output tokens/s at ") +
                         f"capacity = {lv['offered_rps']:.2f} req/s; capacity {e['capacity_rps']:.2f} req/s closed "
                         f"loop); p50/p99 cols = TTFT; TPOT {f(lv.get('tpot_p50_ms'))}/{f(lv.get('tpot_p99_ms'))} "
                         f"ms, ITL {f(lv.get('itl_p50_ms'))}/{f(lv.get('itl_p99_ms'))} ms; at_slo col = goodput"))
    sys_label = f"shared {off['system_tokens']}-token system prompt"
    for key, label in (("prefix_on", "prefix cache on"), ("prefix_off", "prefix cache off")):
        lv = gen[key]
        table.append(_gen_row(f"{label}, {B} rows, {dep}", sys_label, lv, None))
        rows.append(_row("generation via nginx", f"{label}, {sys_label}, {B} rows, {model}", lv.get("output_tok_s"),
                         lv["goodput_rps"], lv.get("ttft_p50_ms"), lv.get("ttft_p99_ms"), lv["failed"],
                         detail=f"{lv['sent']} requests at {lv['offered_rps']:.2f} req/s; p50/p99 cols = TTFT"))
    b1 = one["slo_tok_s"]
    goals.append(goal("gen_batching_speedup_at_slo", f"output tokens/s with {slo}, continuous batching ({B} rows) "
                      "over one request at a time, same replica", cont["slo_tok_s"] / b1 if b1 else None,
                      *GEN_GOALS["gen_batching_speedup_at_slo"],
                      f"{cont['slo_tok_s']:.1f} vs {b1:.1f} tokens/s; the bound: the generator alone on the "
                      f"replica's {thr} decodes x{off['decode_gain']:.2f} the tokens/s at batch {B} over batch 1 "
                      f"({off['decode_tok_s_b']:.0f} vs {off['decode_tok_s_1']:.0f}); a request's prefill is not "
                      f"batched (the mix's mean prompt, {off['prompt_tokens_mean']:.0f} tokens: "
                      f"{1000 * off['prefill_prompt_s']:.0f} ms, before at most {off['max_tokens_mean']:.0f} new "
                      f"tokens on average), so at full load the model allows at most x{off['mix_bound']:.2f}"
                      if b1 else "one-at-a-time had no level within the SLO"))
    on, offl = gen["prefix_on"], gen["prefix_off"]
    ton, toff = on.get("ttft_p50_ms"), offl.get("ttft_p50_ms")
    goals.append(goal("prefix_cache_ttft_speedup", f"TTFT p50 with a {sys_label}, prefix cache off over on, same "
                      "load", toff / ton if ton and toff else None,
                      *GEN_GOALS["prefix_cache_ttft_speedup"],
                      f"{toff or 0:.0f} vs {ton or 0:.0f} ms at {gen['rate_system']:.2f} req/s "
                      f"({cfg.gen_system_load:g} of a cache-off request's service time, {on['sent']} requests each, "
                      f"cache warmed by one request); the bound, before queueing, HTTP and the first decode step: "
                      f"the prefill of the whole prompt ({off['full_tokens_mean']:.0f} tokens, "
                      f"{1000 * off['prefill_full_s']:.0f} ms) over that of the part past the "
                      f"{off['cached_tokens']} cached tokens"
                      + (f" ({1000 * off['prefill_suffix_s']:.0f} ms): x{off['prefix_bound']:.2f}"
                         if off["prefix_bound"] else ": none cached")))
    over = [lv for lv in cont["levels"] if lv["load_fraction"] >= 1.5]
    peak = max((lv["goodput_rps"] for lv in cont["levels"]), default=0)
    goals.append(goal("gen_overload_goodput", "generation goodput (requests within the TTFT and TPOT SLO) at 1.5x "
                      "and 2x capacity over the peak goodput, continuous batching",
                      min(lv["goodput_rps"] for lv in over) / peak if over and peak else None,
                      *GEN_GOALS["gen_overload_goodput"],
                      (f"peak {peak:.2f} req/s; " + "; ".join(
                          f"{lv['load_fraction']:g}x: {lv['goodput_rps']:.2f} req/s, {lv['refused']} of "
                          f"{lv['sent']} refused, accepted TTFT p99 {lv.get('ttft_p99_ms') or 0:.0f} ms" for lv in over)
                       + f"; a replica refuses a completion expected to wait over {cfg.gen_max_wait_ms:g} ms "
                         f"for a row") if over else "no level >= 1.5x"))
    rej = [lv["reject_p99_ms"] for lv in over if lv["reject_p99_ms"] is not None]
    goals.append(goal("gen_reject_p99_ms", "p99 time to a refusal of a completion at 1.5x and 2x capacity",
                      max(rej) if rej else None,
                      *GEN_GOALS["gen_reject_p99_ms"], "" if rej else "nothing was refused"))
    notes.append(f"Generation load (open loop, Poisson arrivals, streamed greedy completions with usage): a fixed mix "
                 f"of prompts of ~{off['prompt_tokens_mean']:.0f} tokens on average and at most "
                 f"{off['max_tokens_mean']:.0f} new tokens on average (workload.GEN_MIX), on 1 replica x 1 pinned "
                 f"thread behind nginx, the load generator and nginx on the same {os.cpu_count()} cores. TTFT counts from the scheduled send; "
                 f"TPOT = (last - first token) / (completion tokens - 1); ITL = the gaps between stream events. "
                 f"Goodput: requests with TTFT <= {cfg.gen_ttft_slo_ms:g} ms and TPOT <= "
                 f"{cfg.gen_tpot_slo_ms:g} ms per second.")
    for key in ("continuous", "one_at_a_time"):
        for lv in gen[key]["levels"]:
            if (lv["send_lag_p99_ms"] or 0) > 50:
                notes.append(f"Generation, {labels[key]} at {lv['load_fraction']:g}x: the load generator fell "
                             f"behind its schedule (send lag p99 {lv['send_lag_p99_ms']:.0f} ms).")
    return rows, {"columns": list(GEN_UNITS), "units": GEN_UNITS, "rows": table}, goals, notes


# --------------------------------------------------------------------------------------------------------
# the record
# throughput: requests/s for served rows, texts/s (ceiling), queries/s (ANN), tokens/s (generation)
UNITS = {"experiment": "", "config": "", "throughput": "/s", "at_slo": "req/s", "p50_ms": "ms",
         "p99_ms": "ms", "errors": "", "detail": ""}
COLUMNS = list(UNITS)


def _row(experiment, config, throughput=None, at_slo=None, p50=None, p99=None, errors=None, detail=""):
    return {"experiment": experiment, "config": config, "throughput": throughput, "at_slo": at_slo,
            "p50_ms": p50, "p99_ms": p99, "errors": errors, "detail": detail}


def _level(levels: list[dict], frac: float) -> dict | None:
    return min(levels, key=lambda s: abs(s["load_fraction"] - frac)) if levels else None


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(BenchConfig, argv, prog="python -m projects.serve.bench", description=__doc__,
                       presets=PRESETS)
    from common.device import fast_dtype
    bf16_ok = fast_dtype() == "bf16"
    if cfg.embed_dtype == "auto":
        cfg = dataclasses.replace(cfg, embed_dtype=fast_dtype())
    try:
        import uvloop   # a faster client loop: the load generator shares the CPU with the service
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    from benchmarks.record import goal, make_record, write_record
    from projects.serve.index import IndexMismatch, ann_benchmark, load_index, read_manifest, wordnet_queries
    import shutil
    try:
        read_manifest(Path(cfg.index_dir))   # a missing or foreign index fails here, before minutes of measuring
        if not shutil.which("nginx"):
            raise ValueError("nginx not found (scripts/system_deps.sh installs it)")
        if not port_free("127.0.0.1", cfg.port):
            raise ValueError(f"port {cfg.port} is in use (--port)")
        texts = load_texts("wordnet", cfg.pool, seed=0)
    except (IndexMismatch, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    levels = [float(x) for x in cfg.levels.split(",")]
    rows, goals, notes, extra = [], [], [], {"config": dataclasses.asdict(cfg)}
    t_start = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t_start:5.0f}s] {m}", file=sys.stderr, flush=True)  # noqa

    # 1. offline ceiling ------------------------------------------------------------------------------
    log("offline ceiling")
    dtypes = ("fp32", "bf16") if bf16_ok or cfg.embed_dtype == "bf16" else ("fp32",)
    if "bf16" not in dtypes:
        notes.append("bf16 not measured: this CPU has neither AMX nor AVX512-BF16, where torch emulates bf16 "
                     "matmuls (far slower than fp32); served in fp32.")
    ceil = offline_ceiling(texts[:cfg.ceiling_texts], dtypes)
    extra["ceiling"] = ceil
    for dt in dtypes:
        rows.append(_row("offline ceiling", f"{dt}, batch 128, in process", ceil[dt]["texts_per_s"],
                         detail="texts/s, no HTTP" + (f"; cosine to fp32 min {ceil['bf16_cosine_min']:.4f}"
                                                       if dt == "bf16" else "")))
    ob = offline_batching(texts[:cfg.ceiling_texts], cfg.embed_dtype, cfg.threads)
    extra["offline_batching"] = ob
    thr = f"{cfg.threads} thread{'s' * (cfg.threads > 1)}"
    for key, label, detail in (
            ("batch1_texts_per_s", "batch 1", ""),
            ("batch_texts_per_s", f"batch {ob['batch']}, length-sorted, packed",
             f"; x{ob['bound']:.2f} over batch 1: the bound on batching's gain"),
            ("random_padded_texts_per_s", f"batches of {ob['served_batch']} random lengths, padded", ""),
            ("random_packed_texts_per_s", f"batches of {ob['served_batch']} random lengths, packed rows",
             f"; x{ob['packing_gain']:.2f} over padded")):
        rows.append(_row("offline, one replica's model", f"{cfg.embed_dtype}, {label}, {thr}", ob[key],
                         detail="texts/s, no HTTP" + detail))

    # 2. ANN ------------------------------------------------------------------------------------------
    if cfg.ann_queries:
        log("ANN recall and speed")
        from projects.serve.model import Embedder
        emb = Embedder(dtype=cfg.embed_dtype)   # query vectors as the server makes them
        idx = load_index(Path(cfg.index_dir), emb)
        ann = ann_benchmark(idx, emb.encode(wordnet_queries(cfg.ann_queries)))
        extra["ann"] = ann
        for r in ann["ann"]:
            rows.append(_row("ANN search", f"HNSW efSearch {r['ef_search']}, {ann['n_vectors']} vectors",
                             r["qps_single"], detail=f"recall@10 {r['recall_at_10']:.3f}, x{r['speedup_single']:.1f} "
                             f"vs exact ({ann['exact']['qps_single']:.0f} q/s), 1 thread"))
        small = ann["n_vectors"] < 100_000
        note = f"on {ann['n_vectors']} vectors" + (" (< 100k: build the full index with `make index`)" if small else "")
        goals.append(goal("ann_recall_at_10", "recall@10 of HNSW vs exact at the chosen efSearch",
                          None if small else ann["ann_recall_at_10"], 0.95, ">=", note))
        goals.append(goal("ann_speedup_vs_exact", "single-thread queries/s, HNSW over IndexFlatIP",
                          None if small else ann["ann_speedup_vs_exact"], 10, ">=", note))
        del emb, idx
        gc.collect()

    # 3. KV cache -------------------------------------------------------------------------------------
    if cfg.gen_model:
        log("generation: KV cache vs recompute")
        try:
            try:
                kv = kv_cache_latency(cfg.gen_model, cfg.kv_tokens)
            except (ValueError, OSError) as e:
                notes.append(f"KV cache experiment on stories260k: {cfg.gen_model} did not load ({e})")
                kv = kv_cache_latency("stories260k", cfg.kv_tokens)
                cfg = dataclasses.replace(cfg, gen_model="stories260k", gen_quant="")
            extra["kv_cache"] = kv
            for key, label in (("kv_ms", "static KV cache"), ("no_kv_ms", "no cache (prefix recomputed)")):
                rows.append(_row("generation", f"{cfg.gen_model}, {label}", 1000 / kv[key][-1],
                                 detail=f"tokens/s at position {kv['positions'][-1]}; ms/token "
                                        f"{kv[key][0]:.2f} at {kv['positions'][0]} -> {kv[key][-1]:.2f} at "
                                        f"{kv['positions'][-1]}"))
        except (ValueError, OSError) as e:
            notes.append(f"KV cache experiment skipped: {e}")

    # 4. served ---------------------------------------------------------------------------------------
    wl = Workload(texts, {"embeddings": 1.0})
    served: dict[str, dict] = {}
    shape, alt = deployment(cfg.replicas, cfg.threads), deployment(1, cfg.replicas * cfg.threads)
    extra["deployments"] = {"main": shape, "alt": alt}
    main_cluster = cluster_config(cfg, cfg.replicas, cfg.threads)
    dynamic = served_settings(cfg, max_batch_size=cfg.max_batch_size)
    try:
        b1_cluster = dataclasses.replace(main_cluster, port=cfg.port + 100, replica_port=cfg.port + 111)
        with Served("dynamic", main_cluster, dynamic) as s:
            runs: dict[str, list[dict]] = {"batch1": [], "dynamic": []}
            with Served("batch1", b1_cluster, served_settings(cfg, max_batch_size=1)) as s1:
                for r in range(cfg.repeats):
                    log(f"served: batch-1, {shape} ({r + 1}/{cfg.repeats})")
                    runs["batch1"].append(embeddings_sweep(s1, wl, cfg, [x for x in levels if x <= 1.0],
                                                           seed=1 + 10 * r))
                    log(f"served: dynamic batching, {shape} ({r + 1}/{cfg.repeats})")
                    runs["dynamic"].append(embeddings_sweep(s, wl, cfg, levels, seed=2 + 10 * r))
            for key, rs in runs.items():
                served[key] = median_run(rs)
            # (the batch-1 deployment is down from here: a replica restarting after the SIGKILL shares the
            # cores with nothing but the load and the replica left)
            log("served: Zipf stream, cache off" + (", then SIGKILL a replica under load" * (cfg.replicas > 1)))
            served["cache_off"] = cache_experiment(s, cfg, texts, seed=3)
            if cfg.replicas > 1:
                # N+1 provisioning: a load the other replicas carry without the killed one, so a failure
                # here is the kill's doing, not an overload of the replicas left
                served["kill"] = kill_experiment(s, cfg, texts, KILL_LOAD * served["dynamic"]["capacity_rps"],
                                                 seed=5)
        log("served: dynamic batching + cache, Zipf stream")
        with Served("cache", main_cluster, dataclasses.replace(dynamic, cache_entries=Settings.cache_entries)) as s:
            served["cache_on"] = cache_experiment(s, cfg, texts, seed=3, rate=served["cache_off"]["rate"])
        # what the same cores carry with no model at all: client, nginx, uvicorn and the JSON of each answer
        log(f"served: the HTTP path alone (stand-in app, no model), {shape}")
        with Served("http-path", dataclasses.replace(main_cluster, app=STANDIN_APP), dynamic,
                    env={"STANDIN_WORK_S": "0"}) as s:
            served["http_path"] = {"capacity_rps": asyncio.run(_capacity(s, wl, cfg, seed=6))}
        if alt != shape:
            log(f"served: dynamic batching, {alt}")
            with Served("alt", cluster_config(cfg, 1, cfg.replicas * cfg.threads, pin=False), dynamic) as s:
                served["alt"] = embeddings_sweep(s, wl, cfg, [0.5, 0.75, 1.0], seed=4)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    extra["served"] = served

    for key, label in (("batch1", f"batch-1, {shape}"),
                       ("dynamic", f"dynamic batching (<= {cfg.max_batch_size}), {shape}"),
                       ("alt", f"dynamic batching, {alt}")):
        if key not in served:
            continue
        e = served[key]
        half = _level(e["levels"], 0.5)
        rows.append(_row("embeddings via nginx", f"{label}, {cfg.embed_dtype}", e["capacity_rps"], e["slo_rps"],
                         half["p50_ms"], half["p99_ms"], half["failed"],
                         detail=f"capacity (closed loop) / best rate with p99 <= {cfg.slo_ms:g} ms; "
                                f"latency at {half['load_fraction']:g}x capacity"))
    if "http_path" in served:
        rows.append(_row("embeddings via nginx", f"HTTP path alone: stand-in app (no model), {shape}",
                         served["http_path"]["capacity_rps"],
                         detail="capacity (closed loop): what the client, nginx, uvicorn and the JSON of a "
                                "384-float answer take of the same cores; no model work can raise it"))
    dyn = served["dynamic"]
    for frac in (1.5, 2.0):
        lv = _level(dyn["levels"], frac)
        if lv is not None and abs(lv["load_fraction"] - frac) < 1e-9:
            rows.append(_row("overload", f"{frac:g}x capacity, dynamic batching", lv["achieved_rps"],
                             lv["goodput_rps"], lv["p50_ms"], lv["p99_ms"], lv["failed"],
                             detail=f"refused {lv['refused']} of {lv['sent']}, refusal p99 "
                                    f"{lv['reject_p99_ms'] or 0:.1f} ms; at_slo col = goodput"))
    for key, label in (("cache_off", "cache off"), ("cache_on", "LRU cache on")):
        e = served[key]
        rows.append(_row("Zipf stream", f"{label}, s={cfg.zipf:g} over {cfg.pool} texts", e["capacity_rps"], None,
                         e["level"]["p50_ms"], e["level"]["p99_ms"], e["level"]["failed"],
                         detail=f"hit rate {e['hit_rate']:.2f}" + (
                             f"; p50 hits {e['p50_hit_ms']:.1f} ms, misses {e['p50_miss_ms']:.1f} ms"
                             if e["p50_hit_ms"] is not None and e["p50_miss_ms"] is not None else "") +
                         f" (open loop at {e['rate']:.0f} req/s = 0.5x cache-off capacity, cold cache)"))
    k = served.get("kill")
    if k is not None:
        rows.append(_row("replica SIGKILL", f"{shape}, embeddings + search at {KILL_LOAD:g}x capacity",
                         k["level"]["achieved_rps"], None, k["level"]["p50_ms"], k["level"]["p99_ms"], k["failed"],
                         detail=f"{k['failed']} failed of {k['sent']}; replica back in "
                                f"{k['recovered_s'] or float('nan'):.1f} s"))

    # 5. generation load ------------------------------------------------------------------------------
    gen_goals = []
    if cfg.gen_model and cfg.gen_load:
        log("generation: the generator alone (decode batch 1 vs batched, prefill)")
        try:
            off = offline_generation(gen_settings(cfg), GenWorkload(texts), cfg.gen_system_tokens, 1)
            extra["generation_offline"] = off
            try:
                gen = generation_experiment(cfg, texts, off, log)
                extra["generation"] = gen
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                notes.append(f"Generation load test failed: {e}")
                gen = None
            gen_rows, table, gen_goals, gen_notes = generation_results(cfg, off, gen, goal)
            rows += gen_rows
            notes += gen_notes
            if table:
                extra["tables"] = {"generation": table}
        except (ValueError, OSError) as e:
            notes.append(f"Generation load test skipped: {e}")

    # goals ------------------------------------------------------------------------------------------
    ceiling = ceil[cfg.embed_dtype]["texts_per_s"]
    # The cores' bound: the HTTP path alone (H req/s, stand-in app) and the model alone (M texts/s: each
    # replica's thread on batches of 32 random lengths, packed) take turns on the same cores, so a served text
    # costs 1/H + 1/M of them and the served rate is at most 1/(1/H + 1/M).
    H = served.get("http_path", {}).get("capacity_rps")
    M = cfg.replicas * ob["random_packed_texts_per_s"]
    cores_bound = 1 / (1 / H + 1 / M) if H else None
    bound_txt = (f"; the cores' bound: the HTTP path alone (stand-in app, no model) carries {H:.0f} req/s and "
                 f"the model alone {M:.0f} texts/s ({cfg.replicas} x batches of 32, packed) on the same cores, so "
                 f"at most 1/(1/H + 1/M) = {cores_bound:.0f} req/s are served") if H else ""
    # the better of the two dynamic-batching deployments of the same 2 cores; the note names both
    deploy = {shape: dyn["capacity_rps"], **({alt: served["alt"]["capacity_rps"]} if "alt" in served else {})}
    best = max(deploy, key=deploy.get)
    goals.append(goal("served_fraction_of_ceiling", f"embeddings/s through nginx (dynamic batching, 1 text per "
                      f"request, {cfg.embed_dtype}, the better deployment) over the offline ceiling",
                      deploy[best] / ceiling, 0.7, ">=",
                      f"{deploy[best]:.0f} / {ceiling:.0f} texts/s with {best}" +
                      "".join(f" ({k}: {v / ceiling:.2f})" for k, v in deploy.items() if k != best) +
                      (f"{bound_txt}: {cores_bound / ceiling:.2f} of the ceiling" if H else "")))
    b1 = served["batch1"]["slo_rps"]
    goals.append(goal("batching_speedup_at_slo", f"throughput with p99 <= {cfg.slo_ms:g} ms, dynamic over batch-1",
                      dyn["slo_rps"] / b1 if b1 else None, 3, ">=",
                      f"{dyn['slo_rps']:.0f} vs {b1:.0f} req/s (medians of {len(dyn['runs_slo_rps'])} interleaved "
                      f"runs: {', '.join(f'{x:.0f}' for x in dyn['runs_slo_rps'])} vs "
                      f"{', '.join(f'{x:.0f}' for x in served['batch1']['runs_slo_rps'])}); "
                      f"the model alone on a replica's {thr}: x{ob['bound']:.2f} from batches of "
                      f"{ob['batch']} over batch 1 ({ob['batch_texts_per_s']:.0f} vs {ob['batch1_texts_per_s']:.0f} "
                      f"texts/s)"))
    # the same ratio against its bound: how much of the model's own batching gain survives HTTP, nginx, the
    # queue and the load generator sharing the cores
    goals.append(goal("batching_fraction_of_model_gain", "dynamic/batch-1 throughput at the SLO over the model's "
                      f"own batch-{ob['batch']}/batch-1 gain on a replica's {thr}",
                      dyn["slo_rps"] / b1 / ob["bound"] if b1 else None, 0.85, ">=",
                      (f"x{dyn['slo_rps'] / b1:.2f} served of x{ob['bound']:.2f} offline" +
                       (f"{bound_txt}: dynamic/batch-1 at most x{cores_bound / b1:.2f} over the {b1:.0f} req/s of "
                        f"batch-1, {cores_bound / b1 / ob['bound']:.2f} of the model's gain" if H else ""))
                      if b1 else "no batch-1 level"))
    half = _level(dyn["levels"], 0.5)
    bd = half.get("breakdown")
    goals.append(goal("p99_over_p50_at_half_load", "p99 / p50 latency at 0.5x capacity, dynamic batching",
                      half["p99_ms"] / half["p50_ms"] if half["p50_ms"] else None, 2, "<=",
                      "; ".join(f"{label}: {b['latency_ms']:.0f} ms = queue {b['queue_ms']:.0f} + inference "
                                f"{b['inference_ms']:.0f} + HTTP/nginx/client {b['other_ms']:.0f}"
                                for label, b in (("median requests", bd["median"]),
                                                 ("slowest 1%", bd["p99_tail"]))) if bd else ""))
    over = [lv for lv in dyn["levels"] if lv["load_fraction"] >= 1.5]
    rej = [lv["reject_p99_ms"] for lv in over if lv["reject_p99_ms"] is not None]
    goals.append(goal("reject_p99_ms", "p99 time to a 429 refusal at 1.5x and 2x capacity", max(rej) if rej else None,
                      50, "<=", "" if rej else "nothing was refused"))
    peak = max(lv["goodput_rps"] for lv in dyn["levels"])
    goals.append(goal("goodput_fraction_at_overload", "goodput at 1.5x and 2x capacity over the peak goodput",
                      min(lv["goodput_rps"] for lv in over) / peak if over and peak else None, 0.95, ">=",
                      f"accepted p99 {max((lv['p99_ms'] or 0) for lv in over):.0f} ms; replica RSS "
                      f"{dyn['rss_mb_before']:.0f} -> {dyn['rss_mb_after']:.0f} MB; restarts {dyn['restarts']}"
                      if over else ""))
    goals.append(goal("failed_requests_on_replica_kill", f"client-visible failures, SIGKILL of 1 of {cfg.replicas} "
                      "replicas under steady embeddings + search load", k and k["failed"], 0, "==",
                      f"of {k['sent']} requests" if k else "needs --replicas >= 2"))
    goals += gen_goals
    notes += [
        f"Load generator (open loop, Poisson arrivals, latency from the scheduled send time) on the same "
        f"{os.cpu_count()} cores as the service; 1 text per embeddings request, WordNet passages.",
        f"Overload is refused with 429 + Retry-After: by nginx past {main_cluster.max_inflight} requests in flight per "
        f"replica from one client address (limit_conn; the replica never sees them), and by a replica past {cfg.max_queue} queued texts. "
        f"Replicas run at nice {cfg.nice} so the load generator keeps the CPU a client on its own machine has.",
    ]
    for lv in over:   # a client behind its own schedule measures itself as much as the service
        if (lv["send_lag_p99_ms"] or 0) > 50:
            notes.append(f"At {lv['load_fraction']:g}x capacity ({lv['offered_rps']:.0f} req/s offered) the load "
                         f"generator fell behind its own schedule (send lag p99 {lv['send_lag_p99_ms']:.0f} ms) on "
                         f"the cores it shares with nginx and the replica: that level's latencies, refusal times and "
                         f"goodput measure the 2-core client as much as the service.")
        elif lv["refused"]:
            notes.append(f"At {lv['load_fraction']:g}x capacity: {lv['refused']} refused (p99 "
                         f"{lv['reject_p99_ms']:.0f} ms to the 429), goodput {lv['goodput_rps']:.0f} req/s of a "
                         f"{peak:.0f} req/s peak, accepted p99 {lv['p99_ms'] or 0:.0f} ms.")
    if "bf16_cosine_min" in ceil:
        notes.append(f"bf16 embeddings vs fp32 cosine: min {ceil['bf16_cosine_min']:.4f}, "
                     f"mean {ceil['bf16_cosine_mean']:.5f}.")
    rec = make_record("serve", cfg, rows, goals, units=UNITS, columns=COLUMNS, preset=cfg.preset,
                      notes=notes, libs=["torch", "transformers", "faiss", "fastapi", "uvicorn", "orjson", "aiohttp"], extra=extra)
    rec["provenance"]["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    write_record(rec)
    return 0


def plot(record: dict, docs_dir: Path) -> list[Path]:
    """docs/serve_latency_throughput.png (p50/p99 vs achieved throughput per config),
    docs/serve_generation.png (output tokens/s and TTFT vs offered load, continuous batching vs one request
    at a time) and docs/serve_kv_cache.png (ms/token along the sequence, with and without the KV cache)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.record import save_figure
    out = []
    served = (record.get("extra") or {}).get("served") or {}
    slo = record["config"]["slo_ms"]
    if served:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        dep = (record.get("extra") or {}).get("deployments") or {"main": "", "alt": ""}
        for key, label, color in (("batch1", f"batch-1, {dep['main']}", "tab:red"),
                                  ("dynamic", f"dynamic batching, {dep['main']}", "tab:blue"),
                                  ("alt", f"dynamic batching, {dep['alt']}", "tab:green")):
            lv = [x for x in served.get(key, {}).get("levels", []) if x["p50_ms"] is not None]
            if not lv:
                continue
            x = [v["achieved_rps"] for v in lv]
            ax.plot(x, [v["p99_ms"] for v in lv], "o-", color=color, label=f"{label} p99")
            ax.plot(x, [v["p50_ms"] for v in lv], "o--", color=color, alpha=0.6, label=f"{label} p50")
        ax.axhline(slo, color="gray", lw=0.8, ls=":", label=f"SLO {slo:g} ms")
        ax.set_yscale("log")
        ax.set_xlabel("achieved throughput (embedding requests/s)")
        ax.set_ylabel("latency (ms, from scheduled send)")
        ax.set_title("Embeddings through nginx: latency vs throughput (open loop)")
        ax.legend(fontsize=7)
        out.append(save_figure(fig, docs_dir, "serve_latency_throughput.png"))
    gen = (record.get("extra") or {}).get("generation")
    if gen:
        cfg = record["config"]
        fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label, color in (("continuous", f"continuous batching ({cfg['gen_slots']} rows)", "tab:blue"),
                                  ("one_at_a_time", "one request at a time", "tab:red")):
            lv = [x for x in gen.get(key, {}).get("levels", []) if x.get("ttft_p50_ms") is not None]
            if not lv:
                continue
            x = [v["offered_rps"] for v in lv]
            ax_t.plot(x, [v["output_tok_s"] for v in lv], "o-", color=color, label=label)
            ax_l.plot(x, [v["ttft_p99_ms"] for v in lv], "o-", color=color, label=f"{label} p99")
            ax_l.plot(x, [v["ttft_p50_ms"] for v in lv], "o--", color=color, alpha=0.6, label=f"{label} p50")
        ax_l.axhline(cfg["gen_ttft_slo_ms"], color="gray", lw=0.8, ls=":", label=f"SLO {cfg['gen_ttft_slo_ms']:g} ms")
        ax_t.set_xlabel("offered load (completions/s, Poisson)")
        ax_t.set_ylabel("output tokens/s")
        ax_t.set_title(f"Generation ({cfg['gen_model']} {cfg['gen_quant'] or 'float'}): throughput")
        ax_t.legend(fontsize=7)
        ax_l.set_yscale("log")
        ax_l.set_xlabel("offered load (completions/s, Poisson)")
        ax_l.set_ylabel("time to first token (ms, from scheduled send)")
        ax_l.set_title(f"Generation ({gen.get('deployment', '')}): TTFT")
        ax_l.legend(fontsize=7)
        out.append(save_figure(fig, docs_dir, "serve_generation.png"))
    kv = (record.get("extra") or {}).get("kv_cache")
    if kv:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(kv["positions"], kv["kv_ms"], "o-", label="static KV cache")
        ax.plot(kv["positions"], kv["no_kv_ms"], "o-", label="no cache (prefix recomputed)")
        ax.set_xlabel("position in the sequence (tokens)")
        ax.set_ylabel("ms per token")
        ax.set_title(f"Generation ({kv['model']}): per-token latency")
        ax.legend()
        out.append(save_figure(fig, docs_dir, "serve_kv_cache.png"))
    return out


if __name__ == "__main__":
    sys.exit(main())
