"""The OpenAI text-generation routes over the continuous-batching engine: POST /v1/completions and
POST /v1/chat/completions, streamed (server-sent events) or not.

Both turn a request into prompt token ids (chat: the messages through the tokenizer's chat template), submit
one engine request, and turn its tokens into text with textstream.TextStream (stop strings on the decoded
text). What each parameter does: docs/serve.md. Parameters this server does not implement are refused with
422 naming them (schemas.py), never ignored.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from projects.serve.batcher import DeadlineExceeded, Overloaded
from projects.serve.engine import GenRequest
from projects.serve.middleware import BadInput, ModelNotFound, NotConfigured, TooLarge, ready_state, unless_disconnected
from projects.serve.schemas import ChatRequest, CompletionRequest, check_text, refuse_unsupported
from projects.serve.textstream import TextStream

router = APIRouter()


def _engine(request: Request, body):
    st = ready_state(request)
    if st.engine is None:
        raise NotConfigured("generation is not configured on this server (SERVE_GEN_MODEL)")
    if body.model is not None and body.model != st.engine.model_id:
        raise ModelNotFound(f"model {body.model!r} is not served here; GET /v1/models lists "
                            f"{st.engine.model_id!r}")
    refuse_unsupported(body)
    return st


def _submit(st, ids: list[int], max_tokens: int, body, logprobs: int | None) -> GenRequest:
    if not ids:
        raise BadInput("the prompt encodes to no tokens")
    if max_tokens > st.settings.max_tokens:
        raise TooLarge(f"max_tokens={max_tokens}; the limit is {st.settings.max_tokens}")
    req = GenRequest(ids, max_tokens, body.temperature, body.top_k, body.top_p if body.top_p < 1.0 else None,
                     body.seed, logprobs)
    st.engine.submit(req, timeout_s=st.settings.request_timeout_s)   # ContextLengthExceeded, Overloaded
    return req


async def next_token(req: GenRequest, request: Request | None):
    """The engine's next Token for `req`, None at the end; raises what the engine put in its place."""
    item = await (unless_disconnected(request, req.out.get()) if request is not None else req.out.get())
    if isinstance(item, BaseException):
        raise item
    return item


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    st = _engine(request, body)
    check_text(body.prompt, "prompt", st.settings.max_chars)
    stops = body.stops()
    ids = st.engine.tokenizer(body.prompt)["input_ids"]
    req = _submit(st, ids, body.max_tokens, body, body.logprobs)
    tok, name = st.engine.tokenizer, st.engine.model_id
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def logprobs(tokens, offsets):
        if body.logprobs is None:
            return None
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{x: p for x, (_, p) in zip(t.top_text, t.top)} for t in tokens],
                "text_offset": offsets}

    def chunk(text, tokens, offsets, finish):
        return {"id": cid, "object": "text_completion", "created": created, "model": name,
                "choices": [{"text": text, "index": 0, "logprobs": logprobs(tokens, offsets),
                             "finish_reason": finish}]}
    return await _respond(st, request, body, req, TextStream(tok, stops, ids[-1]), len(ids), chunk)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    st = _engine(request, body)
    tok, s = st.engine.tokenizer, st.settings
    if getattr(tok, "chat_template", None) is None:
        raise BadInput(f"model {st.engine.model_id!r} has no chat template: use /v1/completions")
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise BadInput("give max_completion_tokens or max_tokens (its deprecated name), not both")
    if body.top_logprobs is not None and not body.logprobs:
        raise BadInput("top_logprobs needs logprobs: true")
    msgs = []
    for i, m in enumerate(body.messages):
        text = m.text()
        check_text(text, f"messages[{i}].content", s.max_chars)
        msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    check_text(prompt, "the templated conversation", s.max_chars * 4)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]   # the template writes its own special tokens
    ask = body.max_completion_tokens or body.max_tokens
    max_tokens = ask or max(1, min(s.max_tokens, st.engine.ctx - len(ids)))
    req = _submit(st, ids, max_tokens, body, (body.top_logprobs or 0) if body.logprobs else None)
    cid, created, name = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), st.engine.model_id

    def entry(text: str, p: float) -> dict:
        return {"token": text, "logprob": p, "bytes": list(text.encode())}

    def logprobs(tokens):
        if not body.logprobs:
            return None
        return {"content": [{**entry(t.text, t.logprob),
                             "top_logprobs": [entry(x, p) for x, (_, p) in zip(t.top_text, t.top)]}
                            for t in tokens], "refusal": None}

    def chunk(text, tokens, offsets, finish, first=False):
        if not body.stream:
            return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                 "logprobs": logprobs(tokens), "finish_reason": finish}]}
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs(tokens), "finish_reason": finish}]}
    # OpenAI's chat streams open with the assistant's role
    return await _respond(st, request, body, req, TextStream(tok, body.stops(), ids[-1]), len(ids), chunk,
                          opener=chunk("", [], [], None, first=True))


async def _respond(st, request: Request, body, req: GenRequest, ts: TextStream, n_prompt: int, chunk,
                   opener: dict | None = None):
    timing = request.scope["state"]["timing"]
    if body.stream:
        try:
            first = await next_token(req, request)  # errors before the first token still get a status
        except BaseException:
            req.cancelled = True
            raise
        # headers go out now: queue = waiting for a KV slot, inference = admission to the first token
        now = asyncio.get_running_loop().time()
        timing.queue_s, timing.inference_s = max(0.0, req.t_start - req.t_enqueue), now - req.t_start
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(st, request, req, ts, first, n_prompt, chunk, usage, opener),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, tokens = [], []
    try:
        while not ts.stopped and (t := await next_token(req, request)) is not None:
            p = ts.push(t)
            text.append(p.text)
            tokens += p.tokens
        p = ts.finish()
        text.append(p.text)
        tokens += p.tokens
    finally:
        req.cancelled = True  # ends the row at a stop string; frees the slot when we were cancelled
    n = len(ts.ids)
    _count(st, request, n_prompt, n)
    timing.queue_s = max(0.0, req.t_start - req.t_enqueue)
    timing.inference_s = asyncio.get_running_loop().time() - req.t_start   # prefill + every decode step
    out = chunk("".join(text), tokens, ts.offsets, "stop" if ts.stopped else req.finish_reason)
    out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}
    return out


async def _sse(st, request: Request, req: GenRequest, ts: TextStream, first, n_prompt: int, chunk, usage: bool,
               opener: dict | None):
    """Server-sent events: one per piece of final text (OpenAI's stream format), `data: [DONE]` last."""
    def event(d: dict) -> str:
        if usage:
            d.setdefault("usage", None)
        return f"data: {json.dumps(d)}\n\n"

    t, n_sent = first, 0
    try:
        if opener is not None:
            yield event(opener)
        while t is not None:
            p = ts.push(t)
            if p.text or p.tokens:
                yield event(chunk(p.text, p.tokens, ts.offsets[n_sent:], None))
                n_sent = len(ts.offsets)
            if ts.stopped:
                break
            t = await next_token(req, None)
        p = ts.finish()
        yield event(chunk(p.text, p.tokens, ts.offsets[n_sent:], "stop" if ts.stopped else req.finish_reason))
        if usage:
            n = len(ts.ids)
            yield event({**chunk("", [], [], None), "choices": [],
                         "usage": {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}})
        yield "data: [DONE]\n\n"
    except (Overloaded, DeadlineExceeded) as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'overloaded'}})}\n\n"
    finally:
        req.cancelled = True  # the client went away (generator closed), a stop string, or the end: free the slot
        _count(st, request, n_prompt, len(ts.ids))


def _count(st, request: Request, n_prompt: int, n_new: int) -> None:
    st.metrics.tokens.inc(n_new)
    key = request.scope["state"].get("api_key")
    if key is not None and st.limiter is not None:
        st.limiter.charge(key, n_prompt + n_new)

