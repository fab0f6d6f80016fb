"""The local autoscaler: queue depth and p99 from each replica's /metrics -> how many replicas to run.

    python -m projects.serve.cluster up --replicas 1 --max-replicas 2      # the supervisor runs it

Every `interval_s` the supervisor (cluster.py) hands it the /metrics URLs of the ready replicas. It reads
the queue-depth gauge (summed over a replica's queues) and the request-duration histogram of the
embeddings and search routes, and decides:
  - desired = ceil(replicas * mean queue depth / target_queue) -- the Kubernetes HPA rule on the same
    metric (deploy/k8s/hpa.yaml), so the local and the cluster deployments scale alike;
  - p99 over the last interval above the SLO asks for at least one more replica;
  - up at once (never while a replica is still starting: its queue is not counted yet, and counting it
    as capacity would scale up again for the same load); down by one only after the load has been low
    (desired below current and p99 under half the SLO) for `scale_down_after_s`, so a lull between bursts
    does not take capacity away.
p99 is computed from the histogram's bucket *increments* since the previous scrape (what Prometheus'
histogram_quantile(rate(...)) does), not from the totals since the replica started.
The supervisor applies the decision: new replicas join nginx when /readyz answers; a removed one is taken
out of nginx and reloaded before it gets SIGTERM and drains, so scaling drops no request.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

QUEUE_METRIC = "serve_queue_depth"
LATENCY_METRIC = "serve_request_duration_seconds"


def parse_metrics(text: str) -> list[tuple[str, dict, float]]:
    """Prometheus text format -> [(sample name, labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families
    return [(s.name, dict(s.labels), float(s.value))
            for fam in text_string_to_metric_families(text) for s in fam.samples]


def queue_depth(samples, metric: str = QUEUE_METRIC) -> float:
    """Sum of the queue-depth gauge over all its label sets (embedding, search, generation queues)."""
    return sum(v for n, _, v in samples if n == metric)


def latency_buckets(samples, metric: str = LATENCY_METRIC, routes: tuple[str, ...] = ("embeddings", "search"),
                    ) -> dict[float, float]:
    """{upper bound: cumulative count} of the duration histogram, summed over the label sets whose labels
    mention one of `routes` (streamed completions last seconds by design and would swamp the p99)."""
    out: dict[float, float] = {}
    for n, labels, v in samples:
        if n != metric + "_bucket" or not any(r in str(x) for x in labels.values() for r in routes):
            continue
        le = float(labels["le"])
        out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Quantile q in [0, 1] from cumulative buckets {le: count}, linear within a bucket (Prometheus' rule);
    None without observations. Past the last finite bound it answers that bound."""
    if not buckets:
        return None
    les = sorted(buckets)
    total = buckets[les[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le in les:
        c = buckets[le]
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return les[-1]


@dataclass
class Autoscaler:
    min_replicas: int = 1
    max_replicas: int = 2
    target_queue: float = 8.0          # mean queued requests per replica the HPA rule aims at
    slo_ms: float = 250.0              # p99 above this asks for one more replica
    interval_s: float = 2.0
    scale_down_after_s: float = 30.0
    queue_metric: str = QUEUE_METRIC
    latency_metric: str = LATENCY_METRIC
    reason: str = ""
    _prev: dict = field(default_factory=dict)    # url -> buckets at the previous scrape
    _last: float = -1e9
    _low_since: float | None = None

    def decide(self, n: int, queues: list[float], p99_s: float | None, now: float, starting: int = 0) -> int:
        """Pure policy: replicas wanted given current `n` (ready + starting), the ready replicas' queue
        depths and the p99 over the last interval."""
        mean_q = sum(queues) / len(queues) if queues else 0.0
        desired = math.ceil(n * mean_q / self.target_queue) if self.target_queue > 0 else n
        slow = p99_s is not None and p99_s * 1000 > self.slo_ms
        if slow:
            desired = max(desired, n + 1)
        desired = min(max(desired, self.min_replicas), self.max_replicas)
        p99_txt = "-" if p99_s is None else f"{p99_s * 1000:.0f} ms"
        self.reason = f"mean queue {mean_q:.1f} (target {self.target_queue:g}), p99 {p99_txt} (SLO {self.slo_ms:g})"
        if desired > n:
            self._low_since = None
            return n if starting else desired
        calm = p99_s is None or p99_s * 1000 < self.slo_ms / 2
        if desired < n and calm:
            if self._low_since is None:
                self._low_since = now
            if now - self._low_since >= self.scale_down_after_s:
                self._low_since = None
                return n - 1
            return n
        self._low_since = None
        return n

    def step(self, urls: list[str], n: int, starting: int = 0) -> int | None:
        """Scrape (at most every interval_s) and decide; None between intervals or with nothing to read."""
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return None
        self._last = now
        import httpx
        queues, delta = [], {}
        for url in urls:
            try:
                samples = parse_metrics(httpx.get(url, timeout=0.5).text)
            except (httpx.HTTPError, ValueError):
                continue   # a replica that cannot answer its metrics is not counted (nginx also skips it)
            queues.append(queue_depth(samples, self.queue_metric))
            b = latency_buckets(samples, self.latency_metric)
            prev = self._prev.get(url, {})
            for le, c in b.items():
                delta[le] = delta.get(le, 0.0) + max(0.0, c - prev.get(le, 0.0))
            self._prev[url] = b
        if not queues:
            return None
        return self.decide(n, queues, histogram_quantile(0.99, delta), now, starting)
