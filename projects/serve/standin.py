"""A stand-in for the serving app: the same routes and response shapes, no models.

    uvicorn --factory projects.serve.standin:create_app          # as a replica (cluster --app ...)

Behind the real nginx and supervisor it runs the cluster tests in seconds (test_scale.py). The serving bench
measures with it what the HTTP path alone carries on the same cores (load generator, nginx, uvicorn, a
384-float JSON vector per answer): a ceiling of served throughput that no model work could raise.

An embeddings request waits `STANDIN_WORK_S` seconds (default 0.05; 0 answers at once) as if a batch were
computing; texts starting "slow" wait 0.2 s, and "fail" is answered 503 + Retry-After. The app's own
middleware wraps it (SERVE_* settings from the environment: its body size limit and body deadline, timing
headers, metrics), so what nginx meets at a replica's door is the real app's.
"""
from __future__ import annotations

import asyncio
import json
import os

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from projects.serve.middleware import Metrics, ServeMiddleware, VectorJSON
from projects.serve.settings import Settings

DIM = 384   # the served model's (all-MiniLM-L6-v2): a response as large as the real one


def create_app() -> FastAPI:
    app = FastAPI()
    work_s = float(os.environ.get("STANDIN_WORK_S", "0.05"))
    vec = np.random.default_rng(0).standard_normal(DIM).astype(np.float32)
    vec /= np.linalg.norm(vec)
    state = {"inflight": 0}

    async def work(seconds: float):
        state["inflight"] += 1
        try:
            if seconds > 0:
                await asyncio.sleep(seconds)
        finally:
            state["inflight"] -= 1

    @app.post("/v1/embeddings")
    async def embeddings(req: Request):
        body = await req.json()
        text = body["input"] if isinstance(body["input"], str) else body["input"][0]
        if text.startswith("fail"):
            return JSONResponse({"error": "overloaded"}, 503, headers={"Retry-After": "1"})
        await work(0.2 if text.startswith("slow") else work_s)
        return VectorJSON({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vec}],
                           "pid": os.getpid()})

    @app.post("/v1/search")
    async def search(req: Request):
        await req.json()
        await work(work_s)
        return {"results": [{"id": 0, "score": 1.0, "text": "x"}]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()

        async def events():
            for i in range(int(body.get("max_tokens", 5))):
                await work(0.02)
                yield f"data: {json.dumps({'choices': [{'text': f' t{i}'}]})}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(f"# TYPE serve_queue_depth gauge\nserve_queue_depth{{queue=\"embed\"}} "
                                 f"{state['inflight']}\n")
    app.add_middleware(ServeMiddleware, settings=Settings.from_env(), metrics=Metrics())
    return app
