"""The hand-written dynamic batcher, on a fake model: batching, admission control, deadlines, cancellation."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from projects.serve.batcher import Batcher, DeadlineExceeded, Overloaded, Timing


class Fake:
    """fn(items) -> items * 10, recording every batch; can be held on an event to stall the worker."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items):
        self.gate.wait(10)
        time.sleep(self.delay)
        self.batches.append(list(items))
        return [x * 10 for x in items]


def test_concurrent_requests_get_their_own_results_in_batches():
    async def main():
        fake = Fake(0.002)
        b = Batcher(fake, max_batch_size=16, max_wait_ms=5, max_queue=1000)
        b.start()
        res = await asyncio.gather(*(b.submit(i) for i in range(200)))
        await b.stop()
        return fake, res
    fake, res = asyncio.run(main())
    assert res == [i * 10 for i in range(200)]
    assert max(len(x) for x in fake.batches) == 16          # requests were batched, up to the limit
    assert len(fake.batches) < 200 / 4
    assert sorted(x for bt in fake.batches for x in bt) == list(range(200))  # each computed once


def test_token_budget_splits_batches():
    async def main():
        fake = Fake()
        b = Batcher(fake, max_batch_size=100, max_wait_ms=20, max_queue=100, max_batch_cost=10)
        b.start()
        await asyncio.gather(*(b.submit(i, cost=4) for i in range(6)))
        await b.stop()
        return fake
    fake = asyncio.run(main())
    assert [len(x) for x in fake.batches] == [2, 2, 2]  # 3 x 4 > 10


def test_full_queue_refuses_immediately():
    async def main():
        fake = Fake()
        fake.gate.clear()                       # the worker is stuck on the first batch
        b = Batcher(fake, max_batch_size=1, max_wait_ms=0, max_queue=4)
        b.start()
        first = asyncio.ensure_future(b.submit(0))
        await asyncio.sleep(0.05)               # taken by the worker, which now blocks
        queued = [asyncio.ensure_future(b.submit(i)) for i in range(1, 5)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        with pytest.raises(Overloaded) as ei:
            await b.submit(99)
        dt = time.perf_counter() - t0
        with pytest.raises(Overloaded):
            await b.submit_many([100, 101])       # admitted whole or not at all
        fake.gate.set()
        res = await asyncio.gather(first, *queued)
        await b.stop()
        return dt, ei.value, res
    dt, exc, res = asyncio.run(main())
    assert dt < 0.05
    assert exc.retry_after_s >= 1
    assert res == [0, 10, 20, 30, 40]


def test_max_wait_bounds_a_lone_request():
    async def main(wait_ms):
        b = Batcher(Fake(), max_batch_size=64, max_wait_ms=wait_ms, max_queue=100)
        b.start()
        await b.submit(0)  # first call pays for the executor thread start
        lat = []
        for i in range(5):
            t0 = time.perf_counter()
            await b.submit(i)
            lat.append(time.perf_counter() - t0)
        await b.stop()
        return min(lat), max(lat)
    lo, hi = asyncio.run(main(50))
    assert 0.045 <= lo and hi < 0.050 + 0.1   # waits for company for max_wait, then goes alone
    lo0, _ = asyncio.run(main(0))
    assert lo0 < 0.02


def test_cancelled_request_is_not_computed():
    async def main():
        fake = Fake()
        fake.gate.clear()
        b = Batcher(fake, max_batch_size=1, max_wait_ms=0, max_queue=10)
        b.start()
        blocker = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.05)
        victim = asyncio.ensure_future(b.submit(2))
        keeper = asyncio.ensure_future(b.submit(3))
        await asyncio.sleep(0)
        victim.cancel()                           # the client went away while queued
        fake.gate.set()
        await asyncio.gather(blocker, keeper)
        await b.stop()
        return fake, b
    fake, b = asyncio.run(main())
    computed = [x for bt in fake.batches for x in bt]
    assert 2 not in computed and computed == [1, 3]
    assert b.dropped == 1


def test_deadline_drops_before_compute():
    async def main():
        fake = Fake()
        fake.gate.clear()
        b = Batcher(fake, max_batch_size=1, max_wait_ms=0, max_queue=10)
        b.start()
        blocker = asyncio.ensure_future(b.submit(1))
        await asyncio.sleep(0.02)
        late = asyncio.ensure_future(b.submit(2, timeout_s=0.01))
        await asyncio.sleep(0.05)
        fake.gate.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await late
        await b.stop()
        return fake
    fake = asyncio.run(main())
    assert [x for bt in fake.batches for x in bt] == [1]


def test_model_error_reaches_every_caller_and_worker_survives():
    calls = []

    def fn(items):
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return items

    async def main():
        b = Batcher(fn, max_batch_size=8, max_wait_ms=10, max_queue=10)
        b.start()
        r = await asyncio.gather(b.submit(1), b.submit(2), return_exceptions=True)
        ok = await b.submit(3, timing=(t := Timing()))
        await b.stop()
        return r, ok, t
    r, ok, t = asyncio.run(main())
    assert all(isinstance(x, RuntimeError) for x in r)
    assert ok == 3 and t.inference_s >= 0 and t.queue_s >= 0
