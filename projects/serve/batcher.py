"""A dynamic batcher, written by hand on asyncio (the pattern of text-embeddings-inference's queue).

Requests put entries (item, cost, future, timestamps) into one bounded queue; one worker task owns the
queue. It waits for the first entry, then keeps taking entries until the batch holds `max_batch_size`
items or `max_batch_cost` (e.g. tokens), or until `max_wait_ms` after the FIRST entry was enqueued -- so a
lone request never waits longer than `max_wait_ms` for company. The batch runs in a one-thread executor,
off the event loop; while it runs the loop keeps accepting requests, so the next batch is already queued
when the current one ends (no wait at all under load). Each entry's future is resolved with its own result.

Admission control: a full queue refuses at once (`Overloaded`, mapped to 503/429 + Retry-After by the
app) instead of letting latency grow without bound. Entries whose future was cancelled (the client went
away) or whose deadline passed are dropped when popped, before they cost compute.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """The queue is full (or the batcher stopped): refuse now, ask the client to retry after a while."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request waited in the queue past its deadline and was dropped before compute."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Entry:
    item: Any
    cost: int
    future: asyncio.Future
    t_enqueue: float
    deadline: float | None   # loop.time() after which the entry is dropped unstarted
    t_enqueue_pc: float = field(default_factory=time.perf_counter)  # precise clock, for the timing headers
    t_start: float = 0.0     # perf_counter when its batch began computing
    t_end: float = 0.0


@dataclass
class Timing:
    """Per-request timings, for the x-queue-time / x-inference-time headers (seconds)."""
    queue_s: float = 0.0
    inference_s: float = 0.0


async def cancel(task: asyncio.Task) -> None:
    """Cancel a worker task and wait until it has stopped."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass


class Batcher:
    """`fn(items) -> results` (same length, same order) called on batches; `submit` awaits one result."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], *, max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, max_queue: int = 1024, max_batch_cost: int | None = None,
                 name: str = "batch", on_batch: Callable[[str, int, float], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self.max_batch_cost = max_batch_cost
        self.name = name
        self.on_batch = on_batch          # (name, batch size, seconds) after each batch, for metrics
        self._q: collections.deque[_Entry] = collections.deque()
        self._queued_cost = 0
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._batch_s_ewma = 0.0          # recent batch duration, for Retry-After
        self.batches = 0                  # counters for tests and /metrics
        self.computed = 0
        self.dropped = 0
        self.rejected = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is not None:
            return
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"batcher-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Stop the worker; queued entries are refused (the app drains in-flight requests before this)."""
        if self._task is None:
            return
        await cancel(self._task)
        self._task = None
        while self._q:
            e = self._q.popleft()
            if not e.future.done():
                e.future.set_exception(Overloaded(f"{self.name} batcher stopped"))
        self._queued_cost = 0
        self._executor.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return len(self._q)

    def retry_after_s(self) -> float:
        """How long until the queue has drained a batch's worth: at least 1 s (Retry-After is integral)."""
        batches_ahead = math.ceil(len(self._q) / self.max_batch_size)
        return max(1.0, math.ceil(batches_ahead * self._batch_s_ewma))

    # -- requests ----------------------------------------------------------------------------------------
    async def submit(self, item: Any, *, cost: int = 1, timeout_s: float | None = None,
                     timing: Timing | None = None) -> Any:
        return (await self.submit_many([item], costs=[cost], timeout_s=timeout_s, timing=timing))[0]

    async def submit_many(self, items: Sequence[Any], *, costs: Sequence[int] | None = None,
                          timeout_s: float | None = None, timing: Timing | None = None) -> list[Any]:
        """Enqueue all items or none (a request is admitted whole); await their results in order.

        Cancelling the awaiting task cancels the entries' futures, so the worker skips them."""
        if self._task is None:
            raise Overloaded(f"{self.name} batcher is not running")
        if len(items) > self.max_queue - len(self._q):
            self.rejected += 1
            raise Overloaded(f"{self.name} queue is full ({len(self._q)}/{self.max_queue})",
                             self.retry_after_s())
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + timeout_s if timeout_s is not None else None
        costs = costs if costs is not None else [1] * len(items)
        entries = [_Entry(it, int(c), loop.create_future(), now, deadline) for it, c in zip(items, costs)]
        self._q.extend(entries)
        self._queued_cost += sum(e.cost for e in entries)
        self._arrived.set()
        try:
            results = await asyncio.gather(*(e.future for e in entries))
        except BaseException:
            for e in entries:  # one failed or we were cancelled: the rest need not be computed
                e.future.cancel()
            raise
        if timing is not None:
            timing.queue_s = max(e.t_start - e.t_enqueue_pc for e in entries)
            timing.inference_s = max(e.t_end - e.t_start for e in entries)
        return list(results)

    # -- the worker --------------------------------------------------------------------------------------
    def _full(self) -> bool:
        return len(self._q) >= self.max_batch_size or \
            (self.max_batch_cost is not None and self._queued_cost >= self.max_batch_cost)

    def _pop_live(self, now: float) -> _Entry | None:
        """The next entry still worth computing; cancelled and expired ones are dropped here."""
        while self._q:
            e = self._q.popleft()
            self._queued_cost -= e.cost
            if e.future.done():        # cancelled by its caller (client disconnected)
                self.dropped += 1
                continue
            if e.deadline is not None and now > e.deadline:
                self.dropped += 1
                e.future.set_exception(DeadlineExceeded(
                    f"request waited {now - e.t_enqueue:.3f}s in the {self.name} queue, past its deadline",
                    self.retry_after_s()))
                continue
            return e
        return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._q:
                self._arrived.clear()
                await self._arrived.wait()
            # Wait for company, but only until max_wait after the oldest entry arrived.
            while not self._full():
                remaining = self._q[0].t_enqueue + self.max_wait_s - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
                if not self._q:
                    break
            now = loop.time()
            batch: list[_Entry] = []
            cost = 0
            while len(batch) < self.max_batch_size and self._q:
                head = self._q[0]
                if batch and self.max_batch_cost is not None and cost + head.cost > self.max_batch_cost:
                    break  # stays first in line for the next batch
                e = self._pop_live(now)
                if e is None:
                    break
                batch.append(e)
                cost += e.cost
            if not batch:
                continue
            pc0 = time.perf_counter()
            for e in batch:
                e.t_start = pc0
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [e.item for e in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: fn returned {len(results)} results for {len(batch)}")
            except asyncio.CancelledError:  # stop() during compute: these entries left the queue already
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(Overloaded(f"{self.name} batcher stopped"))
                raise
            except Exception as exc:  # the model failed: every caller in the batch gets the error
                results, error = None, exc
            else:
                error = None
            pc1 = time.perf_counter()
            dt = pc1 - pc0
            self._batch_s_ewma = dt if self.batches == 0 else 0.8 * self._batch_s_ewma + 0.2 * dt
            self.batches += 1
            self.computed += len(batch)
            if self.on_batch is not None:
                self.on_batch(self.name, len(batch), dt)
            for i, e in enumerate(batch):
                e.t_end = pc1
                if e.future.done():
                    continue
                if error is not None:
                    e.future.set_exception(error)
                else:
                    e.future.set_result(results[i])
