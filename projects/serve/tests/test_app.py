"""The app in-process (httpx ASGI transport, lifespan run): real MiniLM, a small index, stories260K."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from projects.serve.app import create_app
from projects.serve.tests.conftest import SENTENCES, running, settings


def cos(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_embeddings_equal_model_output_batched_or_alone(embedder):
    texts = SENTENCES[:12]
    direct = embedder.encode(texts)

    async def main():
        app = create_app(settings(max_wait_ms=20, cache_entries=0), embedder=embedder)
        async with running(app) as c:
            alone = [(await c.post("/v1/embeddings", json={"input": t})) for t in texts[:3]]
            together = await asyncio.gather(*(c.post("/v1/embeddings", json={"input": t}) for t in texts))
            many = await c.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64"})
            batches = app.state.serve.embed_batcher.batches
        return alone, together, many, batches
    alone, together, many, batches = asyncio.run(main())
    for i, r in enumerate(alone):
        assert r.status_code == 200
        assert cos(r.json()["data"][0]["embedding"], direct[i]) >= 0.9999
        for h in ("x-queue-time", "x-inference-time", "x-total-time"):
            assert float(r.headers[h]) >= 0
    for i, r in enumerate(together):
        assert cos(r.json()["data"][0]["embedding"], direct[i]) >= 0.9999
    body = many.json()
    assert body["object"] == "list" and body["usage"]["prompt_tokens"] > len(texts)
    import base64
    for i, d in enumerate(body["data"]):
        assert d["index"] == i
        assert cos(np.frombuffer(base64.b64decode(d["embedding"]), "<f4"), direct[i]) >= 0.9999
    assert batches < 3 + 12 + 1   # the 12 concurrent ones shared batches


@pytest.mark.slow
def test_200_concurrent_requests_get_their_own_answers(embedder):
    texts = [f"request number {i}: {SENTENCES[i % len(SENTENCES)]}" for i in range(200)]
    direct = embedder.encode(texts)

    async def main():
        app = create_app(settings(max_batch_size=32, max_wait_ms=10), embedder=embedder)
        async with running(app) as c:
            rs = await asyncio.gather(*(c.post("/v1/embeddings", json={"input": t}) for t in texts))
            sizes = app.state.serve.embed_batcher.batches
        return rs, sizes
    rs, n_batches = asyncio.run(main())
    got = np.array([r.json()["data"][0]["embedding"] for r in rs], np.float32)
    sims = got @ direct.T                                     # (200, 200): each best matches its own text
    assert (sims.argmax(1) == np.arange(200)).all() and np.diag(sims).min() >= 0.9999
    assert n_batches < 200 / 4


def test_cache_hits_and_metrics(embedder):
    async def main():
        app = create_app(settings(), embedder=embedder)
        async with running(app) as c:
            a = (await c.post("/v1/embeddings", json={"input": ["cached text", "other"]})).json()
            b = (await c.post("/v1/embeddings", json={"input": "cached text"})).json()
            m = (await c.get("/metrics")).text
            ready = await c.get("/readyz")
            health = await c.get("/healthz")
        return a, b, m, ready, health
    a, b, m, ready, health = asyncio.run(main())
    assert a["data"][0]["embedding"] == b["data"][0]["embedding"]
    # usage is exact whether a text was computed (counted by the batch's tokenization) or a cache hit
    n = lambda s: len(embedder.tokenizer(s)["input_ids"])  # noqa: E731
    assert a["usage"]["prompt_tokens"] == n("cached text") + n("other")
    assert b["usage"]["prompt_tokens"] == n("cached text")
    assert 'serve_cache_hits_total{layer="lru"} 1.0' in m and "serve_cache_misses_total 2.0" in m
    assert 'serve_requests_total{route="/v1/embeddings",status="200"} 2.0' in m
    for name in ("serve_request_duration_seconds_bucket", "serve_batch_size_bucket", 'serve_queue_depth{queue="embed"}'):
        assert name in m
    assert ready.status_code == 200 and ready.json()["ready"] and health.json() == {"status": "ok"}


def test_search_returns_exact_top_k(embedder, small_index):
    xb = small_index.vectors()

    async def main():
        app = create_app(settings(), embedder=embedder, index=small_index)
        async with running(app) as c:
            by_text = await c.post("/v1/search", json={"query": "a pet cat", "top_k": 5})
            q = embedder.encode(["the moon"])[0]
            by_vec = await c.post("/v1/search", json={"vector": (q * 3).tolist(), "top_k": 7})
            too_many = await c.post("/v1/search", json={"query": "x", "top_k": 1000})
            both = await c.post("/v1/search", json={"query": "x", "vector": [0.0] * 384})
            wrong_dim = await c.post("/v1/search", json={"vector": [1.0, 2.0]})
            zero = await c.post("/v1/search", json={"vector": [0.0] * 384})
        return by_text, q, by_vec, too_many, both, wrong_dim, zero
    by_text, q, by_vec, too_many, both, wrong_dim, zero = asyncio.run(main())
    for r, qv, k in ((by_text, embedder.encode(["a pet cat"])[0], 5), (by_vec, q, 7)):
        assert r.status_code == 200
        data = r.json()["data"]
        sims = xb @ qv
        ref = np.argsort(-sims)[:k]
        assert [d["id"] for d in data] == ref.tolist()
        np.testing.assert_allclose([d["score"] for d in data], sims[ref], atol=1e-4)
        assert data[0]["text"] == SENTENCES[ref[0]]
    assert by_text.json()["data"][0]["text"] == "a small domesticated feline kept as a pet"
    assert too_many.status_code == 413 and both.status_code == 422
    assert wrong_dim.status_code == 422 and zero.status_code == 422


async def _chunks(data: bytes, n: int = 4096):
    for i in range(0, len(data), n):
        yield data[i:i + n]


def test_bad_input_statuses(embedder):
    async def main():
        app = create_app(settings(max_texts=4, max_chars=50, max_body_bytes=10_000), embedder=embedder)
        async with running(app) as c:
            out = {
                "malformed": await c.post("/v1/embeddings", content=b"{not json",
                                          headers={"content-type": "application/json"}),
                "type": await c.post("/v1/embeddings", json={"input": 5}),
                "missing": await c.post("/v1/embeddings", json={}),
                "empty": await c.post("/v1/embeddings", json={"input": []}),
                "too_many": await c.post("/v1/embeddings", json={"input": ["a"] * 5}),
                "too_long": await c.post("/v1/embeddings", json={"input": "x" * 51}),
                "body": await c.post("/v1/embeddings", json={"input": ["y" * 20_000]}),
                # chunked, no Content-Length: the limit is enforced while the body streams in
                "chunked": await c.post("/v1/embeddings", content=_chunks(b'{"input": ["' + b"z" * 20_000 + b'"]}'),
                                        headers={"content-type": "application/json"}),
                "surrogate": await c.post("/v1/embeddings", content=b'{"input": "\\ud800"}',
                                          headers={"content-type": "application/json"}),
                "no_search": await c.post("/v1/search", json={"query": "x"}),
                "no_gen": await c.post("/v1/completions", json={"prompt": "x"}),
                "unknown": await c.get("/nope"),
            }
        return out
    out = asyncio.run(main())
    want = {"malformed": 422, "type": 422, "missing": 422, "empty": 422, "too_many": 413, "too_long": 413,
            "body": 413, "chunked": 413, "surrogate": 422, "no_search": 404, "no_gen": 404, "unknown": 404}
    assert {k: r.status_code for k, r in out.items()} == want
    for k, r in out.items():
        assert r.json()["error"]["message"], k
        assert "x-total-time" in r.headers


def test_a_trickled_body_is_cut_at_body_timeout_s_and_a_slow_one_within_it_is_served(embedder):
    """A byte every 0.2 s is never a stalled read (what uvicorn and nginx time out), so only a deadline on
    the whole body cuts it: 408 in the app's error shape, `Connection: close`, about body_timeout_s after the
    headers. A body sent in pieces that all arrive within the deadline is served, and so is the next request."""
    import time

    async def trickle():
        yield b'{"input": "'
        while True:                    # never finishes: only the deadline ends it
            await asyncio.sleep(0.2)
            yield b"a"

    async def in_pieces():
        for piece in (b'{"input": ', b'"slow but in time"', b"}"):
            yield piece
            await asyncio.sleep(0.3)

    async def main():
        app = create_app(settings(body_timeout_s=1.5), embedder=embedder)
        async with running(app) as c:
            hdr = {"content-type": "application/json"}
            t0 = time.perf_counter()
            cut = await c.post("/v1/embeddings", content=trickle(), headers=hdr)
            cut_s = time.perf_counter() - t0
            slow = await c.post("/v1/embeddings", content=in_pieces(), headers=hdr)
            after = await c.post("/v1/embeddings", json={"input": "next"})
        return cut, cut_s, slow, after
    cut, cut_s, slow, after = asyncio.run(main())
    assert cut.status_code == 408 and cut.json()["error"]["type"] == "request_timeout", cut.text
    assert cut.headers["connection"] == "close"
    assert 1.5 <= cut_s < 3.0, cut_s
    assert slow.status_code == 200 and after.status_code == 200


def test_full_queue_answers_503_with_retry_after(embedder):
    import threading
    gate = threading.Event()

    class Slow:
        def __getattr__(self, name):
            return getattr(embedder, name)

        def encode_batch(self, texts):   # the batcher's function
            gate.wait(10)
            return embedder.encode_batch(texts)

    async def main():
        app = create_app(settings(max_queue=2, max_texts=2, max_batch_size=1, max_wait_ms=0), embedder=Slow())
        async with running(app) as c:
            first = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": "one"}))
            await asyncio.sleep(0.1)          # in the worker, blocked
            queued = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": ["two", "three"]}))
            await asyncio.sleep(0.1)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            refused = await c.post("/v1/embeddings", json={"input": "four"})
            dt = loop.time() - t0
            gate.set()
            ok = await asyncio.gather(first, queued)
            m = (await c.get("/metrics")).text
        return refused, dt, ok, m
    refused, dt, ok, m = asyncio.run(main())
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1 and dt < 0.1
    assert [r.status_code for r in ok] == [200, 200]
    assert 'serve_rejected_total{reason="queue_full"} 1.0' in m


def test_manifest_mismatch_refuses_to_start(tmp_path, embedder, small_index):
    from projects.serve.app import load_components
    from projects.serve.index import IndexMismatch, save_index
    save_index(small_index, tmp_path / "idx")
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    m["embedding_weights_sha256"] = "f" * 64
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexMismatch, match="built with"):
        load_components(settings(index_dir=str(tmp_path / "idx")))


# ---------------------------------------------------------------- generation
def _stream_tokens(text: str) -> tuple[str, str | None]:
    pieces, finish = [], None
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            ch = json.loads(line[6:])["choices"][0]
            pieces.append(ch["text"])
            finish = ch["finish_reason"] or finish
    assert text.rstrip().endswith("data: [DONE]")
    return "".join(pieces), finish


@pytest.mark.slow
def test_streaming_equals_greedy_and_continuous_batching(embedder, gen_parts):
    import torch
    from projects.infer.generate import generate
    from projects.infer.weights import load
    from projects.serve.engine import GenerationEngine
    model, tok = gen_parts
    ref_model, _ = load("stories260k", "cpu", torch.float32)   # its own caches: the engine owns model's
    prompts = ["Once upon a time", "The little dog", "Lily and Ben went to", "One day, a bird"]
    refs = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        out = generate(ref_model, torch.tensor([ids]), 48, stop_ids=[tok.eos_token_id])[0, len(ids):].tolist()
        refs.append(tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=True))

    async def main():
        eng = GenerationEngine(model, tok, n_slots=3)
        app = create_app(settings(), embedder=embedder, engine=eng)
        async with running(app) as c:
            body = {"prompt": prompts[0], "max_tokens": 48, "temperature": 0}
            plain = await c.post("/v1/completions", json=body)
            stream = await c.post("/v1/completions", json={**body, "stream": True})
            # 4 greedy requests over 3 slots at once: rows join and leave the running batch
            conc = await asyncio.gather(*(c.post("/v1/completions", json={**body, "prompt": p}) for p in prompts))
            too_long = await c.post("/v1/completions", json={**body, "max_tokens": 10_000})
            bad = await c.post("/v1/completions", json={**body, "temperature": -1})
            sampled = [await c.post("/v1/completions", json={**body, "temperature": 0.9, "top_p": 0.9,
                                                               "top_k": 20, "seed": 3}) for _ in range(2)]
        return plain, stream, conc, too_long, bad, sampled, eng
    plain, stream, conc, too_long, bad, sampled, eng = asyncio.run(main())
    assert plain.status_code == 200 and stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    text, finish = _stream_tokens(stream.text)
    assert plain.json()["choices"][0]["text"] == refs[0] == text
    assert finish == plain.json()["choices"][0]["finish_reason"]
    assert [r.json()["choices"][0]["text"] for r in conc] == refs
    assert too_long.status_code == 413 and bad.status_code == 422
    assert sampled[0].json()["choices"][0]["text"] == sampled[1].json()["choices"][0]["text"]  # same seed
    assert eng.active == 0 and eng.depth == 0
    assert eng._decode_s > 0 and eng._prefill_tok_s > 0      # the step times admission estimates from


def test_quantized_generator_setting(gen_parts):
    """SERVE_GEN_QUANT puts projects.infer's int8/int4 linears under the engine; a bad value is refused."""
    from projects.infer.quantize import Int4Linear, Int8Linear
    from projects.serve.app import make_engine
    from projects.serve.settings import Settings
    with pytest.raises(ValueError, match="gen_quant"):
        Settings(gen_quant="int3")
    for scheme, cls in (("int8", Int8Linear), ("int4", Int4Linear)):
        eng = make_engine(settings(gen_model="stories260k", gen_quant=scheme, gen_slots=2))
        assert isinstance(eng.model.layers[0].feed_forward.w1, cls)
        assert eng.model.layers[0].attention.kv_cache.k_cache.dtype == eng.model.norm.weight.dtype


def test_app_starts_under_the_environment_the_kubelet_injects(monkeypatch, embedder):
    """A Service named `serve` gives every later pod SERVE_SERVICE_HOST, SERVE_PORT, SERVE_PORT_80_TCP_* ...
    (service links): the replica passes them over; an unknown SERVE_* name is still refused."""
    from projects.serve.settings import Settings
    kubelet = {"SERVE_SERVICE_HOST": "10.96.0.12", "SERVE_SERVICE_PORT": "80", "SERVE_SERVICE_PORT_HTTP": "80",
               "SERVE_PORT": "tcp://10.96.0.12:80", "SERVE_PORT_80_TCP": "tcp://10.96.0.12:80",
               "SERVE_PORT_80_TCP_PROTO": "tcp", "SERVE_PORT_80_TCP_PORT": "80", "SERVE_PORT_80_TCP_ADDR": "10.96.0.12"}
    for k, v in {**kubelet, "SERVE_MAX_QUEUE": "77"}.items():
        monkeypatch.setenv(k, v)
    assert Settings.from_env().max_queue == 77
    assert create_app(embedder=embedder) is not None
    monkeypatch.setenv("SERVE_PORTT", "1")  # a typo is not a service link
    with pytest.raises(SystemExit):
        create_app(embedder=embedder)
