"""What wraps every request of a serving replica: the errors and the one mapping from error to status, the
Prometheus metrics, the ASGI middleware (timing headers, metrics, the body size limit and deadline), and the watch
for a client that disconnects while its request waits.

Errors map to statuses in `error_response` alone: 422 malformed or invalid input, 400 a prompt longer than
the context (OpenAI's context_length_exceeded), 404 an unknown model, 413 over a size limit, 408 a body not
received within Settings.body_timeout_s (a trickling client; the connection is closed), 503 (or 429,
Settings.overload_status) + Retry-After when a queue is full or a request waited past its deadline, 503 when
not ready, 404 for a route this deployment does not serve; 401 (no valid API key) and 429 (a key over its rate limit) come from the middleware before the
body is read. A 500 means a bug, never bad input.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from projects.serve.batcher import DeadlineExceeded, Overloaded, Timing
from projects.serve.settings import Settings

log = logging.getLogger("serve")


# --------------------------------------------------------------------------------------------------------
# errors: one mapping from error type to status
class TooLarge(Exception):
    """A request over a size limit: 413."""


class BadInput(Exception):
    """Well-formed JSON with an invalid value our schema cannot express: 422."""


class Unavailable(Exception):
    """Not ready (starting, draining): 503. nginx retries it on another replica and counts it against the
    replica's health, so it must mean exactly that."""


class NotConfigured(Exception):
    """A route this deployment does not serve (no index, no generator): 404, not 503, because a healthy
    replica answering 503 would be marked failed by nginx and ejected."""


class ModelNotFound(Exception):
    """A `model` this replica does not serve: 404 (code model_not_found)."""


def ready_state(request: Request):
    """The app's State (app.State), once it is ready to serve (503 before)."""
    st = request.app.state.serve
    if not st.ready:
        raise Unavailable(f"not ready: {st.not_ready_reason}")
    return st


class VectorJSON(JSONResponse):
    """JSON by orjson, numpy arrays written directly: each float32 in its shortest exact form. The stdlib
    encoder (after .tolist()) was the largest item of a replica's event loop at capacity (py-spy), and wrote
    17 digits where float32 needs at most 9."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _err(status: int, message: str, kind: str, headers: dict | None = None, code: str | int | None = None,
         param: str | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": status if code is None else code}}, status, headers=headers)


def error_response(exc: Exception, settings: Settings) -> JSONResponse:
    from projects.serve.engine import ContextLengthExceeded
    if isinstance(exc, ContextLengthExceeded):
        return _err(400, str(exc), "invalid_request_error", code="context_length_exceeded", param="messages")
    if isinstance(exc, NotConfigured):
        return _err(404, str(exc), "invalid_request_error", code="not_configured")
    if isinstance(exc, ModelNotFound):
        return _err(404, str(exc), "invalid_request_error", code="model_not_found", param="model")
    if isinstance(exc, RequestValidationError):
        parts = []
        for e in exc.errors()[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            msg = "unsupported parameter" if e.get("type") == "extra_forbidden" else e.get("msg", "invalid")
            parts.append(f"{loc}: {msg}")
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
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 408:
        return _err(408, str(exc.detail), "request_timeout", exc.headers)
    if isinstance(exc, StarletteHTTPException):
        return _err(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))
    log.exception("internal error", exc_info=exc)
    return _err(500, f"internal error: {type(exc).__name__}", "internal_error")


# --------------------------------------------------------------------------------------------------------
# metrics (one registry per app, so tests can build many apps)
ROUTES = ("/v1/embeddings", "/v1/search", "/v1/completions", "/v1/chat/completions", "/v1/models", "/healthz",
          "/readyz", "/metrics")
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
# middleware: timing headers, metrics, body size limit (plain ASGI, so streaming is not buffered)
class ServeMiddleware:
    def __init__(self, app, settings: Settings, metrics: Metrics, keys=None, limiter=None):
        self.app = app
        self.settings, self.metrics = settings, metrics
        self.keys, self.limiter = keys, limiter     # auth.KeyStore / auth.RateLimiter, or None (open)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        timing = Timing()
        scope.setdefault("state", {})["timing"] = timing
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = [500]
        if self.keys is not None and scope["path"].startswith("/v1/"):
            resp = self._authorize(scope)
            if resp is not None:
                status[0] = resp.status_code
                await self._send_timed(resp, scope, receive, send, t0, timing)
                self._observe(route, resp.status_code, t0)
                return
        limit = self.settings.max_body_bytes
        clen = dict(scope.get("headers") or []).get(b"content-length")
        if clen is not None and clen.isdigit() and int(clen) > limit:
            resp = _err(413, f"request body of {int(clen)} bytes; the limit is {limit}", "request_too_large")
            status[0] = 413
            await self._send_timed(resp, scope, receive, send, t0, timing)
            self._observe(route, 413, t0)
            return
        seen = [0]
        body_s = self.settings.body_timeout_s
        loop = asyncio.get_running_loop()
        body_end = [loop.time() + body_s if body_s > 0 else None]   # None once the body is in

        async def receive_limited():
            # until the body is complete each read waits only for what is left of body_timeout_s; after it,
            # receive is left alone (unless_disconnected waits on it for the whole request)
            if body_end[0] is None:
                msg = await receive()
            else:
                try:
                    async with asyncio.timeout_at(body_end[0]):   # a timer on this task (wait_for adds a task)
                        msg = await receive()
                except TimeoutError:   # an HTTPException: FastAPI turns anything else raised here into a 400
                    raise StarletteHTTPException(408, f"request body not received within {body_s:g} s",
                                                 {"Connection": "close"}) from None
            if msg["type"] == "http.request":
                seen[0] += len(msg.get("body", b""))
                if seen[0] > limit:
                    raise StarletteHTTPException(413, f"request body over {limit} bytes")
                if not msg.get("more_body", False):
                    body_end[0] = None
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

    def _authorize(self, scope) -> JSONResponse | None:
        """None when the request carries a valid key within its rate limit, else the 401/429 to send."""
        from projects.serve.auth import retry_after
        auth = dict(scope.get("headers") or []).get(b"authorization")
        name = self.keys.check(auth)
        if name is None:
            self.metrics.rejected.labels("unauthorized").inc()
            why = "no API key given" if not auth else "invalid API key"
            return _err(401, f"{why}: send `Authorization: Bearer <key>`", "invalid_request_error",
                        {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
        scope["state"]["api_key"] = name
        wait = self.limiter.admit(name) if self.limiter is not None else 0.0
        if wait > 0:
            self.metrics.rejected.labels("rate_limit").inc()
            return _err(429, f"rate limit of API key {name} reached; retry in {retry_after(wait)} s",
                        "rate_limit_error", {"Retry-After": retry_after(wait)}, code="rate_limit_exceeded")
        return None

    async def _send_timed(self, resp, scope, receive, send, t0, timing):
        async def send_timed(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": list(msg.get("headers", [])) + _timing_headers(timing, t0)}
            await send(msg)
        await resp(scope, receive, send_timed)

    def _observe(self, route: str, status: int, t0: float) -> None:
        m = self.metrics
        m.requests.labels(route, str(status)).inc()
        m.latency.labels(route, str(status)).observe(time.perf_counter() - t0)


def _timing_headers(timing: Timing, t0: float) -> list[tuple[bytes, bytes]]:
    total = time.perf_counter() - t0
    return [(b"x-queue-time", f"{timing.queue_s * 1e3:.3f}".encode()),
            (b"x-inference-time", f"{timing.inference_s * 1e3:.3f}".encode()),
            (b"x-total-time", f"{total * 1e3:.3f}".encode())]


async def unless_disconnected(request: Request, aw):
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
