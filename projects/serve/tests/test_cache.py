"""LRU bounds and keys; the shared Redis layer against a real redis-server on a free loopback port."""
from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from common.env import missing
from projects.serve.cache import EmbeddingCache, LRUCache


def vec(x: float, d: int = 4) -> np.ndarray:
    return np.full(d, x, np.float32)


def test_lru_evicts_least_recently_used_by_entries():
    c = LRUCache(max_entries=2, max_bytes=1 << 20)
    c.put(("m", "a"), vec(1))
    c.put(("m", "b"), vec(2))
    assert c.get(("m", "a"))[0] == 1        # a is now most recent
    c.put(("m", "c"), vec(3))
    assert c.get(("m", "b")) is None and c.get(("m", "a")) is not None and len(c) == 2


def test_lru_bounded_in_bytes():
    c = LRUCache(max_entries=10_000, max_bytes=20_000)
    for i in range(1000):
        c.put(("m", f"text {i}"), vec(i, 384))
    assert c.nbytes <= 20_000 and 0 < len(c) < 20
    assert c.get(("m", "text 999")) is not None and c.get(("m", "text 0")) is None


def test_key_is_model_version_and_exact_text():
    async def main():
        a, b = EmbeddingCache("model@1"), EmbeddingCache("model@2")
        await a.put_many(["hello"], [vec(1)])
        b.lru = a.lru                       # even sharing storage, another version never hits
        (va,), na = await a.get_many(["hello"])
        (vb,), nb = await b.get_many(["hello"])
        (vc,), _ = await a.get_many(["hello "])
        return va, vb, vc, na
    va, vb, vc, na = asyncio.run(main())
    assert va is not None and vb is None and vc is None and na["lru"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip(missing("redis-server"))
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def test_redis_shares_vectors_between_replicas(redis_url):
    async def main():
        r1 = EmbeddingCache("m@1", redis_url=redis_url)
        r2 = EmbeddingCache("m@1", redis_url=redis_url)
        await r1.put_many(["shared text"], [vec(7, 384)])
        (v,), n = await r2.get_many(["shared text"])         # r2's LRU is empty: comes from Redis
        (v2,), n2 = await r2.get_many(["shared text"])       # now from r2's LRU
        (m,), nm = await r2.get_many(["never stored"])
        await r1.close()
        await r2.close()
        return v, n, n2, m, nm
    v, n, n2, m, nm = asyncio.run(main())
    np.testing.assert_array_equal(v, vec(7, 384))
    assert n == {"lru": 0, "redis": 1, "miss": 0} and n2["lru"] == 1
    assert m is None and nm["miss"] == 1


def test_garbage_in_redis_is_a_miss_not_an_error(redis_url):
    """Values another writer left under our keys (wrong length, not float32s, NaN) are misses, counted; a good
    one beside them still answers."""
    async def main():
        c = EmbeddingCache("m@1", redis_url=redis_url, dim=4)
        bad = {"short": b"\x00" * 12, "odd": b"\x01" * 17, "nan": np.full(4, np.nan, "<f4").tobytes(), "empty": b""}
        for text, val in bad.items():
            await c.redis.set(c.redis_key(text), val)
        await c.redis.set(c.redis_key("good"), np.arange(4, dtype="<f4").tobytes())
        out, n = await c.get_many([*bad, "good"])
        await c.close()
        return out, n, c.redis_errors
    out, n, errors = asyncio.run(main())
    assert out[:4] == [None] * 4 and n == {"lru": 0, "redis": 1, "miss": 4} and errors == 4
    np.testing.assert_array_equal(out[4], np.arange(4, dtype=np.float32))


def test_redis_down_is_a_miss_not_an_error():
    async def main():
        c = EmbeddingCache("m@1", redis_url=f"redis://127.0.0.1:{_free_port()}/0", redis_timeout_s=0.2)
        await c.put_many(["x"], [vec(1)])                    # fails quietly, LRU still filled
        (v,), n = await c.get_many(["y"])
        await c.close()
        return v, n, c.redis_errors
    v, n, errors = asyncio.run(main())
    assert v is None and n["miss"] == 1 and errors == 2


def test_a_hanging_redis_opens_the_breaker_so_requests_stop_waiting_for_it(monkeypatch):
    """A Redis that accepts connections and never answers: each call would wait its timeout; after 3 in a row
    the cache skips Redis (a miss at once) until a later probe, which finds it still hanging."""
    import socket
    import time
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)                                         # accepts (in the backlog), never answers
    port = srv.getsockname()[1]

    monkeypatch.setattr(EmbeddingCache, "BREAKER_OPEN_S", 0.5)

    async def main():
        c = EmbeddingCache("m@1", redis_url=f"redis://127.0.0.1:{port}/0", redis_timeout_s=0.2)
        times = []
        for i in range(8):
            t0 = time.perf_counter()
            (v,), n = await c.get_many([f"t{i}"])
            times.append(time.perf_counter() - t0)
            assert v is None and n["miss"] == 1
        opened = c.breaker_open
        await asyncio.sleep(0.6)                           # past the open interval: one probe, still hanging
        t0 = time.perf_counter()
        await c.get_many(["probe"])
        probe = time.perf_counter() - t0
        await c.close()
        return times, opened, probe, c.redis_errors
    try:
        times, opened, probe, errors = asyncio.run(main())
    finally:
        srv.close()
    assert all(t >= 0.15 for t in times[:3]) and opened, times
    assert all(t < 0.02 for t in times[3:]), times        # the breaker is open: no waiting
    assert probe >= 0.15 and errors == 4


def test_a_redis_off_this_host_needs_a_password():
    with pytest.raises(ValueError, match="needs a password"):
        EmbeddingCache("m@1", redis_url="redis://10.0.0.5:6379/0")
    EmbeddingCache("m@1", redis_url="redis://:secret@10.0.0.5:6379/0")   # constructing does not connect
