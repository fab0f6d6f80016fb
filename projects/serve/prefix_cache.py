"""Prefix KV cache: the keys and values of prompt prefixes that requests share (a system prompt, a few-shot
header), kept in fixed-size blocks and copied into a request's KV cache row instead of being prefilled again.

Like vLLM's automatic prefix caching, a block holds `block_tokens` positions of every layer's K and V and is
named by its tokens AND its parent block, so a block is reused only after exactly the same prefix
(the key is (parent block, the block's token ids), compared exactly, not a lossy hash). Only full blocks of
a prompt are cached, and the last prompt token is always prefilled (its logits pick the first new token).

Differences from vLLM, and why: projects.infer's static KV cache is one contiguous row per request (its
attention reads a row, not a block table), so a hit is a copy of the matched blocks into the row
(L layers x 2 x n_blocks x block_tokens x n_kv_heads x head_dim elements; memcpy speed) rather than shared
pages. The saving is the prefill compute of the matched tokens, which is what dominates time to first token.

Memory is bounded (`max_bytes`, allocated once). Blocks are reference-counted: a block's children and the
request whose prefill is reading it hold references; only unreferenced blocks are evicted, least recently
used first, so a chain is evicted leaf first and a parent never disappears under its children. `version`
names the model's weights: a different version empties the cache (K/V of other weights are wrong, not
stale).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class Block:
    id: int                      # slot in the pool
    key: tuple                   # (parent Block id or -1, token ids)
    parent: int
    refs: int = 0                # children + readers


class PrefixCache:
    def __init__(self, model, max_bytes: int, block_tokens: int = 16, version: str = ""):
        c = model.layers[0].attention.kv_cache
        if c is None:
            raise ValueError("set up the model's KV cache before the prefix cache")
        _, H, _, D = c.k_cache.shape                                          # (B, n_kv, S, hd)
        self.n_layers, self.block_tokens = len(model.layers), block_tokens
        self.block_bytes = self.n_layers * 2 * H * block_tokens * D * c.k_cache.element_size()
        self.n_blocks = max_bytes // self.block_bytes
        shape = (self.n_layers, self.n_blocks, H, block_tokens, D)           # (L, N, n_kv, bs, hd)
        self.k = torch.zeros(shape, dtype=c.k_cache.dtype, device=c.k_cache.device)
        self.v = torch.zeros_like(self.k)
        self.model = model
        self.version = version
        self._by_key: dict[tuple, Block] = {}
        self._blocks: dict[int, Block] = {}
        self._free = list(range(self.n_blocks))[::-1]
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()   # unreferenced blocks
        self.hits = self.misses = self.evictions = 0                          # in tokens, tokens, blocks

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    @property
    def used(self) -> int:
        return len(self._blocks)

    def set_version(self, version: str) -> None:
        if version != self.version:
            self.clear()
            self.version = version

    def clear(self) -> None:
        self._by_key.clear()
        self._blocks.clear()
        self._lru.clear()
        self._free = list(range(self.n_blocks))[::-1]

    # -- a request's prefill: match -> load -> (prefill the rest) -> store -> release ----------------------
    def match(self, ids: list[int]) -> list[Block]:
        """The longest chain of cached blocks that `ids` starts with, leaving >= 1 token to prefill; the
        chain's last block is referenced until `release`."""
        bs, chain, parent = self.block_tokens, [], -1
        for i in range((len(ids) - 1) // bs):
            b = self._by_key.get((parent, tuple(ids[i * bs:(i + 1) * bs])))
            if b is None:
                break
            chain.append(b)
            parent = b.id
        for b in chain:
            self._touch(b)
        if chain:
            self._ref(chain[-1], +1)
        n = len(chain) * bs
        self.hits += n
        self.misses += len(ids) - n
        return chain

    def release(self, chain: list[Block]) -> None:
        if chain:
            self._ref(chain[-1], -1)

    def load(self, chain: list[Block], row: int) -> int:
        """Copy the chain's K/V into positions [0, n) of KV cache row `row`; returns n."""
        if not chain:
            return 0
        n, idx = len(chain) * self.block_tokens, torch.tensor([b.id for b in chain], device=self.k.device)
        for i, layer in enumerate(self.model.layers):
            c = layer.attention.kv_cache
            for pool, cache in ((self.k, c.k_cache), (self.v, c.v_cache)):
                blocks = pool[i].index_select(0, idx)                         # (n_b, n_kv, bs, hd)
                cache[row, :, :n] = blocks.transpose(0, 1).flatten(1, 2)        # (n_kv, n, hd)
        return n

    def store(self, ids: list[int], row: int, chain: list[Block]) -> None:
        """Cache the full blocks of prompt `ids` after `chain` from KV cache row `row` (just prefilled)."""
        bs = self.block_tokens
        parent = chain[-1].id if chain else -1
        for i in range(len(chain), len(ids) // bs):
            key = (parent, tuple(ids[i * bs:(i + 1) * bs]))
            b = self._by_key.get(key)
            if b is None:
                slot = self._alloc(protect=parent)
                if slot is None:
                    return                                                     # full of referenced blocks
                b = Block(slot, key, parent)
                self._by_key[key], self._blocks[slot] = b, b
                for j, layer in enumerate(self.model.layers):
                    c = layer.attention.kv_cache
                    self.k[j, slot] = c.k_cache[row, :, i * bs:(i + 1) * bs]     # (n_kv, bs, hd)
                    self.v[j, slot] = c.v_cache[row, :, i * bs:(i + 1) * bs]
                if parent >= 0:
                    self._ref(self._blocks[parent], +1)
                self._lru[slot] = None
            self._touch(b)
            parent = b.id

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def _touch(self, b: Block) -> None:
        if b.id in self._lru:
            self._lru.move_to_end(b.id)

    def _ref(self, b: Block, d: int) -> None:
        b.refs += d
        if b.refs == 0:
            self._lru[b.id] = None          # most recently used end
        else:
            self._lru.pop(b.id, None)

    def _alloc(self, protect: int) -> int | None:
        if self._free:
            return self._free.pop()
        for slot in self._lru:              # least recently used first
            if slot != protect:
                break
        else:
            return None
        b = self._blocks.pop(slot)
        del self._lru[slot]
        del self._by_key[b.key]
        if b.parent >= 0:
            self._ref(self._blocks[b.parent], -1)
        self.evictions += 1
        return slot
