"""Text generation with the static KV cache: greedy, temperature, top-k, top-p; batches with left padding.

    python -m projects.infer.generate --model smollm2-135m --prompt "The capital of France is" \\
        --max-new-tokens 200 [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--compile] [--dtype bf16]

Library use (the serving project imports these names):

    model, tok = load("smollm2-135m", device, torch.bfloat16)
    out = generate(model, ids, 200, temperature=0.0, stop_ids=[tok.eos_token_id], on_token=print)

Host syncs: none per token, except (a) `on_token`, which a streaming caller needs on the host anyway, and
(b) the stop-token check: whether every row has stopped is read on the host only every `STOP_CHECK_EVERY`
tokens (one sync per 8 tokens instead of per token); the up to 7 extra steps after the last row stops are
written as padding and trimmed, so the output is the same as checking every token.
"""
from __future__ import annotations

import contextlib
import re
import sys
import time
from dataclasses import dataclass

import torch

from common import config
from common.device import autocast_dtype, get_device, synchronize
from projects.infer.model import Transformer
from projects.infer.weights import load

__all__ = ["load", "generate", "compile_decode", "decode_step", "sample"]
STOP_CHECK_EVERY = 8


def sample(logits, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next tokens (B,), without a host sync."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]      # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        srt, idx = logits.sort(-1, descending=True)                                  # (B, V)
        probs = srt.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p       # mass before a token already exceeds p; keeps the top 1
        logits = logits.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    # Gumbel-style draw: argmax(p / Exp(1)) ~ Categorical(p); no multinomial, so no sync on CUDA
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    # a draw of exactly 0 would give 0/0 = NaN for a masked token, and argmax would pick it
    return (probs / q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(-1)


def decode_step(model: Transformer, tok, input_pos, key_valid):
    """One token for every row: tok (B, 1) at cache slot input_pos (1,) -> logits (B, V).

    key_valid (B, S) bool marks the cache slots that hold real tokens (False for left padding), or None.
    """
    mask = None
    if key_valid is not None:
        slots = torch.arange(key_valid.shape[1], device=tok.device)
        mask = (key_valid & (slots <= input_pos))[:, None, None, :]                  # (B, 1, 1, S)
    return model(tok, input_pos, mask)[:, -1]


def compile_decode():
    """decode_step compiled: CUDA graphs (reduce-overhead) on CUDA; on CPU inductor's fused C++ kernels called
    from its C++ wrapper (no Python between the ~10 calls per layer), with inductor's freezing on.
    The step's time split with and without these: docs/infer.md (from the infer record's profile)."""
    # dynamic=False: one static graph per batch size (automatic dynamic shapes would give slower kernels); the
    # graphs of every model and batch size compiled in one process share decode_step's cache, whose default
    # limit of 8 entries a bench's rows exceed (past it dynamo would silently run the step eagerly)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if torch.cuda.is_available():
        return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    opts = {"cpp_wrapper": True, "freezing": True, "guard_filter_fn": _first_layer_weight_guards}
    return torch.compile(decode_step, fullgraph=True, dynamic=False, options=opts)


_LATER_LAYER = re.compile(r"layers\W+(?:_modules\W+)?(?!0(?!\d))\d+")   # layers.<n>, n > 0, in a guard's source


def _first_layer_weight_guards(entries) -> list[bool]:
    """Dynamo's guards minus the tensor checks on the weights of layers 1..L-1: a few hundred checks every
    step, a visible share of a small model's step (the A/B is in the commit that added this filter). The first
    layer's weights, the embedding, head and norms, every layer's KV cache and every non-tensor guard (module
    types, layer count) stay: Transformer builds every layer from the one ModelArgs (prune.py too), so the
    first layer's shapes and dtypes stand for all of them, and a model of other shapes (a pruned one) gets its
    own graph -- the test that alternates a model and its pruned copy. Dropping every weight guard, as this
    path once did, sent the pruned model to its parent's graph."""
    return [e.guard_type != "TENSOR_MATCH" or "kv_cache" in e.name
            or not e.orig_guard.source.is_unspecialized_nn_module() or not _LATER_LAYER.search(e.name)
            for e in entries]


def prefill(model: Transformer, idx, key_valid):
    """The whole prompt at once: idx (B, T) into slots 0..T-1 -> logits of the last position (B, V)."""
    T = idx.shape[1]
    input_pos = torch.arange(T, device=idx.device)
    mask = None
    if key_valid is not None:  # a query sees real slots up to itself, and always itself (pad rows stay finite)
        slots = torch.arange(key_valid.shape[1], device=idx.device)
        causal = slots <= input_pos[:, None]                                          # (T, S)
        mask = (causal & (key_valid[:, None, :] | (slots == input_pos[:, None])))[:, None]  # (B, 1, T, S)
    return model(idx, input_pos, mask, last_only=True, kv_len=None if mask is not None else T)[:, -1]


@torch.no_grad()
def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_ids=(), on_token=None, attention_mask: torch.Tensor | None = None,
             decode_fn=None) -> torch.Tensor:
    """input_ids (B, T), left-padded when B > 1 with attention_mask (B, T) 1 = real token.

    Returns (B, T + n) tokens, n <= max_new_tokens; after a row emits a stop id its remaining positions
    hold stop_ids[0]; n stops early once every row has stopped. on_token(tokens (B,)) is called per step.
    decode_fn: `compile_decode()` for the compiled step (default: eager decode_step).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    ctx = model.args.max_seq_len
    if T > ctx:
        raise ValueError(f"prompt of {T} tokens is longer than the model's context of {ctx}")
    if max_new_tokens < 1 or T + max_new_tokens > ctx:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 and fit the context: "
                         f"{T} prompt + {max_new_tokens} new > {ctx} positions")
    device = input_ids.device
    if model.max_batch_size < B or model.max_seq_length < T + max_new_tokens:
        # round up so nearby lengths reuse the buffers (and a compiled step is not recompiled)
        # (never shrink: a smaller cache would reallocate, and recompile, on the next longer call)
        model.setup_caches(max(B, model.max_batch_size),
                           max(model.max_seq_length, min(ctx, -(-(T + max_new_tokens) // 64) * 64)))
    S = model.max_seq_length
    key_valid = None
    if attention_mask is not None and not bool(attention_mask.all()):
        key_valid = torch.ones(B, S, dtype=torch.bool, device=device)
        key_valid[:, :T] = attention_mask.bool()
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    step = decode_fn or decode_step
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    pad = int(stops[0]) if len(stops) else 0

    out = torch.full((B, T + max_new_tokens), pad, dtype=torch.long, device=device)
    out[:, :T] = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    last = torch.full((B,), max_new_tokens - 1, dtype=torch.long, device=device)   # step each row stopped
    input_pos = torch.tensor([T], device=device)
    logits = prefill(model, input_ids, key_valid)
    n = max_new_tokens
    with contextlib.ExitStack() as steady:
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p, gen)                      # (B,)
            if len(stops):
                tok = tok.masked_fill(done, pad)
                hit = torch.isin(tok, stops) & ~done
                last = torch.where(hit, i, last)
                done |= hit
            out[:, T + i] = tok
            if on_token is not None:
                on_token(tok)
            if i == max_new_tokens - 1:
                break
            if len(stops) and (i + 1) % STOP_CHECK_EVERY == 0 and bool(done.all()):   # the one host sync
                n = i + 1
                break
            logits = step(model, tok[:, None], input_pos, key_valid)
            input_pos += 1
            if i == 0 and decode_fn is not None:
                # the first step ran dynamo's guards (and compiled on a miss); every later step of this loop
                # calls the same graph (same model, shapes, dtypes, cache), so only the guards that tell the
                # cached graphs apart still run: a share of a small model's step (the A/B is in the commit)
                steady.enter_context(torch.compiler.set_stance(skip_guard_eval_unsafe=True))
    if len(stops) and bool(done.all()):
        n = int(last.max()) + 1
    return out[:, :T + n]


# ---------------------------------------------------------------- CLI
@dataclass
class GenConfig:
    model: str = "stories260k"
    """stories260k, smollm2-135m, a HF folder or hub name"""
    prompt: str = "Once upon a time"
    """the prompt text"""
    max_new_tokens: int = 100
    """tokens to generate"""
    temperature: float = 0.0
    """0 = greedy"""
    top_k: int = 0
    """keep the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """nucleus sampling mass (1 = off)"""
    seed: int = 0
    """sampling seed"""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N"""
    dtype: str = "fp32"
    """fp32, bf16 or fp16 (CUDA)"""
    compile: bool = False
    """torch.compile the decode step"""
    chat: bool = False
    """wrap the prompt in the tokenizer's chat template"""


def main(argv=None) -> int:
    cfg = config.parse(GenConfig, argv, prog="python -m projects.infer.generate",
                       description=__doc__.splitlines()[0])
    try:
        device = get_device(cfg.device)
        dtype = autocast_dtype(device, cfg.dtype) or torch.float32
        model, tok = load(cfg.model, device, dtype)
        text = cfg.prompt
        if cfg.chat:
            text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids.to(device)
        stream = []

        def on_token(t):  # streaming: print each token as it comes (a host sync, by choice)
            if not stream:
                sys.stdout.write(text)  # only once generation has started, so errors come alone
            stream.append(int(t[0]))
            sys.stdout.write(tok.decode(stream)[len(tok.decode(stream[:-1])):])
            sys.stdout.flush()

        t0 = time.perf_counter()
        out = generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                       top_p=cfg.top_p if cfg.top_p < 1 else None, seed=cfg.seed,
                       stop_ids=[tok.eos_token_id] if tok.eos_token_id is not None else (), on_token=on_token,
                       decode_fn=compile_decode() if cfg.compile else None)
        synchronize(device)
        dt = time.perf_counter() - t0
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = out.shape[1] - ids.shape[1]
    print(f"\n[{n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s incl. prefill{' and compile' if cfg.compile else ''}]",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
