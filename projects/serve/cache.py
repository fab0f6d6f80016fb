"""Embedding cache: an in-process LRU bounded in entries and bytes, optionally in front of a shared Redis.

Keys are (model version, exact text): a different model or revision never reads another's vectors, and no
normalisation of the text is done, so a hit returns bit-for-bit what the model gave for that text. Redis
(set REDIS_URL) lets replicas share their work: a miss in the local LRU asks Redis, a Redis hit fills the
LRU, a computed vector goes into both. Redis bounds its own memory (`--maxmemory ... --maxmemory-policy
allkeys-lru`, as `make serve` starts it) and entries also expire after `ttl_s`. A Redis that is down or slow
costs a miss, never a failed request.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import time

import numpy as np
from redis.exceptions import RedisError

log = logging.getLogger("serve.cache")
_ENTRY_OVERHEAD = 200  # bytes of Python objects around each entry (key tuple, array header, dict slot)


class LRUCache:
    """OrderedDict LRU of float32 vectors; evicts the least recently used past max_entries or max_bytes."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._d: collections.OrderedDict[tuple[str, str], np.ndarray] = collections.OrderedDict()
        self.nbytes = 0

    @staticmethod
    def _size(key: tuple[str, str], vec: np.ndarray) -> int:
        return vec.nbytes + len(key[1].encode("utf-8", "surrogatepass")) + _ENTRY_OVERHEAD

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: tuple[str, str]) -> np.ndarray | None:
        vec = self._d.get(key)
        if vec is not None:
            self._d.move_to_end(key)
        return vec

    def put(self, key: tuple[str, str], vec: np.ndarray) -> None:
        size = self._size(key, vec)
        if self.max_entries <= 0 or size > self.max_bytes:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.nbytes -= self._size(key, old)
        vec = np.array(vec, dtype=np.float32, copy=True)
        vec.setflags(write=False)  # shared by every caller that hits it
        self._d[key] = vec
        self.nbytes += size
        while len(self._d) > self.max_entries or self.nbytes > self.max_bytes:
            k, v = self._d.popitem(last=False)
            self.nbytes -= self._size(k, v)


class EmbeddingCache:
    """LRU in front of an optional Redis. `get_many` returns the vectors found (None for misses)."""

    # circuit breaker: after this many Redis failures in a row, requests skip Redis for `open_s` (doubling
    # per failed probe, up to `max_open_s`), so a hanging Redis costs each request nothing instead of a timeout
    BREAKER_FAILURES, BREAKER_OPEN_S, BREAKER_MAX_OPEN_S = 3, 2.0, 60.0

    def __init__(self, model_version: str, *, max_entries: int = 100_000, max_bytes: int = 256 << 20,
                 redis_url: str | None = None, ttl_s: int = 7 * 24 * 3600, redis_timeout_s: float = 0.25,
                 dim: int | None = None):
        self.model_version = model_version
        self.dim = dim  # a Redis value is used only if it is exactly dim finite float32s (when dim is known)
        self.lru = LRUCache(max_entries, max_bytes)
        self.ttl_s = ttl_s
        self.redis = None
        if redis_url:
            import redis.asyncio as aioredis
            from urllib.parse import urlparse
            u = urlparse(redis_url)
            if u.scheme == "redis" and u.hostname not in ("127.0.0.1", "localhost", "::1") and not u.password:
                raise ValueError(f"redis_url {u.hostname}: a Redis off this host needs a password "
                                 "(redis://:PASSWORD@host:port/0, or rediss:// for TLS)")
            self.redis = aioredis.from_url(redis_url, socket_timeout=redis_timeout_s,
                                           socket_connect_timeout=redis_timeout_s)
        self._fails = 0                 # Redis failures in a row
        self._open_until = 0.0          # breaker open (Redis skipped) until this monotonic time
        self._open_s = self.BREAKER_OPEN_S
        self.hits = {"lru": 0, "redis": 0}
        self.misses = 0
        self.redis_errors = 0

    def redis_key(self, text: str) -> str:
        h = hashlib.sha256(f"{self.model_version}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
        return f"serve:emb:{h}"

    async def get_many(self, texts: list[str]) -> tuple[list[np.ndarray | None], dict[str, int]]:
        """(vectors with None for misses, {"lru": hits, "redis": hits, "miss": misses}) for these texts."""
        out: list[np.ndarray | None] = [self.lru.get((self.model_version, t)) for t in texts]
        n = {"lru": sum(v is not None for v in out), "redis": 0, "miss": 0}
        missing = [i for i, v in enumerate(out) if v is None]
        if missing and self._redis_usable():
            try:
                raw = await self.redis.mget([self.redis_key(texts[i]) for i in missing])
                self._redis_ok()
            except (RedisError, OSError, TimeoutError) as e:  # redis down or slow: a miss, not a failure
                self._redis_failed("get", e)
                raw = [None] * len(missing)
            for i, b in zip(missing, raw):
                vec = self._decode(b)
                if vec is not None:
                    out[i] = vec
                    self.lru.put((self.model_version, texts[i]), vec)
                    n["redis"] += 1
        n["miss"] = sum(v is None for v in out)
        self.hits["lru"] += n["lru"]
        self.hits["redis"] += n["redis"]
        self.misses += n["miss"]
        return out, n

    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._open_until

    @property
    def breaker_open(self) -> bool:
        return self.redis is not None and time.monotonic() < self._open_until

    def _redis_ok(self) -> None:
        self._fails, self._open_s = 0, self.BREAKER_OPEN_S

    def _redis_failed(self, what: str, e: Exception) -> None:
        self.redis_errors += 1
        self._fails += 1
        if self._fails >= self.BREAKER_FAILURES:   # open (again, for longer after a failed probe)
            self._open_until = time.monotonic() + self._open_s
            log.warning("redis %s failed (%s); %d failures in a row: skipping redis for %.0f s", what, e,
                        self._fails, self._open_s)
            self._open_s = min(self.BREAKER_MAX_OPEN_S, self._open_s * 2)
        else:
            log.warning("redis %s failed: %s", what, e)

    def _decode(self, b) -> np.ndarray | None:
        """A Redis value as a vector, or None (a miss) for anything else: another writer's garbage, a truncated
        or differently sized value, NaN/inf. Counted in redis_errors; never an exception for the request."""
        if b is None:
            return None
        ok = isinstance(b, bytes) and len(b) % 4 == 0 and len(b) > 0 and (self.dim is None or len(b) == 4 * self.dim)
        vec = np.frombuffer(b, dtype="<f4").astype(np.float32) if ok else None
        if vec is None or not np.isfinite(vec).all():
            self.redis_errors += 1
            log.warning("redis value refused: %s bytes, not %s finite float32s", len(b) if isinstance(b, bytes)
                        else type(b).__name__, self.dim if self.dim is not None else "a whole number of")
            return None
        return vec

    async def put_many(self, texts: list[str], vecs: list[np.ndarray]) -> None:
        for t, v in zip(texts, vecs):
            self.lru.put((self.model_version, t), v)
        if texts and self._redis_usable():
            try:
                pipe = self.redis.pipeline(transaction=False)
                for t, v in zip(texts, vecs):
                    pipe.set(self.redis_key(t), np.asarray(v, dtype="<f4").tobytes(), ex=self.ttl_s)
                await pipe.execute()
                self._redis_ok()
            except (RedisError, OSError, TimeoutError) as e:
                self._redis_failed("set", e)

    async def close(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
