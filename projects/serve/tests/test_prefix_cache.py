"""The prefix KV cache: the same greedy tokens with and without it (also after evictions), exact K/V copies,
reference counts that keep a chain's parents and its readers' blocks, and invalidation by model version."""
from __future__ import annotations

import asyncio

import pytest
import torch

from projects.serve.engine import GenerationEngine, GenRequest
from projects.serve.prefix_cache import PrefixCache

SYSTEM = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with "
          "her dog. ") * 2
OTHER = "The sun was shining and the birds were singing in the big green tree by the river. " * 2


def _generate(model, tok, prompts: list[str], cache_bytes: int, n_slots: int = 2, concurrent: bool = True):
    """Greedy tokens of each prompt through one engine, and the engine (its counters)."""
    async def main():
        eng = GenerationEngine(model, tok, n_slots=n_slots, prefix_cache_bytes=cache_bytes)
        eng.start()

        async def one(p):
            req = eng.submit(GenRequest(tok(p)["input_ids"], 16))
            out = []
            while (t := await req.out.get()) is not None:
                if isinstance(t, BaseException):
                    raise t
                out.append(t.id)
            return out
        try:
            if concurrent:
                return await asyncio.gather(*(one(p) for p in prompts)), eng
            return [await one(p) for p in prompts], eng
        finally:
            await eng.stop()
    return asyncio.run(main())


def test_greedy_tokens_equal_with_and_without_the_cache(gen_parts):
    model, tok = gen_parts
    prompts = [SYSTEM + q for q in ("One day,", "Her mom said", "The dog")] + \
              [OTHER + q for q in ("A bird", "Then")]
    ref, _ = _generate(model, tok, prompts, 0)
    # room for about one shared prefix: the second one evicts the first, which is then computed again
    block = PrefixCache(model, 1 << 20).block_bytes
    n_blocks = len(tok(SYSTEM)["input_ids"]) // 16 + 1
    order = prompts + prompts[:3]
    got, eng = _generate(model, tok, order, n_blocks * block, concurrent=False)
    assert got == ref + ref[:3]
    assert eng.prefix.evictions > 0 and eng.prefix.hits >= 2 * 16 * (n_blocks - 2)
    # requests sharing a prefix admitted in the same step: the later ones reuse what the first stored
    got, eng = _generate(model, tok, prompts, 64 * block, concurrent=True)
    assert got == ref and eng.prefix.hits > 0


def test_blocks_copy_exactly_and_referenced_blocks_survive(gen_parts):
    model, _ = gen_parts
    model.setup_caches(2, 128)
    c = PrefixCache(model, 1 << 20)
    c = PrefixCache(model, 3 * c.block_bytes, version="a")
    for layer in model.layers:                                    # distinct values in row 0
        layer.attention.kv_cache.k_cache[0].normal_()
        layer.attention.kv_cache.v_cache[0].normal_()
    ids, other = list(range(1, 50)), list(range(100, 149))       # 3 full blocks + 1 token each
    chain = c.match(ids)
    assert chain == [] and c.misses == 49
    c.store(ids, 0, chain)
    c.release(chain)
    assert c.used == 3
    chain = c.match(ids)                                          # the leaf is now referenced by this reader
    assert len(chain) == 3 and c.hits == 48
    assert c.load(chain, 1) == 48
    for layer in model.layers:
        kc = layer.attention.kv_cache
        assert torch.equal(kc.k_cache[1, :, :48], kc.k_cache[0, :, :48])
        assert torch.equal(kc.v_cache[1, :, :48], kc.v_cache[0, :, :48])
    c.store(other, 0, [])                 # full, and every block is referenced (a child or the reader)
    assert c.used == 3 and len(c.match(ids)) == 3
    c.release(chain)
    c.release(chain)                      # both readers done: the chain can go, leaf first
    c.store(other, 0, [])
    assert c.evictions == 3 and len(c.match(other)) == 3 and c.match(ids) == []
    c.set_version("b")                    # other weights: nothing cached is valid
    assert c.used == 0 and c.match(other) == []
    model.remove_caches()


def test_a_cache_too_small_for_one_block_is_refused(gen_parts):
    model, tok = gen_parts
    with pytest.raises(ValueError, match="holds no block"):
        GenerationEngine(model, tok, n_slots=1, prefix_cache_bytes=100)
