"""Continuous batching for generation over the static KV cache of projects.infer's Llama model.

The cache has `n_slots` rows. A request takes a free row: its prompt is prefilled into slots 0..T-1 of that
row alone, then every engine step decodes ONE token for every active row at once, each row at its own
position (`input_pos` of shape (B, 1), which projects.infer's model supports for exactly this). A row that
finishes (stop token, max_tokens, client gone) frees its slot at once and the next waiting request is
prefilled into it before the following step -- requests join and leave the running batch between tokens
instead of waiting for the whole batch to end (request-level batching). Admission is FIFO; every active
row advances one token per step, so long generations cannot starve short ones of decode steps.

A request's prompt is prefilled only past the longest prefix the prefix cache holds (prefix_cache.py): a
shared system prompt is computed once, then copied into each new row.

Admission: a request is refused at once (`Overloaded`, 503/429 + Retry-After) when `max_queue` requests
already wait, or when its expected wait for a row exceeds `max_wait_s` (`expected_wait_s`: the rows ahead
run to their max_tokens and the prefills queued before it run, at the recently measured decode step and
prefill times). A bound in seconds holds the wait the same on a slower machine; a count alone did not (its
wait is count x service time). A request whose client left or whose deadline passed while it waited is
dropped before its prefill. The model runs in one worker thread
(off the event loop); tokens reach the caller through an asyncio queue as they are produced.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import heapq
import math
import contextlib
from dataclasses import dataclass, field

import torch

from projects.serve.batcher import DeadlineExceeded, Overloaded, cancel
from projects.serve.prefix_cache import PrefixCache


class ContextLengthExceeded(ValueError):
    """Prompt + max_tokens longer than the KV cache rows (OpenAI's context_length_exceeded)."""


@dataclass(eq=False)
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: int | None = None     # None: no log-probabilities; k >= 0: the chosen token's and the top k
    out: asyncio.Queue = field(default_factory=asyncio.Queue)  # Token, then None (done) or an exception
    cancelled: bool = False
    t_enqueue: float = 0.0
    deadline: float | None = None
    t_start: float = 0.0
    # engine state
    row: int = -1
    pos: int = 0                    # next cache slot to write (= tokens so far)
    n_new: int = 0
    cached: int = 0                 # prompt tokens copied from the prefix cache, not prefilled
    last: int = 0
    generator: torch.Generator | None = None
    finish_reason: str | None = None


@dataclass
class Token:
    id: int
    logprob: float | None = None                  # log p(id) under the model's distribution (temperature 1)
    top: list[tuple[int, float]] | None = None    # the k most likely (id, log p), most likely first
    text: str = ""                                # set by textstream.TextStream when logprobs are asked
    top_text: list[str] | None = None


@contextlib.contextmanager
def _row_view(model, row: int):
    """Point every layer's KV cache at row `row` alone (a view, so writes land in the shared cache): the
    model writes cache rows [:B] of a B-row input, and a prefill must fill this request's row only."""
    saved = []
    for layer in model.layers:
        c = layer.attention.kv_cache
        saved.append((c, c.k_cache, c.v_cache))
        c.k_cache, c.v_cache = c.k_cache[row:row + 1], c.v_cache[row:row + 1]
    try:
        yield
    finally:
        for c, k, v in saved:
            c.k_cache, c.v_cache = k, v


class GenerationEngine:
    def __init__(self, model, tokenizer, *, n_slots: int = 8, max_queue: int = 64, max_wait_s: float = 0.0,
                 max_seq_len: int | None = None, stop_ids: tuple[int, ...] | None = None, name: str = "generate",
                 on_step=None,
                 prefix_cache_bytes: int = 0, version: str = "", model_id: str = "generator"):
        from projects.infer.generate import sample
        self._sample = sample
        self.model = model
        self.tokenizer = tokenizer
        self.n_slots = n_slots
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s      # 0: admission by count alone
        self.ctx = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.stop_ids = tuple(stop_ids) if stop_ids is not None else \
            ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
        self.name = name
        self.model_id = model_id          # what /v1/models lists and `model` must match
        self.version = version            # the weights' identity: model, quantization, dtype
        self.on_step = on_step            # (name, active rows, seconds) per decode step, for metrics
        self.device = next(model.parameters()).device
        model.setup_caches(n_slots, self.ctx)
        self.prefix = PrefixCache(model, prefix_cache_bytes, version=version) if prefix_cache_bytes else None
        if self.prefix is not None and self.prefix.n_blocks == 0:
            raise ValueError(f"a prefix cache of {prefix_cache_bytes} bytes holds no block of "
                             f"{self.prefix.block_bytes} bytes")
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._active: dict[int, GenRequest] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.steps = 0
        self.dropped = 0
        self.rejected = 0
        self._decode_s = 0.0              # EWMA of a decode step without prefills (recent batch sizes)
        self._prefill_tok_s = 0.0         # EWMA of prefill seconds per prompt token

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache rows and the prefix cache, allocated at start."""
        c = self.model.layers[0].attention.kv_cache
        rows = len(self.model.layers) * 2 * c.k_cache.numel() * c.k_cache.element_size()
        return rows + (self.prefix.nbytes if self.prefix is not None else 0)

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="generate")
            self._task = asyncio.get_running_loop().create_task(self._run(), name="generate-engine")

    async def stop(self) -> None:
        if self._task is None:
            return
        await cancel(self._task)
        self._task = None
        for r in [*self._waiting, *self._active.values()]:
            r.out.put_nowait(Overloaded("generation engine stopped"))
        self._waiting.clear()
        self._active.clear()
        self._executor.shutdown(wait=True)

    def expected_wait_s(self) -> float:
        """Seconds until a request queued now would start its prefill: each running row frees after its
        remaining max_tokens decode steps, each waiting request takes the first row to free (FIFO) and holds
        it for its max_tokens, and every queued prefill stalls the engine before this one. An upper bound
        where generations stop early (stop token, client gone); 0 before the first steps were timed."""
        free_at = [(r.max_tokens - r.n_new) * self._decode_s for r in self._active.values()]
        free_at += [0.0] * (self.n_slots - len(free_at))
        heapq.heapify(free_at)
        prefill_tokens = 0
        for r in self._waiting:
            heapq.heapreplace(free_at, free_at[0] + r.max_tokens * self._decode_s)
            prefill_tokens += len(r.prompt_ids)
        return free_at[0] + prefill_tokens * self._prefill_tok_s

    def retry_after_s(self) -> float:
        """Retry-After: when the wait ahead of a new request has run down (integral, at least 1 s)."""
        return max(1.0, float(math.ceil(self.expected_wait_s())))

    def submit(self, req: GenRequest, timeout_s: float | None = None) -> GenRequest:
        """Queue a request (or raise Overloaded); read its tokens from `req.out` until None."""
        if self._task is None:
            raise Overloaded("generation engine is not running")
        if len(self._waiting) >= self.max_queue:
            self.rejected += 1
            raise Overloaded(f"generation queue is full ({len(self._waiting)}/{self.max_queue})",
                             self.retry_after_s())
        if self.max_wait_s > 0 and (wait := self.expected_wait_s()) > self.max_wait_s:
            self.rejected += 1
            raise Overloaded(f"generation queue is full: a row frees in ~{wait:.1f} s, over the "
                             f"{self.max_wait_s:g} s bound", max(1.0, math.ceil(wait)))
        if not req.prompt_ids:
            raise ValueError("empty prompt")
        if len(req.prompt_ids) + req.max_tokens > self.ctx:
            raise ContextLengthExceeded(
                f"this model's context is {self.ctx} tokens; the prompt has {len(req.prompt_ids)} and "
                f"max_tokens asks for {req.max_tokens} more")
        loop = asyncio.get_running_loop()
        req.t_enqueue = loop.time()
        req.deadline = req.t_enqueue + timeout_s if timeout_s is not None else None
        if req.seed is not None:
            req.generator = torch.Generator(device=self.device).manual_seed(req.seed)
        self._waiting.append(req)
        self._wake.set()
        return req

    # -- engine ------------------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor, r: GenRequest) -> torch.Tensor:
        return self._sample(logits, r.temperature, r.top_k, r.top_p, r.generator)  # (1,)

    def _prefill(self, r: GenRequest) -> torch.Tensor:
        """Logits (1, V) of the prompt's last token, computed into KV cache row r.row; the part of the prompt
        the prefix cache holds is copied in, not computed."""
        chain = self.prefix.match(r.prompt_ids) if self.prefix is not None else []
        try:
            n = r.cached = self.prefix.load(chain, r.row) if chain else 0
            ids = torch.tensor([r.prompt_ids[n:]], dtype=torch.long, device=self.device)       # (1, T - n)
            with _row_view(self.model, r.row):
                logits = self.model(ids, torch.arange(n, len(r.prompt_ids), device=self.device),
                                    last_only=True, kv_len=len(r.prompt_ids))[:, -1]
            if self.prefix is not None:
                self.prefix.store(r.prompt_ids, r.row, chain)
        finally:
            if self.prefix is not None:
                self.prefix.release(chain)
        return logits

    @torch.inference_mode()
    def _compute(self, new: list[GenRequest], running: list[GenRequest]) -> dict[int, Token]:
        """Decode one token for every running row, then prefill the newly admitted rows (first token)."""
        nxt: dict[int, torch.Tensor] = {}
        lp: dict[int, torch.Tensor] = {}
        if running:
            B = max(r.row for r in running) + 1            # rows [:B] of the cache; idle rows are dummies
            tok = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            pos = torch.zeros(B, 1, dtype=torch.long, device=self.device)
            for r in running:
                tok[r.row, 0], pos[r.row, 0] = r.last, r.pos
            logits = self.model(tok, pos)[:, -1]           # (B, V); causal mask per row from pos
            greedy = logits.argmax(-1)
            for r in running:
                row = logits[r.row:r.row + 1]
                nxt[r.row] = greedy[r.row:r.row + 1] if r.temperature <= 0 else self._pick(row, r)
                if r.logprobs is not None:
                    lp[r.row] = self._logprobs(row, nxt[r.row], r.logprobs)
        for r in new:
            logits = self._prefill(r)                       # (1, V)
            nxt[r.row] = self._pick(logits, r)
            if r.logprobs is not None:
                lp[r.row] = self._logprobs(logits, nxt[r.row], r.logprobs)
        if not nxt:
            return {}
        rows = list(nxt)
        vals = torch.cat([nxt[k] for k in rows]).tolist()  # the one host sync per step (tokens go out)
        out = {k: Token(v) for k, v in zip(rows, vals)}
        if lp:                                              # a second sync, only when a row asked
            flat = torch.cat(list(lp.values())).tolist()
            for k, x in lp.items():
                v, flat = flat[:len(x)], flat[len(x):]
                n = (len(v) - 1) // 2
                out[k].logprob, out[k].top = v[0], [(int(i), p) for i, p in zip(v[1 + n:], v[1:1 + n])]
        return out

    @staticmethod
    def _logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
        """(1 + 2k,) float: log p(chosen), the top-k log p, their ids (exact as floats below 2**24)."""
        lsm = logits[0].float().log_softmax(-1)                                     # (V,)
        top = lsm.topk(k) if k else (lsm[:0], chosen[:0])
        return torch.cat([lsm[chosen], top[0], top[1].float()])

    def _time_step(self, dt: float, running: list[GenRequest], new: list[GenRequest]) -> None:
        """Update the decode-step and per-token prefill EWMAs that expected_wait_s reads. A step's time is
        its decode (when rows were running) plus its prefills; the total includes the one host sync, so
        this holds on an asynchronous device too."""
        if not new:
            self._decode_s = dt if not self._decode_s else 0.9 * self._decode_s + 0.1 * dt
            return
        tokens = sum(len(r.prompt_ids) - r.cached for r in new)
        per_tok = max(0.0, dt - (self._decode_s if running else 0.0)) / tokens
        ewma = 0.9 * self._prefill_tok_s + 0.1 * per_tok
        self._prefill_tok_s = ewma if self._prefill_tok_s else per_tok

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._waiting and not self._active:
                self._wake.clear()
                await self._wake.wait()
            # drop rows whose client left
            for row, r in list(self._active.items()):
                if r.cancelled:
                    del self._active[row]
            # admit waiting requests into free rows, lowest row first (keeps the decode batch short)
            new = []
            free = [i for i in range(self.n_slots) if i not in self._active]
            now = loop.time()
            while free and self._waiting:
                r = self._waiting.popleft()
                if r.cancelled:
                    self.dropped += 1
                    continue
                if r.deadline is not None and now > r.deadline:
                    self.dropped += 1
                    r.out.put_nowait(DeadlineExceeded(
                        f"completion waited {now - r.t_enqueue:.3f}s in the queue, past its deadline",
                        self.retry_after_s()))
                    continue
                r.row, r.pos, r.t_start = free.pop(0), len(r.prompt_ids), now
                new.append(r)
            running = list(self._active.values())
            if not new and not running:
                continue
            for r in new:
                self._active[r.row] = r
            t0 = loop.time()
            try:
                toks = await loop.run_in_executor(self._executor, self._compute, new, running)
            except Exception as e:  # a model failure ends the requests in this step, not the engine
                for r in new + running:
                    self._active.pop(r.row, None)
                    r.out.put_nowait(e)
                continue
            dt = loop.time() - t0
            self._time_step(dt, running, new)
            self.steps += 1
            if self.on_step is not None:
                self.on_step(self.name, len(running) + len(new), dt)
            for r in running:
                r.pos += 1                                   # the decode step wrote r.last at r.pos
            for row, t in toks.items():
                r = self._active.get(row)
                if r is None:
                    continue
                r.last = t.id
                r.n_new += 1
                stop = t.id in self.stop_ids
                if not stop:
                    r.out.put_nowait(t)
                if stop or r.n_new >= r.max_tokens or r.cancelled:
                    r.finish_reason = "stop" if stop else "length"
                    r.out.put_nowait(None)
                    del self._active[row]
