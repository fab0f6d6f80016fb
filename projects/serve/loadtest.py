"""Open-loop load generator: Poisson arrivals at a fixed offered rate, latency from the *scheduled* send time.

    python -m projects.serve.loadtest --rate 50 --duration-s 20            # one level, against `make serve`
    python -m projects.serve.loadtest                                      # sweep 10%..150% of capacity
    python -m projects.serve.loadtest --mix embeddings=1 --zipf 1.1 --rate 100   # Zipf stream (cache test)
    python -m projects.serve.loadtest --generation --system-words 300 --rate 2 --slo-ms 2000 --tpot-slo-ms 200

Why open loop: a closed-loop client (N users, each waiting for its answer before sending the next) slows
down exactly when the server does, so the requests that would have met the slow server are never sent and
their latency never measured ("coordinated omission"). Here request i is due at t0 + a_i with exponential
gaps of mean 1/rate, whatever happened before, and its latency is counted from t0 + a_i -- if the
generator itself falls behind, that delay is charged to the result too (and reported as `send_lag_p99_ms`,
so a saturated generator is visible rather than hidden).

The workload mixes embeddings, search and streamed completions (--mix) over real text: WordNet glosses and
example sentences (Debian wordnet-base) or tiny-shakespeare lines ($MLSYS_ASSETS/text/tinyshakespeare.txt).
Per level it reports: offered and achieved throughput, p50/p90/p99/max latency of successful requests,
errors by status (or exception), the p99 time to a refusal (429/503), and goodput -- successful requests
within the latency SLO per second (for streamed completions the SLO applies to the first token, and with
--tpot-slo-ms to the time per output token too).

The generation load (--generation, like vLLM's benchmark_serving) sends only streamed completions drawn from
a fixed mix of prompt and output lengths (GEN_MIX), optionally after a shared system prompt, and adds per
level: time to first token (TTFT, from the scheduled send), time per output token after the first (TPOT =
(last token - first token) / (completion_tokens - 1), the count from the stream's usage chunk),
inter-token latency (ITL: the gaps between successive token events, pooled over requests), p50 and p99 of
each, and output tokens/s.
"""
from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.files import write_atomic
from common import config
from common.env import REPO_ROOT
from projects.serve.loadstats import REFUSALS, Result, sse_event, summarize
from projects.serve.workload import GenWorkload, Workload, load_texts, parse_mix, system_prompt


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    """the service (nginx from `make serve`, or one replica)"""
    rate: float = 0.0
    """offered requests/s for one level; 0 = measure capacity, then sweep --levels"""
    duration_s: float = 20.0
    """seconds of arrivals per level"""
    levels: str = "0.1,0.25,0.5,0.75,1.0,1.25,1.5"
    """sweep: offered load as fractions of the measured capacity"""
    capacity: float = 0.0
    """sweep: capacity in requests/s (0 = measure it with a closed loop of --concurrency for --duration-s)"""
    concurrency: int = 64
    """closed-loop concurrency for the capacity measurement"""
    mix: str = "embeddings=0.7,search=0.25,completions=0.05"
    """route=weight,... over embeddings, search, completions"""
    corpus: str = "wordnet"
    """wordnet (glosses + examples) or shakespeare (tiny-shakespeare lines)"""
    texts_per_request: int = 1
    """texts in each embeddings request"""
    zipf: float = 0.0
    """> 0: draw texts from a pool of --pool with Zipf(s) popularity (repeats hit the cache); 0 = uniform"""
    pool: int = 10000
    """distinct texts to draw from"""
    top_k: int = 10
    """search: documents per query"""
    max_tokens: int = 16
    """completions: tokens to generate"""
    stream: bool = True
    """completions: stream server-sent events"""
    slo_ms: float = 250.0
    """latency SLO for goodput (first token, for streamed completions)"""
    tpot_slo_ms: float = 0.0
    """> 0: a streamed completion is also good only if its time per output token is within this"""
    generation: bool = False
    """streamed completions only, from the fixed generation mix GEN_MIX (ignores --mix, --max-tokens)"""
    system_words: int = 0
    """--generation: a shared system prompt of this many words before every prompt (0 = none)"""
    timeout_s: float = 30.0
    """a request not answered by then counts as an error (timeout)"""
    max_connections: int = 1024
    """client connection pool (beyond it requests wait client-side -- still counted from schedule)"""
    seed: int = 0
    """random seed (arrivals, routes, texts)"""
    out: str = ""
    """JSON results file (default runs/serve/loadtest-<time>.json)"""


# --------------------------------------------------------------------------------------------------------
# the schedule (what is sent: workload.py)
def poisson_arrivals(rate: float, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Send times (s from start) of a Poisson process of `rate`/s on [0, duration_s): exponential gaps."""
    if rate <= 0 or duration_s <= 0:
        raise ValueError("rate and duration must be > 0")
    n = int(rate * duration_s * 1.2 + 10 * np.sqrt(rate * duration_s) + 10)  # enough gaps, w.h.p.
    t = np.cumsum(rng.exponential(1.0 / rate, n))
    while t[-1] < duration_s:  # (never in practice) extend until past the end
        t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
    return t[t < duration_s]


# --------------------------------------------------------------------------------------------------------
# sending and measuring
async def send(client, route: str, path: str, body: dict, scheduled: float, timeout_s: float) -> Result:
    """One request. A keep-alive connection the server closed just as this request went out (nginx closes
    idle client connections when a reload retires its old workers) fails before any response byte: the
    request never reached an app, so it is sent once more on a fresh connection, as RFC 9112 9.3.1 lets a
    client do; every endpoint here is a pure function of its body. Counted in `retried`, never hidden."""
    import aiohttp
    loop = asyncio.get_running_loop()
    sent = loop.time()
    first = 0.0
    retried = False
    queue_ms = inference_ms = None
    tokens: list[float] = []
    usage: dict = {}
    answered = False  # a response (status line) arrived: no retry past this point
    while True:
        try:
            async with asyncio.timeout(timeout_s - (loop.time() - sent)):
                async with client.post(path, json=body) as resp:
                    answered = True
                    status = str(resp.status)
                    queue_ms, inference_ms = _header_ms(resp, "x-queue-time"), _header_ms(resp, "x-inference-time")
                    if route == "completions" and body.get("stream"):
                        done_marker = False
                        tokens, usage = [], {}
                        async for line in resp.content:   # SSE lines, b"data: {...}\n"
                            kind, u = sse_event(line)
                            if kind == "token":
                                tokens.append(loop.time())
                            elif kind == "usage":
                                usage = u
                            done_marker |= kind == "done"
                        first = tokens[0] if tokens else 0.0
                        if status == "200" and not done_marker:
                            status = "incomplete_stream"   # the stream was cut before [DONE]
                    else:
                        await resp.read()
        except TimeoutError:
            status = "timeout"
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:  # closed or reset
            if not (answered or retried):
                retried = True
                continue
            status = type(e).__name__
        except aiohttp.ClientError as e:   # a body cut after the status line, a malformed response, ...
            status = type(e).__name__
        break
    key = body.get("input", body.get("query", body.get("prompt", "")))
    return Result(route, scheduled, sent, loop.time(), status, first, key if isinstance(key, str) else key[0],
                  retried, queue_ms, inference_ms, tokens, usage.get("prompt_tokens"), usage.get("completion_tokens"))


def _header_ms(resp, name: str) -> float | None:
    try:
        return float(resp.headers[name])
    except (KeyError, ValueError):
        return None


def make_client(url: str, max_connections: int = 1024, timeout_s: float = 30.0):
    """An aiohttp session (each request has its own deadline in `send`). aiohttp, not httpx: on this
    bench's 2 cores httpx spent several times aiohttp's client CPU per request, growing with the number of
    connections (its pool scales badly) -- CPU a co-located load generator takes from the service."""
    import aiohttp
    return aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=max_connections),
                                 timeout=aiohttp.ClientTimeout(total=timeout_s, connect=5.0))


async def run_level(client, workload: Workload | GenWorkload, rate: float, duration_s: float, *,
                    slo_ms: float = 250.0, tpot_slo_ms: float | None = None, timeout_s: float = 30.0,
                    seed: int = 0, arrivals: np.ndarray | None = None, on_tick=None) -> tuple[dict, list[Result]]:
    """Offer `rate` req/s for `duration_s` (open loop); wait for every answer; return (summary, results).

    `on_tick(elapsed_s)` is called about every 0.1 s of the schedule (e.g. to kill a replica mid-run)."""
    rng = np.random.default_rng(seed)
    # what the process holds already (torch and the models of an in-process bench, earlier levels' results)
    # is left out of the cyclic GC: a full pass over it stalls the generator mid-level for 100s of ms, and a
    # stalled generator sends late and charges the delay to the service (seen as send lag at 2x capacity)
    gc.collect()
    gc.freeze()
    arrivals = poisson_arrivals(rate, duration_s, rng) if arrivals is None else arrivals
    reqs = [workload.request(rng) for _ in range(len(arrivals))]
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    tasks = []
    next_tick = 0.0
    for a, (route, path, body) in zip(arrivals, reqs):
        due = t0 + a
        while on_tick is not None and a >= next_tick:
            on_tick(next_tick)
            next_tick += 0.1
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        # fire and forget: the next arrival does not wait for this answer (that is the open loop)
        tasks.append(asyncio.create_task(send(client, route, path, body, due, timeout_s)))
    results = list(await asyncio.gather(*tasks))
    return summarize(results, t0, rate, duration_s, slo_ms / 1000,
                     tpot_slo_ms / 1000 if tpot_slo_ms else None), results


async def measure_capacity(client, workload: Workload | GenWorkload, seconds: float, concurrency: int, seed: int = 0,
                           timeout_s: float = 30.0) -> float:
    """Closed loop at `concurrency` in flight for `seconds`: successful requests/s (the saturation rate).

    Only answers that end in the last three quarters count, over that span: the first wave arrives at once
    (completions' prefills queue together) and the last drains with the server going idle, and over a few
    seconds of requests that take seconds each, both moved the rate by tens of percent."""
    loop = asyncio.get_running_loop()
    rng = np.random.default_rng(seed + 1)
    t0 = loop.time()
    start, end = t0 + seconds / 4, t0 + seconds
    ok = 0

    async def user():
        nonlocal ok
        while loop.time() < end:
            route, path, body = workload.request(rng)
            r = await send(client, route, path, body, loop.time(), timeout_s)
            ok += r.status == "200" and start <= loop.time() <= end
            if r.status in REFUSALS:   # back off rather than spin on the cores the server shares
                await asyncio.sleep(0.05)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return ok / (end - start)


async def sweep(client, workload: Workload | GenWorkload, capacity: float, levels: list[float], duration_s: float,
                *, slo_ms: float, timeout_s: float, tpot_slo_ms: float | None = None, seed: int = 0,
                progress: bool = True, durations: dict[float, float] | None = None,
                level_requests: int = 0) -> list[dict]:
    """One open-loop level per fraction of `capacity`, `duration_s` each unless `durations` names the
    fraction: a level whose tail is a goal runs longer, as a p99 over 700 requests rests on the slowest 7.
    With `level_requests` every level sends the same `level_requests` requests instead, at Poisson times of
    the same gaps scaled to its rate: levels then differ in load alone, not in which requests they drew or
    how many (slow requests, e.g. completions, would give a level of fixed seconds only dozens, and the
    draws' spread swamped the levels' differences)."""
    rows = []
    gaps = np.cumsum(np.random.default_rng(seed).exponential(1.0, level_requests)) if level_requests else None
    for i, frac in enumerate(levels):
        rate = frac * capacity
        if gaps is None:
            dur, arrivals, level_seed = (durations or {}).get(frac, duration_s), None, seed + i
        else:
            dur, arrivals, level_seed = level_requests / rate, gaps / rate, seed
        s, _ = await run_level(client, workload, rate, dur, arrivals=arrivals,
                               slo_ms=slo_ms, tpot_slo_ms=tpot_slo_ms, timeout_s=timeout_s, seed=level_seed)
        s["load_fraction"] = frac
        rows.append(s)
        if progress:
            print(format_row(s), file=sys.stderr, flush=True)
        await asyncio.sleep(1.0)   # let queues empty between levels
    return rows


def format_row(s: dict) -> str:
    f = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    gen = (f"  TTFT p50/p99 {f(s['ttft_p50_ms'])}/{f(s['ttft_p99_ms'])} TPOT {f(s['tpot_p50_ms'])}/"
           f"{f(s['tpot_p99_ms'])} ITL {f(s['itl_p50_ms'])}/{f(s['itl_p99_ms'])} ms  {s['output_tok_s']:.1f} "
           f"tokens/s") if "ttft_p50_ms" in s else ""
    return (f"offered {s['offered_rps']:7.1f}/s  achieved {s['achieved_rps']:7.1f}/s  goodput "
            f"{s['goodput_rps']:7.1f}/s  p50 {f(s['p50_ms'])} p90 {f(s['p90_ms'])} p99 {f(s['p99_ms'])} "
            f"max {f(s['max_ms'])} ms{gen}  errors {s['errors'] or 0}  retried {s['retried']}  "
            f"lag p99 {f(s['send_lag_p99_ms'])} ms")


async def _main(cfg: LoadConfig) -> dict:
    texts = load_texts(cfg.corpus, cfg.pool, cfg.seed)
    if cfg.generation:
        wl = GenWorkload(texts, system=system_prompt(texts, cfg.system_words) if cfg.system_words else "")
    else:
        wl = Workload(texts, parse_mix(cfg.mix), cfg.zipf, cfg.texts_per_request, cfg.top_k, cfg.max_tokens,
                      cfg.stream)
    tpot = cfg.tpot_slo_ms or None
    async with make_client(cfg.url, cfg.max_connections, cfg.timeout_s) as client:
        if cfg.rate > 0:
            s, _ = await run_level(client, wl, cfg.rate, cfg.duration_s, slo_ms=cfg.slo_ms, tpot_slo_ms=tpot,
                                   timeout_s=cfg.timeout_s, seed=cfg.seed)
            print(format_row(s), file=sys.stderr)
            return {"levels": [s]}
        cap = cfg.capacity or await measure_capacity(client, wl, cfg.duration_s, cfg.concurrency, cfg.seed,
                                                     cfg.timeout_s)
        print(f"capacity {cap:.1f} requests/s", file=sys.stderr)
        levels = [float(x) for x in cfg.levels.split(",")]
        return {"capacity_rps": cap, "levels": await sweep(client, wl, cap, levels, cfg.duration_s,
                                                           slo_ms=cfg.slo_ms, tpot_slo_ms=tpot,
                                                           timeout_s=cfg.timeout_s, seed=cfg.seed)}


def main(argv: list[str] | None = None) -> int:
    cfg = config.parse(LoadConfig, argv, prog="python -m projects.serve.loadtest", description=__doc__)
    try:
        parse_mix(cfg.mix)
        out = asyncio.run(_main(cfg))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    out["config"] = dataclasses.asdict(cfg)
    path = Path(cfg.out) if cfg.out else REPO_ROOT / "runs" / "serve" / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
