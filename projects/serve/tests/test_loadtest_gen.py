"""The generation load test's pure parts (projects/serve/loadtest.py): reading a streamed completion's events,
TTFT / TPOT / ITL from their times, the fixed workload mix, goodput under the TTFT + TPOT SLO; and the
bench's at-SLO pick. No model and no replica: one test streams scripted events from a local aiohttp server."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from projects.serve import loadtest
from projects.serve.workload import GEN_MIX, GenWorkload, system_prompt, words_from
from projects.serve.loadstats import Result, sse_event, summarize, token_metrics

TEXTS = [f"passage {i} says " + " ".join(f"w{i}_{j}" for j in range(5 + i % 7)) for i in range(200)]


def data(d) -> bytes:
    return b"data: " + (d if isinstance(d, bytes) else json.dumps(d).encode()) + b"\n"


def test_sse_events_are_told_apart():
    assert sse_event(data({"choices": [{"text": " cat", "finish_reason": None}]})) == ("token", None)
    # a token whose text is still incomplete UTF-8 is a token event with empty text
    assert sse_event(data({"choices": [{"text": "", "finish_reason": None}]})) == ("token", None)
    # the final chunk is a token only when it carries text
    assert sse_event(data({"choices": [{"text": "", "finish_reason": "length"}]})) == ("other", None)
    assert sse_event(data({"choices": [{"text": ".", "finish_reason": "stop"}]})) == ("token", None)
    usage = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert sse_event(data({"choices": [], "usage": usage})) == ("usage", usage)
    assert sse_event(data(b"[DONE]")) == ("done", None)
    # chat: the opener (the assistant's role) is not a token; a content delta is
    assert sse_event(data({"choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})) \
        == ("other", None)
    assert sse_event(data({"choices": [{"delta": {"content": "hi"}, "finish_reason": None}]})) == ("token", None)
    assert sse_event(data({"error": {"message": "overloaded"}})) == ("other", None)
    assert sse_event(b"\n") == ("other", None)
    assert sse_event(b": keep-alive\n") == ("other", None)
    assert sse_event(b"data: {not json\n") == ("other", None)


def test_ttft_tpot_and_itl_from_event_times():
    r = Result("completions", scheduled=10.0, sent=10.0, done=11.0, status="200", first=10.5,
               tokens=[10.5, 10.6, 10.8, 10.9], completion_tokens=4)
    ttft, tpot, itl = token_metrics(r)
    assert ttft == pytest.approx(0.5)
    assert tpot == pytest.approx(0.4 / 3)
    assert itl == pytest.approx([0.1, 0.2, 0.1])
    # several tokens in one event (a multi-token character): TPOT divides by the usage count, not the events
    r.completion_tokens = 7
    assert token_metrics(r)[1] == pytest.approx(0.4 / 6)
    # no usage chunk: the events are the count
    r.completion_tokens = None
    assert token_metrics(r)[1] == pytest.approx(0.4 / 3)
    one = Result("completions", 0.0, 0.0, 1.0, "200", tokens=[0.3], completion_tokens=1)
    assert token_metrics(one) == (pytest.approx(0.3), None, [])


def requests(seed: int, n: int, **kw) -> list[dict]:
    wl = GenWorkload(TEXTS, **kw)
    rng = np.random.default_rng(seed)
    return [wl.request(rng)[2] for _ in range(n)]


def test_the_workload_is_fixed_by_the_seed_and_follows_the_mix():
    assert requests(3, 50) == requests(3, 50)
    assert requests(3, 50) != requests(4, 50)
    bodies = requests(0, 4000)
    by_tokens = {c[3]: c for c in GEN_MIX}
    for b in bodies[:200]:
        _, lo, hi, _ = by_tokens[b["max_tokens"]]
        assert lo <= len(b["prompt"].split()) <= hi
        assert b["stream"] is True and b["temperature"] == 0.0
        assert b["stream_options"] == {"include_usage": True}
    total = sum(c[0] for c in GEN_MIX)
    for w, _, _, max_tokens in GEN_MIX:
        share = sum(b["max_tokens"] == max_tokens for b in bodies) / len(bodies)
        assert abs(share - w / total) < 0.03
    words, new = GenWorkload(TEXTS).expected()
    assert abs(np.mean([len(b["prompt"].split()) for b in bodies]) - words) < 2
    assert new == pytest.approx(sum(c[0] * c[3] for c in GEN_MIX) / total)


def test_a_shared_system_prompt_prefixes_every_prompt_and_keeps_the_rest():
    system = system_prompt(TEXTS, 300)
    assert len(system.split()) == 300
    plain, shared = requests(5, 20), requests(5, 20, system=system)
    for a, b in zip(plain, shared):
        assert b["prompt"] == f"{system}\n\n{a['prompt']}"
        assert b["max_tokens"] == a["max_tokens"]
    assert words_from(["a b", "c"], 1, 4) == "c a b c"      # wraps around the pool


def test_goodput_needs_both_ttft_and_tpot_within_the_slo():
    def gen(ttft, tpot, n=5, t0=0.0):
        first = t0 + ttft
        toks = [first + i * tpot for i in range(n)]
        return Result("completions", t0, t0, toks[-1] + 0.01, "200", first, tokens=toks, prompt_tokens=20,
                      completion_tokens=n)
    res = [gen(0.5, 0.05, t0=i) for i in range(6)]          # good
    res += [gen(3.0, 0.05, t0=6), gen(0.5, 0.5, t0=7)]       # TTFT over, TPOT over
    res += [Result("completions", 8.0, 8.0, 8.01, "429")]    # refused
    s = summarize(res, t0=0.0, offered_rps=1.0, duration_s=20.0, slo_s=2.0, tpot_slo_s=0.2)
    assert s["ok"] == 8 and s["refused"] == 1
    assert s["goodput_rps"] == pytest.approx(6 / 20)
    # without the TPOT SLO only the slow first token is bad
    assert summarize(res, 0.0, 1.0, 20.0, 2.0)["goodput_rps"] == pytest.approx(7 / 20)
    ttft = [0.5] * 6 + [3.0, 0.5]
    tpot = [0.05] * 7 + [0.5]
    assert s["ttft_p50_ms"] == pytest.approx(1000 * np.percentile(ttft, 50))
    assert s["ttft_p99_ms"] == pytest.approx(1000 * np.percentile(ttft, 99))
    assert s["tpot_p99_ms"] == pytest.approx(1000 * np.percentile(tpot, 99))
    assert s["itl_p50_ms"] == pytest.approx(50)
    assert s["itl_p99_ms"] == pytest.approx(1000 * np.percentile([0.05] * 28 + [0.5] * 4, 99))
    assert s["output_tok_s"] == pytest.approx(8 * 5 / 20)
    assert s["prompt_tokens_mean"] == 20 and s["completion_tokens_mean"] == 5
    assert "ttft_p50_ms" not in summarize(res[-1:], 0.0, 1.0, 20.0, 2.0)   # no stream, no generation keys


def test_at_slo_takes_the_best_level_within_every_limit():
    from projects.serve.bench import at_slo
    levels = [{"failed": 0, "ttft_p99_ms": 900, "tpot_p99_ms": 80, "output_tok_s": 50, "achieved_rps": 1},
              {"failed": 0, "ttft_p99_ms": 1900, "tpot_p99_ms": 150, "output_tok_s": 90, "achieved_rps": 2},
              {"failed": 0, "ttft_p99_ms": 2500, "tpot_p99_ms": 150, "output_tok_s": 120, "achieved_rps": 3},
              {"failed": 2, "ttft_p99_ms": 1000, "tpot_p99_ms": 100, "output_tok_s": 130, "achieved_rps": 4},
              {"failed": 0, "ttft_p99_ms": None, "tpot_p99_ms": None, "output_tok_s": 140, "achieved_rps": 5}]
    limits = {"ttft_p99_ms": 2000, "tpot_p99_ms": 200}
    assert at_slo(levels, limits, key="output_tok_s") == 90
    assert at_slo(levels, {"tpot_p99_ms": 100}, key="output_tok_s") == 50
    assert at_slo(levels, {"ttft_p99_ms": 10}) == 0.0


def test_median_run_is_the_middle_slo_run_with_every_runs_numbers_beside_it():
    from projects.serve.bench import median_run
    runs = [{"slo_rps": 10.0, "capacity_rps": 12.0, "levels": "a"},
            {"slo_rps": 30.0, "capacity_rps": 33.0, "levels": "b"},
            {"slo_rps": 20.0, "capacity_rps": 21.0, "levels": "c"}]
    m = median_run(runs)
    assert m["levels"] == "c" and m["slo_rps"] == 20.0 and m["capacity_rps"] == 21.0
    assert m["runs_slo_rps"] == [10.0, 30.0, 20.0] and m["runs_capacity_rps"] == [12.0, 33.0, 21.0]
    assert median_run(runs[:2])["levels"] == "a"          # an even count: the lower middle run
    assert median_run(runs[1:2])["slo_rps"] == 30.0


def test_send_reads_token_times_and_usage_from_a_stream():
    """A scripted SSE stream (3 tokens 50 ms apart, an empty final chunk, usage, [DONE]) through `send`."""
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    async def completions(request):
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await asyncio.sleep(0.05)
            await resp.write(data({"choices": [{"text": f" t{i}", "finish_reason": None}]}) + b"\n")
        await resp.write(data({"choices": [{"text": "", "finish_reason": "length"}]}) + b"\n")
        await resp.write(data({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}) + b"\n")
        await resp.write(data(b"[DONE]") + b"\n")
        return resp

    async def go():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as c:
                route, path, body = GenWorkload(TEXTS).request(np.random.default_rng(0))
                return await loadtest.send(c, route, path, body, asyncio.get_running_loop().time(), 10)
        finally:
            await runner.cleanup()

    r = asyncio.run(go())
    assert r.status == "200" and len(r.tokens) == 3 and r.first == r.tokens[0]
    assert (r.prompt_tokens, r.completion_tokens) == (9, 3)
    _, tpot, itl = token_metrics(r)
    assert all(0.03 < g < 0.5 for g in itl) and 0.03 < tpot < 0.5
