"""What one level of a load test measured: a request's Result, a streamed completion's events and token
timings, and the level's summary (throughput, goodput under the SLO, latency percentiles, refusals, where the
time went, and for generation TTFT / TPOT / ITL). loadtest.py sends the requests; this turns them into numbers.
"""
from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from common.timing import percentile

REFUSALS = ("429", "503")   # the statuses of a refusal (full queue, overload), not of a failure


@dataclass
class Result:
    route: str
    scheduled: float       # loop time the request was due
    sent: float            # loop time it was actually sent (lags `scheduled` when the generator is behind)
    done: float            # loop time the (last byte of the) response arrived
    status: str            # "200", "503", ... or an exception name ("ClientConnectorError", "timeout")
    first: float = 0.0     # loop time of the first streamed token (completions)
    key: str = ""          # the (first) text sent: tells cache hits from misses afterwards
    retried: bool = False  # sent twice: the first connection closed before any response (see send)
    queue_ms: float | None = None      # the replica's x-queue-time / x-inference-time headers: where the
    inference_ms: float | None = None  # time went on the server side (the rest is HTTP, nginx, this client)
    tokens: list[float] = field(default_factory=list)   # loop times of a stream's token events
    prompt_tokens: int | None = None      # a stream's usage chunk (stream_options.include_usage)
    completion_tokens: int | None = None

    @property
    def latency(self) -> float:
        return self.done - self.scheduled


def sse_event(line: bytes) -> tuple[str, dict | None]:
    """What one line of a streamed completion carries: ("done", None) for `data: [DONE]`; ("usage", usage)
    for the include_usage chunk (no choices); ("token", None) for a chunk of new output -- any chunk before
    the final one (a token whose text is still incomplete UTF-8 arrives with empty text), and the final one
    (finish_reason set) only if it carries text; ("other", None) for the rest: a chat stream's opener (the
    assistant's role), an error event, a blank or comment line."""
    if not line.startswith(b"data:"):
        return "other", None
    data = line[5:].strip()
    if data == b"[DONE]":
        return "done", None
    try:
        d = json.loads(data)
    except ValueError:
        return "other", None
    choices = d.get("choices") if isinstance(d, dict) else None
    if not choices:
        usage = d.get("usage") if isinstance(d, dict) else None
        return ("usage", usage) if isinstance(usage, dict) else ("other", None)
    c = choices[0]
    delta = c.get("delta") or {}
    text = c.get("text", delta.get("content"))
    if text or (c.get("finish_reason") is None and "role" not in delta):
        return "token", None
    return "other", None


def token_metrics(r: Result) -> tuple[float, float | None, list[float]]:
    """(TTFT, TPOT, inter-token gaps) of one streamed completion with at least one token event, in seconds.
    TTFT counts from the scheduled send; TPOT = (last - first token event) / (completion_tokens - 1), the
    count from the usage chunk (else the events'), None for a single token; the gaps are those between
    successive token events (several tokens can share an event: a multi-token character)."""
    t = r.tokens
    n = r.completion_tokens if r.completion_tokens is not None else len(t)
    tpot = (t[-1] - t[0]) / (n - 1) if n > 1 else None
    return t[0] - r.scheduled, tpot, [b - a for a, b in itertools.pairwise(t)]


def breakdown(results: list[Result]) -> dict | None:
    """Where the time of the typical (p45-p55) and the slowest (>= p99) successful requests went, from the
    replica's own timing headers: queue (waiting for a batch), inference (its batch computing) and the rest
    (HTTP, nginx, the client). Tells a tail made by batching from one made by the path around it."""
    ok = sorted((r for r in results if r.status == "200" and r.queue_ms is not None and r.inference_ms is not None),
                key=lambda r: r.latency)
    if len(ok) < 100:
        return None

    def band(rs: list[Result]) -> dict:
        lat = 1e3 * float(np.mean([r.latency for r in rs]))
        q, inf = float(np.mean([r.queue_ms for r in rs])), float(np.mean([r.inference_ms for r in rs]))
        return {"n": len(rs), "latency_ms": lat, "queue_ms": q, "inference_ms": inf, "other_ms": lat - q - inf}

    n = len(ok)
    return {"median": band(ok[int(0.45 * n):int(0.55 * n) + 1]), "p99_tail": band(ok[int(0.99 * n):])}


def _pct(xs, q: float) -> float | None:
    return percentile(xs, q) if len(xs) else None


def generation_stats(ok: list[Result], wall: float) -> dict:
    """Per-level generation numbers over successful streamed completions (see token_metrics): TTFT, TPOT and
    ITL p50/p99 in ms (ITL over every gap of every request, as vLLM pools them), output tokens/s of wall
    time, and the mean prompt and completion lengths in tokens."""
    rs = [r for r in ok if r.tokens]
    m = [token_metrics(r) for r in rs]
    ttft, tpot = [x[0] for x in m], [x[1] for x in m if x[1] is not None]
    itl = [g for x in m for g in x[2]]
    ms = lambda xs, q: None if not xs else 1000 * percentile(xs, q)  # noqa: E731
    n_out = [r.completion_tokens if r.completion_tokens is not None else len(r.tokens) for r in rs]
    n_in = [r.prompt_tokens for r in rs if r.prompt_tokens is not None]
    return {"ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99), "tpot_p50_ms": ms(tpot, 50),
            "tpot_p99_ms": ms(tpot, 99), "itl_p50_ms": ms(itl, 50), "itl_p99_ms": ms(itl, 99),
            "output_tok_s": sum(n_out) / wall, "prompt_tokens_mean": float(np.mean(n_in)) if n_in else None,
            "completion_tokens_mean": float(np.mean(n_out)) if n_out else None}


def summarize(results: list[Result], t0: float, offered_rps: float, duration_s: float, slo_s: float,
              tpot_slo_s: float | None = None) -> dict:
    """Aggregate one level. Latency percentiles are over successful requests; refusals get their own p99;
    throughput and goodput are per second of wall time from the first due request to the last answer. A
    request is good when it succeeded within `slo_s` (streamed completions: to the first token) and, with
    `tpot_slo_s`, a streamed completion's time per output token is within that too. A level with streamed
    token events also gets generation_stats' keys."""
    if not results:  # (a very low rate over a short level can draw no arrival at all)
        return {"offered_rps": offered_rps, "sent": 0, "ok": 0, "achieved_rps": 0.0, "goodput_rps": 0.0,
                "goodput_fraction": None, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None,
                "errors": {}, "failed": 0, "retried": 0, "refused": 0, "reject_p99_ms": None, "send_lag_p99_ms": None,
                "wall_s": duration_s, "breakdown": None, "by_route": {}}
    end = max(r.done for r in results)
    wall = max(duration_s, end - t0)
    ok = [r for r in results if r.status == "200"]
    lat = [r.latency for r in ok]

    def slo_latency(r: Result) -> float:  # streamed completions: time to first token
        return (r.first - r.scheduled) if r.first else r.latency

    def tpot_ok(r: Result) -> bool:
        if tpot_slo_s is None or not r.tokens:
            return True
        tpot = token_metrics(r)[1]
        return tpot is None or tpot <= tpot_slo_s

    good = [r for r in ok if slo_latency(r) <= slo_s and tpot_ok(r)]
    refused = [r.latency for r in results if r.status in REFUSALS]
    ms = lambda x: None if x is None else x * 1000  # noqa: E731
    out = {
        "offered_rps": offered_rps,
        "sent": len(results),
        "ok": len(ok),
        "achieved_rps": len(ok) / wall,
        "goodput_rps": len(good) / wall,
        "goodput_fraction": len(good) / len(results),
        "p50_ms": ms(_pct(lat, 50)), "p90_ms": ms(_pct(lat, 90)), "p99_ms": ms(_pct(lat, 99)),
        "max_ms": ms(max(lat) if lat else None),
        "errors": dict(Counter(r.status for r in results if r.status != "200")),
        "failed": len(results) - len(ok),
        "retried": sum(r.retried for r in results),
        "refused": len(refused),
        "reject_p99_ms": ms(_pct(refused, 99)),
        "send_lag_p99_ms": ms(_pct([r.sent - r.scheduled for r in results], 99)),
        "wall_s": wall,
        "breakdown": breakdown(results),
        "by_route": {},
    }
    if any(r.tokens for r in ok):
        out.update(generation_stats(ok, wall))
    for route in sorted({r.route for r in results}):
        rr = [r for r in results if r.route == route]
        rl = [r.latency for r in rr if r.status == "200"]
        out["by_route"][route] = {"sent": len(rr), "ok": len(rl), "p50_ms": ms(_pct(rl, 50)),
                                  "p99_ms": ms(_pct(rl, 99))}
        firsts = [r.first - r.scheduled for r in rr if r.status == "200" and r.first]
        if firsts:
            out["by_route"][route]["ttft_p50_ms"] = ms(_pct(firsts, 50))
            out["by_route"][route]["ttft_p99_ms"] = ms(_pct(firsts, 99))
    return out
