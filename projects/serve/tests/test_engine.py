"""The generation engine's admission: the expected wait for a row, and refusals by seconds or by count."""
from __future__ import annotations

import asyncio

import pytest

from projects.serve.batcher import Overloaded
from projects.serve.engine import GenerationEngine, GenRequest


def _state(eng: GenerationEngine):
    """Two running rows with 10 and 4 decode steps left, one request waiting (max_tokens 8, 5-token prompt);
    a decode step of 10 ms and a prefill of 2 ms per token."""
    eng._decode_s, eng._prefill_tok_s = 0.010, 0.002
    for row, (max_tokens, n_new) in enumerate(((16, 6), (12, 8))):
        eng._active[row] = GenRequest([1, 2, 3], max_tokens, row=row, n_new=n_new)
    eng._waiting.append(GenRequest([1] * 5, 8))


def test_expected_wait_runs_the_rows_ahead_to_their_max_tokens(gen_parts):
    model, tok = gen_parts
    eng = GenerationEngine(model, tok, n_slots=2)
    assert eng.expected_wait_s() == 0.0                      # nothing timed yet, nothing ahead
    _state(eng)
    # rows free at 0.10 s and 0.04 s; the waiting request takes the 0.04 s row and holds it 8 steps (to
    # 0.12 s), so a new request gets the 0.10 s row, after the waiting request's 5-token prefill (0.01 s)
    assert eng.expected_wait_s() == pytest.approx(0.11)
    eng._waiting.clear()
    assert eng.expected_wait_s() == pytest.approx(0.04)
    eng._active.clear()
    assert eng.expected_wait_s() == 0.0                      # a free row: no wait


def test_admission_refuses_by_expected_wait_and_by_count(gen_parts):
    model, tok = gen_parts

    async def main():
        out = {}
        for name, kw in (("seconds", {"max_wait_s": 0.1}), ("roomy", {"max_wait_s": 0.2}),
                         ("count", {"max_queue": 1}), ("off", {})):
            eng = GenerationEngine(model, tok, n_slots=2, **kw)
            eng.start()
            _state(eng)
            eng._wake.clear()
            try:
                eng.submit(GenRequest([4, 5], 4))
                out[name] = "admitted"
            except Overloaded as e:
                out[name] = (str(e), e.retry_after_s, eng.rejected)
            eng._active.clear()                              # not real rows: keep the engine off them
            eng._waiting.clear()
            await eng.stop()
        return out
    out = asyncio.run(main())
    msg, retry, rejected = out["seconds"]
    assert "0.1 s" in msg and retry == 1.0 and rejected == 1   # 0.11 s expected > 0.1 s; Retry-After >= 1 s
    assert out["roomy"] == "admitted"
    assert "full (1/1)" in out["count"][0]
    assert out["off"] == "admitted"                           # 0 = by count alone (64 by default)
    with pytest.raises(ValueError, match="gen_max_wait_ms"):
        from projects.serve.settings import Settings
        Settings(gen_max_wait_ms=-1)
