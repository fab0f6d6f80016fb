"""The serving API: embeddings, FAISS search and streamed generation behind dynamic batchers.

    SERVE_INDEX_DIR=runs/serve/index uvicorn --factory projects.serve.app:create_app --host 127.0.0.1 --port 8000
    make serve                  # replicas behind nginx (docs/serve.md)
    python -m projects.serve.app  # checks the settings and index first (one-line error), then uvicorn

Routes: POST /v1/embeddings, /v1/completions, /v1/chat/completions and GET /v1/models (OpenAI-compatible;
the generation routes live in completions.py), POST /v1/search (text or vector -> top-k passages),
GET /healthz (alive), /readyz (models + index loaded and warmed up), /metrics (Prometheus). With API keys
configured (auth.py), /v1/* needs `Authorization: Bearer <key>`.
Every response carries x-queue-time, x-inference-time and x-total-time (milliseconds).

Settings: settings.py (SERVE_<FIELD>); errors, metrics and middleware: middleware.py; request bodies:
schemas.py. This file is the app factory and its routes.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from projects.serve.batcher import Batcher, DeadlineExceeded, Overloaded, Timing
from projects.serve.cache import EmbeddingCache
from projects.serve.engine import ContextLengthExceeded
from projects.serve import completions
from projects.serve.auth import KeyStore, RateLimiter
from projects.serve.middleware import (BadInput, Metrics, ModelNotFound, NotConfigured, ServeMiddleware, TooLarge,
                                       Unavailable, VectorJSON, error_response, ready_state, unless_disconnected)
from projects.serve.model import MAX_SEQ_LEN, Embedder, EmbedderProcess, WorkerDied, env_offline
from projects.serve.schemas import EmbeddingsRequest, SearchRequest, check_text
from projects.serve.settings import Settings

log = logging.getLogger("serve")


# --------------------------------------------------------------------------------------------------------
# the app
@dataclass
class State:
    settings: Settings
    metrics: Metrics
    embedder: Embedder | None = None
    index: object | None = None           # projects.serve.index.SearchIndex
    engine: object | None = None          # projects.serve.engine.GenerationEngine
    cache: EmbeddingCache | None = None
    embed_batcher: Batcher | None = None
    search_batcher: Batcher | None = None
    limiter: RateLimiter | None = None
    ready: bool = False
    not_ready_reason: str = "starting"
    started: int = 0                      # unix time the app was created (/v1/models' `created`)


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
    from common.device import fast_dtype, get_device
    from projects.infer.weights import load
    from projects.serve.engine import GenerationEngine
    from projects.infer import blockquant, quantize
    from projects.infer.gemv import use_gemv
    device = get_device(s.device)
    dtype_name = fast_dtype(device) if s.gen_dtype == "auto" else s.gen_dtype
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    # quantized from fp32 masters (a bf16 copy would move the weights off a GGUF's grid), then cast
    model, tok = load(s.gen_model, device, torch.float32 if s.gen_quant else dtype)
    schemes = {"int8": quantize.quantize_int8, "int4": quantize.quantize_int4, "q4_1": blockquant.quantize_q4_1,
               "q8_0": blockquant.quantize_q8_0}
    if s.gen_quant:
        model = schemes[s.gen_quant](model).to(dtype)
    use_gemv(model)  # the decode steps' float linears on the GEMV kernel (bf16 on AVX-512 CPUs; else unchanged)
    version = f"{s.gen_model}/{s.gen_quant or 'float'}/{dtype_name}"   # what the prefix cache's K/V depend on
    return GenerationEngine(model, tok, n_slots=s.gen_slots, max_queue=s.gen_max_queue,
                            max_wait_s=s.gen_max_wait_ms / 1000, max_seq_len=s.gen_ctx,
                            prefix_cache_bytes=s.gen_prefix_cache_mb << 20, version=version, model_id=s.gen_model)


# --------------------------------------------------------------------------------------------------------
# routes: each reads the app's State from request.app.state.serve
router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request):
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    st: State = request.app.state.serve
    body = {"ready": st.ready, "reason": st.not_ready_reason or None,
            "embedding_model": st.embedder.version if st.embedder else None,
            "index": {"count": st.index.ntotal, "type": st.index.manifest.get("index_type")} if st.index else None,
            "generation": bool(st.engine)}
    return JSONResponse(body, 200 if st.ready else 503)


@router.get("/metrics")
async def metrics(request: Request):
    st: State = request.app.state.serve
    return Response(generate_latest(st.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    st = ready_state(request)
    return {"object": "list", "data": _models(st)}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    st = ready_state(request)
    for m in _models(st):
        if m["id"] == model_id:
            return m
    raise ModelNotFound(f"model {model_id!r} is not served here")


def _models(st: State) -> list[dict]:
    out = [{"id": st.embedder.name, "object": "model", "created": st.started, "owned_by": "mlsys",
            "kind": "embedding", "dimensions": st.embedder.dim}]
    if st.engine is not None:
        out.append({"id": st.engine.model_id, "object": "model", "created": st.started, "owned_by": "mlsys",
                    "kind": "generation", "context_length": st.engine.ctx, "version": st.engine.version})
    return out


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingsRequest, request: Request):
    st = ready_state(request)
    s = st.settings
    if body.model is not None and body.model != st.embedder.name:
        raise ModelNotFound(f"model {body.model!r} is not served here; GET /v1/models lists {st.embedder.name!r}")
    if body.dimensions is not None and body.dimensions != st.embedder.dim:
        raise BadInput(f"dimensions={body.dimensions}: this model's embeddings have {st.embedder.dim} "
                       "(it is not trained for truncation)")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise BadInput("input must hold at least one text")
    if len(texts) > s.max_texts:
        raise TooLarge(f"{len(texts)} texts in one request; the limit is {s.max_texts}")
    for i, t in enumerate(texts):
        check_text(t, f"input[{i}]", s.max_chars)
    vecs, n_tokens = await unless_disconnected(request, _embed(st, texts, request.scope["state"]["timing"]))
    data = []
    for i, v in enumerate(vecs):
        v = np.ascontiguousarray(v, "<f4")
        emb = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    # a Response object skips FastAPI's jsonable_encoder, which walks every float of every vector in
    # Python: under load it was the largest item of the event loop (py-spy)
    return VectorJSON({"object": "list", "data": data, "model": st.embedder.name,
                       "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})


@router.post("/v1/search")
async def search(body: SearchRequest, request: Request):
    st = ready_state(request)
    s = st.settings
    if st.index is None:
        raise NotConfigured("search is not configured on this server (no index: SERVE_INDEX_DIR)")
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
        check_text(body.query, "query", s.max_chars)
        (q,), _ = await unless_disconnected(request, _embed(st, [body.query], timing))
    t2 = Timing()
    scores, ids = await unless_disconnected(
        request, st.search_batcher.submit((q, body.top_k), timeout_s=s.request_timeout_s, timing=t2))
    timing.queue_s += t2.queue_s
    timing.inference_s += t2.inference_s
    data = [{"id": int(i), "score": float(sc), "text": st.index.texts[i], "source": st.index.sources[i]}
            for sc, i in zip(scores, ids) if i >= 0]
    return JSONResponse({"object": "list", "data": data, "model": st.embedder.name,
                         "index": {"type": st.index.manifest.get("index_type"), "count": st.index.ntotal}})


def release_freed_memory() -> None:
    """Hand memory freed on the heap back to the OS (glibc's malloc_trim). Tensors of a few MiB come from the
    heap once glibc's mmap threshold has risen past them, and a freed heap chunk stays in the process (and in
    its container's memory count) until trimmed: after start-up that is the fp32 weights the generator was
    quantized from, and warm-up's activations. No-op off glibc."""
    import ctypes
    import ctypes.util
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):   # no libc found, or not glibc
        pass


def create_app(settings: Settings | None = None, *, embedder: Embedder | None = None, index=None,
               engine=None) -> FastAPI:
    """The app. Components passed in are used as they are (tests share one loaded model); the others are
    loaded from the settings at startup."""
    if settings is None:  # `uvicorn --factory`: the replica's environment
        try:
            settings = Settings.from_env()
        except ValueError as e:  # a bad SERVE_* variable: say which, without a stack trace
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None
    s = settings
    st = State(s, Metrics(), embedder, index, engine, started=int(time.time()))
    keys = KeyStore(s.api_keys, s.api_keys_file) if (s.api_keys or s.api_keys_file) else None
    st.limiter = RateLimiter(s.rate_limit_rpm, s.rate_limit_tpm) if keys is not None else None
    log.info("auth: %s", f"on ({len(keys)} API keys)" if keys is not None else "off (no API keys configured)")
    preloaded = embedder is not None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        if not preloaded:
            st.embedder, st.index, st.engine = await loop.run_in_executor(None, load_components, s)
            release_freed_memory()   # the fp32 masters the generator was quantized from
        if st.index is not None and st.index.dim != st.embedder.dim:
            raise ValueError(f"index dim {st.index.dim} != embedding dim {st.embedder.dim}")
        # keyed by weights AND dtype: bf16 vectors (cosine ~0.998 to fp32) must not answer fp32 replicas
        # through a shared Redis
        st.cache = EmbeddingCache(f"{st.embedder.version}/{st.embedder.dtype_name}", max_entries=s.cache_entries, max_bytes=s.cache_bytes,
                                  redis_url=s.redis_url or None, dim=st.embedder.dim)
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
            e = st.engine
            log.info("generation: %s, %d slots x %d positions; KV cache + prefix cache %.0f MiB", e.model_id,
                     e.n_slots, e.ctx, e.kv_bytes / 2 ** 20)
        for name, obj in (("embed", st.embed_batcher), ("search", st.search_batcher), ("generate", st.engine)):
            if obj is not None:
                st.metrics.queue_depth.labels(name).set_function(lambda o=obj: o.depth)
        if s.warmup:
            await _warmup(st)
            release_freed_memory()   # warm-up's full-batch activations
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

    pages = {} if s.api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="mlsys serve", version="0.1.0", lifespan=lifespan, **pages,
                  description="Embeddings, FAISS search and streamed generation with dynamic batching.")
    app.state.serve = st

    for exc_type in (RequestValidationError, BadInput, TooLarge, Overloaded, DeadlineExceeded, Unavailable,
                     ModelNotFound, NotConfigured, ContextLengthExceeded, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, lambda request, exc: _count_reject(st, exc) or error_response(exc, s))

    app.include_router(router)
    app.include_router(completions.router)
    app.add_middleware(ServeMiddleware, settings=s, metrics=st.metrics, keys=keys, limiter=st.limiter)
    return app


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
    if st.engine is not None:   # every row at once: decode steps of every batch size up to gen_slots
        from projects.serve.engine import GenRequest
        ids = st.engine.tokenizer("Once upon a time")["input_ids"]
        n = min(st.engine.n_slots, st.engine.max_queue)
        reqs = [st.engine.submit(GenRequest(ids, 4)) for _ in range(n)]
        for req in reqs:
            while await completions.next_token(req, None) is not None:
                pass


def _count_reject(st: State, exc: Exception) -> None:
    if isinstance(exc, Overloaded):
        st.metrics.rejected.labels("queue_full").inc()
    elif isinstance(exc, DeadlineExceeded):
        st.metrics.rejected.labels("deadline").inc()


@dataclass
class Listen:
    host: str = "127.0.0.1"
    """address to listen on"""
    port: int = 8000
    """port to listen on"""


def main(argv: list[str] | None = None) -> int:
    """Check the settings, models and index (one-line error on failure), then serve with uvicorn."""
    from common import config
    args = config.parse(Listen, argv, prog="python -m projects.serve.app",
                        description="Serve projects.serve.app with uvicorn (settings: SERVE_* variables).")
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


if __name__ == "__main__":
    sys.exit(main())
