"""A plain Llama-architecture decoder with a static KV cache.

    from projects.infer.weights import load
    model, tok = load("smollm2-135m", device, torch.bfloat16)   # or a HF folder / hub name
    model.setup_caches(max_batch_size=1, max_seq_length=512)

The model knows nothing of sampling, quantization or compile (those are applied from outside, as in
gpt-fast). Prefill and one-token decode are the same `forward(idx, input_pos, mask)`:

- `input_pos` holds the cache slot each token is written to, `(T,)` for all rows (gpt-fast) or `(B, T)` per
  row (so a server can run rows at different lengths over the same cache: continuous batching). The slot is
  also the token's RoPE position. RoPE scores depend only on the distance between query and key, so a
  left-padded row that starts at slot `p` gives the same attention as that row alone starting at 0.
- `mask` `(B, 1, T, S)` bool says which cache slots each query may see; the default is causal over slots.
  Left padding passes a mask that also hides the pad slots.

Without `setup_caches` the forward is a plain causal full-sequence pass (used by perplexity eval).
Loading and saving weights (HF folders, the hub, the offline GGUF): weights.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from projects.infer import kernels


@dataclass
class ModelArgs:
    dim: int = 64
    n_layers: int = 5
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 8
    vocab_size: int = 512
    intermediate_size: int = 172
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None     # HF rope_parameters/rope_scaling: linear or llama3; None = plain
    max_seq_len: int = 512               # the checkpoint's context (max_position_embeddings)
    tie_embeddings: bool = True

    @classmethod
    def from_hf_config(cls, c: dict) -> "ModelArgs":
        if c.get("model_type") not in ("llama", None):
            raise ValueError(f"model_type {c.get('model_type')!r} is not a Llama architecture")
        # transformers >= 5 nests theta and scaling in rope_parameters; older configs have them flat
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", c.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rtype!r} is not supported (default, linear, llama3)")
        n_heads = c["num_attention_heads"]
        return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=c.get("num_key_value_heads") or n_heads,
                   head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
                   vocab_size=c["vocab_size"], intermediate_size=c["intermediate_size"],
                   norm_eps=c.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
                   rope_scaling=None if rtype == "default" else {**rope, "rope_type": rtype},
                   max_seq_len=c.get("max_position_embeddings", 2048),
                   tie_embeddings=c.get("tie_word_embeddings", False))


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies, with linear or llama3 scaling as transformers computes them."""
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.int64).float() / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
    return torch.where(medium, smoothed, inv_l)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (B, 1, T, D). HF's "rotate half" layout (not interleaved pairs)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 then cast back before the weight, exactly as transformers' LlamaRMSNorm
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class KVCache(nn.Module):
    """Preallocated (B, n_kv_heads, max_seq, head_dim) keys and values, written in place at input_pos."""

    def __init__(self, max_batch_size, max_seq_length, n_kv_heads, head_dim, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k_val, v_val):
        # input_pos: (T,) shared or (B, T) per row; k_val, v_val: (B, H, T, D)
        B = k_val.shape[0]
        k_out, v_out = self.k_cache[:B], self.v_cache[:B]
        if input_pos.dim() == 1:
            k_out[:, :, input_pos] = k_val
            v_out[:, :, input_pos] = v_val
        else:  # advanced indices around a slice put the indexed dims first: (B, T, H, D)
            rows = torch.arange(B, device=input_pos.device)[:, None]
            k_out[rows, :, input_pos] = k_val.transpose(1, 2)
            v_out[rows, :, input_pos] = v_val.transpose(1, 2)
        return k_out, v_out


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        # q, k, v fused into one matmul (one weight read, one kernel launch per layer, as gpt-fast)
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos, mask):
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        if self.kv_cache is None:  # full-sequence pass (eval): kv heads repeated, causal flash kernel
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask)
        else:
            k, v = self.kv_cache.update(input_pos, k, v)                     # (B, nkv, S, hd)
            S = mask.shape[-1]                                               # a prefill's kv_len, else all
            k, v = k[:, :, :S], v[:, :, :S]
            # grouped-query attention without copying the cache: the `rep` query heads that share a kv
            # head become rep*T query rows of that head (rows ordered rep-major, so the mask repeats)
            qg = q.reshape(B, self.n_kv_heads, rep * T, self.head_dim)       # (B, nkv, rep*T, hd)
            if T == 1 and x.device.type == "cpu" and kernels.available():
                # one query per row (decode): csrc/attention.cpp reads only the slots the mask allows; the CPU
                # flash-attention kernel's fixed cost per call is many times this step at these sizes
                y = torch.ops.mlsys.decode_attention(qg, k, v, mask.reshape(mask.shape[0], -1))
            else:
                y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(1, 1, rep, 1))
            y = y.view(B, self.n_heads, T, self.head_dim)                    # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.intermediate_size, bias=False)   # gate
        self.w3 = nn.Linear(a.dim, a.intermediate_size, bias=False)   # up
        self.w2 = nn.Linear(a.intermediate_size, a.dim, bias=False)   # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                # SwiGLU


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(a.dim, a.norm_eps), RMSNorm(a.dim, a.norm_eps)
        self.attention, self.feed_forward = Attention(a), FeedForward(a)

    def forward(self, x, cos, sin, input_pos, mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size, self.max_seq_length = 0, 0
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate the static KV cache once; later calls with sizes that fit keep the buffers."""
        if max_seq_length > self.args.max_seq_len:
            raise ValueError(f"a cache of {max_seq_length} positions exceeds the model's context of "
                             f"{self.args.max_seq_len}")
        if max_batch_size <= self.max_batch_size and max_seq_length == self.max_seq_length:
            return
        w = self.norm.weight  # float in every variant (quantize.py replaces Linears, never the norms)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, self.args.n_kv_heads,
                                               self.args.head_dim, w.dtype, w.device)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def remove_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.max_batch_size, self.max_seq_length = 0, 0

    def rope(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (B|1, 1, T, hd) of the rotary embedding at positions input_pos ((T,) or (B, T))."""
        pos = input_pos if input_pos.dim() == 2 else input_pos[None]                     # (B|1, T)
        freqs = pos[..., None].float() * self.inv_freq                                   # (B|1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                                 # (B|1, 1, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, last_only: bool = False, kv_len: int | None = None) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab) in fp32. For a prefill: last_only gives (B, 1, vocab), the
        last position's only (the head is a large share of a long prompt's work); kv_len (> every input_pos)
        attends over the first kv_len cache slots instead of all of them (a long cache, a short prompt)."""
        B, T = idx.shape
        if input_pos is None:
            if self.max_seq_length:
                raise ValueError("a model with a KV cache needs input_pos")
            input_pos = torch.arange(T, device=idx.device)
        elif mask is None:  # causal over cache slots (or over the T tokens without a cache)
            slots = torch.arange(kv_len or self.max_seq_length or T, device=idx.device)
            mask = slots <= input_pos[..., None]                                         # (B|., T, S)
            mask = mask[:, None] if input_pos.dim() == 2 else mask[None, None]            # (B|1, 1, T, S)
        x = self.tok_embeddings(idx)                                                     # (B, T, dim)
        cos, sin = self.rope(input_pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, input_pos, mask)
        if last_only:
            x = x[:, -1:]                                                                # (B, 1, dim)
        return self.output(self.norm(x)).float()
