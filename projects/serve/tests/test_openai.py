"""The OpenAI-compatible surface: the official client works unchanged, every parameter either does what it
says or is refused with 422 naming it, and API keys guard /v1/* (stories260K and MiniLM: seconds)."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging

import pytest

from projects.serve.app import create_app
from projects.serve.tests.conftest import running, settings

# a ChatML-style template for stories260K (a base model without one; SmolLM2-Instruct ships its own)
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture()
def engine(gen_parts):
    from projects.serve.engine import GenerationEngine
    model, tok = gen_parts
    tok.chat_template = CHAT_TEMPLATE
    return GenerationEngine(model, tok, n_slots=3, prefix_cache_bytes=1 << 20, model_id="stories260k")


def _sse(text: str) -> list[dict]:
    lines = [ln[6:] for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_openai_client_works_unchanged(embedder, engine):
    openai = pytest.importorskip("openai", reason="the openai client (a test dependency) is not installed")
    import httpx

    async def main():
        app = create_app(settings(), embedder=embedder, engine=engine)
        async with running(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve/v1")
            client = openai.AsyncOpenAI(api_key="unused", base_url="http://serve/v1", http_client=http)
            models = [m.id for m in (await client.models.list()).data]
            msgs = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A dog"}]
            chat = await client.chat.completions.create(model="stories260k", messages=msgs, max_tokens=24,
                                                        temperature=0)
            pieces, finish, usage = [], None, None
            async for ch in await client.chat.completions.create(
                    model="stories260k", messages=msgs, max_completion_tokens=24, temperature=0, stream=True,
                    stream_options={"include_usage": True}):
                if ch.choices:
                    pieces.append(ch.choices[0].delta.content or "")
                    finish = ch.choices[0].finish_reason or finish
                usage = ch.usage or usage
            comp = await client.completions.create(model="stories260k", prompt="Once upon a time", max_tokens=40,
                                                   temperature=0, stop=["."])
            emb = await client.embeddings.create(model=embedder.name, input=["a cat", "a dog"])
            await http.aclose()
        return models, chat, "".join(pieces), finish, usage, comp, emb
    models, chat, streamed, finish, usage, comp, emb = asyncio.run(main())
    assert models == [embedder.name, "stories260k"]
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert streamed == chat.choices[0].message.content          # greedy: streamed == not streamed
    assert finish == chat.choices[0].finish_reason
    assert usage.completion_tokens == chat.usage.completion_tokens
    text = comp.choices[0].text
    assert comp.choices[0].finish_reason == "stop" and "." not in text and text
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == embedder.dim


def test_stop_strings_match_text_across_tokens(gen_parts):
    """The stop string may end inside a token or span several; the text ends right before it."""
    from projects.serve.engine import Token
    from projects.serve.textstream import TextStream
    _, tok = gen_parts
    ids = tok("Once upon a time, there was a little girl named Lily.", add_special_tokens=False)["input_ids"]
    full = tok.decode(ids)
    for stop in (",", "little g", "e was", "Lily.", "zzz"):
        ts = TextStream(tok, [stop])
        text = "".join(ts.push(Token(i)).text for i in ids if not ts.stopped) + ts.finish().text
        want = full[:full.index(stop)] if stop in full else full
        assert text == want and ts.stopped == (stop in full), stop
    ts = TextStream(tok, ["named Lily?"])          # a prefix of the stop string is held back, then released
    parts = [ts.push(Token(i)).text for i in ids]
    assert not "".join(parts[:-1]).endswith("named Lily") and "".join(parts) == full
    assert not ts.stopped and ts.finish().text == ""


def test_parameters_work_or_are_refused(embedder, engine, gen_parts):
    import torch
    model, tok = gen_parts

    async def main():
        app = create_app(settings(max_tokens=64), embedder=embedder, engine=engine)
        out = {}
        async with running(app) as c:
            base = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
            out["lp"] = await c.post("/v1/completions", json={**base, "logprobs": 3})
            out["lp_stream"] = await c.post("/v1/completions", json={**base, "logprobs": 3, "stream": True})
            out["chat_lp"] = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 5,
                "temperature": 0, "logprobs": True, "top_logprobs": 2})
            out["seed"] = [await c.post("/v1/completions", json={**base, "temperature": 1.0, "seed": 7})
                           for _ in range(2)]
            out["max_completion"] = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3, "temperature": 0})
            out["neutral"] = await c.post("/v1/completions", json={**base, "n": 1, "presence_penalty": 0,
                                                                   "frequency_penalty": 0.0, "logit_bias": {}})
            bad = {
                "unknown": ("/v1/completions", {**base, "best_of_n": 2}, 422, "best_of_n"),
                "n": ("/v1/completions", {**base, "n": 2}, 422, "n=2"),
                "penalty": ("/v1/completions", {**base, "presence_penalty": 0.5}, 422, "presence_penalty"),
                "bias": ("/v1/completions", {**base, "logit_bias": {"5": 1}}, 422, "logit_bias"),
                "echo": ("/v1/completions", {**base, "echo": True}, 422, "echo"),
                "stops": ("/v1/completions", {**base, "stop": list("abcde")}, 422, "at most 4"),
                "tools": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []},
                          422, "tools"),
                "image": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 422, "type"),
                "role": ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 422, "role"),
                "top_lp": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                    "top_logprobs": 2}, 422, "needs logprobs"),
                "both_max": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                      "max_tokens": 3, "max_completion_tokens": 4}, 422, "not both"),
                "model": ("/v1/completions", {**base, "model": "gpt-4o"}, 404, "model_not_found"),
                "context": ("/v1/completions", {**base, "prompt": "Once upon a time " * 120, "max_tokens": 60}, 400,
                            "context_length_exceeded"),
                "dims": ("/v1/embeddings", {"input": "x", "dimensions": 16}, 422, "dimensions"),
                "emb_extra": ("/v1/embeddings", {"input": "x", "truncate": True}, 422, "truncate"),
            }
            out["bad"] = {k: (await c.post(path, json=body), status, word) for k, (path, body, status, word) in bad.items()}
        return out
    out = asyncio.run(main())

    lp = out["lp"].json()["choices"][0]["logprobs"]
    ids = tok("Once upon a time")["input_ids"]
    model.remove_caches()   # the engine's caches are set up again by the next engine
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0, -1].log_softmax(-1)         # the first new token's distribution
    top = ref.topk(3)
    assert lp["token_logprobs"][0] == pytest.approx(top.values[0].item(), abs=1e-4)   # greedy: the top-1
    assert list(lp["top_logprobs"][0].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 12
    assert "".join(lp["tokens"]) == out["lp"].json()["choices"][0]["text"]
    streamed = [ch["choices"][0]["logprobs"] for ch in _sse(out["lp_stream"].text)]
    assert sum((s["token_logprobs"] for s in streamed if s), []) == pytest.approx(lp["token_logprobs"])
    chat = out["chat_lp"].json()["choices"][0]["logprobs"]["content"]
    assert len(chat) == 5 and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in chat)
    a, b = (r.json()["choices"][0]["text"] for r in out["seed"])
    assert a == b
    assert out["max_completion"].json()["usage"]["completion_tokens"] == 3
    assert out["neutral"].status_code == 200
    for k, (r, status, word) in out["bad"].items():
        assert r.status_code == status and word in r.text, (k, r.status_code, r.text)


def test_api_keys_guard_v1_routes(tmp_path, embedder, engine, caplog):
    """Missing, malformed, wrong and revoked keys get 401 (never an answer); health, readiness and metrics stay
    open; a key over its rate limit gets 429 + Retry-After; no key appears in the logs."""
    import time
    caplog.set_level(logging.DEBUG)
    env_key, file_key, revoked = "sk-env-" + "a" * 30, "sk-file-" + "b" * 30, "sk-old-" + "c" * 30
    keys = tmp_path / "keys.txt"
    line = lambda k, n: f"sha256:{hashlib.sha256(k.encode()).hexdigest()} {n}\n"   # noqa: E731
    keys.write_text(line(file_key, "alice") + line(revoked, "bob"))

    async def main():
        app = create_app(settings(api_keys=env_key, api_keys_file=str(keys), rate_limit_rpm=3), embedder=embedder,
                         engine=engine)
        got = {}
        async with running(app) as c:
            body = {"input": "a cat"}
            for name, hdr in {"none": None, "empty": "", "scheme": f"Basic {env_key}", "bare": env_key,
                              "wrong": "Bearer sk-wrong", "case": f"Bearer {env_key.upper()}",
                              "huge": "Bearer " + "x" * 10_000, "latin": b"Bearer caf\xe9"}.items():
                h = {} if hdr is None else {"Authorization": hdr}
                got[name] = [await c.post("/v1/embeddings", json=body, headers=h),
                             await c.get("/v1/models", headers=h),
                             await c.post("/v1/completions", content=b"{not json", headers=h)]
            got["env"] = await c.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {env_key}"})
            got["file"] = await c.get("/v1/models", headers={"Authorization": f"bearer {file_key}"})
            got["old"] = await c.get("/v1/models", headers={"Authorization": f"Bearer {revoked}"})
            keys.write_text(line(file_key, "alice"))                   # revoke bob's key: no restart
            time.sleep(1.1)
            got["revoked"] = await c.get("/v1/models", headers={"Authorization": f"Bearer {revoked}"})
            got["open"] = [await c.get(p) for p in ("/healthz", "/readyz", "/metrics")]
            got["pages"] = [await c.get(p) for p in ("/docs", "/openapi.json")]   # off unless SERVE_API_DOCS
            got["limited"] = [await c.get("/v1/models", headers={"Authorization": f"Bearer {env_key}"})
                              for _ in range(3)]
        return got
    got = asyncio.run(main())
    for name in ("none", "empty", "scheme", "bare", "wrong", "case", "huge", "latin"):
        for r in got[name]:
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (name, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert got["env"].status_code == 200 and got["file"].status_code == 200 and got["old"].status_code == 200
    assert got["revoked"].status_code == 401
    assert [r.status_code for r in got["open"]] == [200, 200, 200]
    assert [r.status_code for r in got["pages"]] == [404, 404]
    codes = [r.status_code for r in got["limited"]]
    assert codes == [200, 200, 429], codes                    # 3 a minute: the key's 4th request waits
    assert int(got["limited"][-1].headers["retry-after"]) >= 1
    for k in (env_key, file_key, revoked):
        assert k not in caplog.text


def test_key_file_errors_stop_the_replica(tmp_path):
    from projects.serve.auth import KeyStore, RateLimiter
    bad = tmp_path / "keys.txt"
    bad.write_text("sk-plaintext-key\n")
    with pytest.raises(ValueError, match="keys.txt:1"):
        KeyStore(path=str(bad))
    with pytest.raises(ValueError, match="No such file"):
        KeyStore(path=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="per API key"):
        settings(rate_limit_rpm=10)
    lim = RateLimiter(tpm=100)                              # tokens: charged after, the next request waits
    assert lim.admit("k", now=0.0) == 0
    lim.charge("k", 160, now=0.0)
    # level -60 + 100/60 a second: back above 0 after 36 s
    assert lim.admit("k", now=1.0) == pytest.approx((1 + 60 - 100 / 60) * 60 / 100)
    assert lim.admit("k", now=40.0) == 0
