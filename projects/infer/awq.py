"""AWQ (Lin et al. 2023): activation-aware per-channel scales, then int4 group-wise round-to-nearest.

    from projects.infer.awq import awq
    qparams = awq(model, calib_ids, group_size=128)       # scales folded into the float model in place
    apply_int4_weights(model, qparams, 128)

The few input channels with large activations matter most; scaling weight column j up by s_j (and the
activation down by s_j) shrinks its relative rounding error. Per block, for each linear group with a
foldable predecessor:
  attention_norm -> wqkv,   ffn_norm -> (w1, w3),   w3 (rows) -> w2
(SwiGLU's product is linear in w3's output, so w2's input scale folds into w3's rows; wo's input comes from
grouped-query attention, whose v heads are shared, so like AutoAWQ for GQA models it is not scaled).
Search: s = mean|x|^alpha over a grid of 20 alphas in [0, 1), normalised by sqrt(max s * min s), keeping the
alpha with the least MSE between the float group outputs and those of Q(W * s) / s on calibration inputs.
The scales are folded into the float weights (no runtime cost), then the clipping search (AWQ's auto_clip):
per (row, group) the min/max range shrunk by the factor in {1, 0.95, ..., 0.55} with least output error.
The block's output for the next block is computed in float (the scaling does not change the function).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from projects.infer.gptq import block_inputs
from projects.infer.quantize import fake_int4, int4_qparams, int4_quantize_with


@torch.no_grad()
def search_scale(X: torch.Tensor, weights: list[torch.Tensor], group_size: int, grid: int = 20,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """X (n, K) inputs shared by weights [(N_i, K)] -> the best per-channel scale s (K,).

    The 21 (n, K) x (K, sum N) products are most of AWQ's time; `dtype` bf16 runs them faster where the
    hardware does bf16 (the scales and fake quantization stay fp32; bf16's ~0.4% relative rounding is far
    below the int4 error being compared, and reference and candidates are rounded alike)."""
    W = torch.cat([w.float() for w in weights])                                   # (sum N, K)
    x_mean = X.float().abs().mean(0)                                              # (K,)
    X = X.to(dtype)
    ref = (X @ W.to(dtype).t()).float()
    best, best_s = float("inf"), torch.ones_like(x_mean)
    for a in range(grid):
        s = x_mean.pow(a / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = (((X @ (fake_int4(W * s, group_size) / s).to(dtype).t()).float() - ref) ** 2).mean().item()
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def search_clip(X: torch.Tensor, W: torch.Tensor, group_size: int, n_grid: int = 10) -> torch.Tensor:
    """Per (row, group) shrink factor of the min/max range minimising that group's output error -> (N, G)."""
    X, W = X.float(), W.float()
    N, K = W.shape
    G = -(-K // group_size)
    pad = G * group_size - K
    Xg = torch.nn.functional.pad(X, (0, pad)).view(X.shape[0], G, group_size)      # (n, G, gs)
    best_err = torch.full((N, G), float("inf"), device=W.device)
    best = torch.ones(N, G, device=W.device)
    for i in range(n_grid):
        r = 1 - 0.05 * i
        clip = torch.full((N, G), r, device=W.device)
        dW = torch.nn.functional.pad(W - fake_int4(W, group_size, clip), (0, pad)).view(N, G, group_size)
        err = torch.einsum("ngk,mgk->nmg", Xg, dW).pow(2).sum(0)                 # (N, G) output error
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, torch.full_like(best, r), best)
    return best


def _capture(layer, x, cos, sin, names_mods, batch, max_tokens):
    """Inputs (tokens, K) of the given linears while running the block on x (subsampled to max_tokens)."""
    got, hooks = {}, []
    for name, mod in names_mods:
        hooks.append(mod.register_forward_hook(
            lambda m, i, o, name=name: got.setdefault(name, []).append(i[0].reshape(-1, i[0].shape[-1]).float())))
    outs = []
    for i in range(0, x.shape[0], batch):
        outs.append(layer(x[i:i + batch], cos, sin, None, None))
    for h in hooks:
        h.remove()
    step = max(1, sum(t.shape[0] for t in got[names_mods[0][0]]) // max_tokens)
    return {k: torch.cat(v)[::step] for k, v in got.items()}, torch.cat(outs)


@torch.no_grad()
def awq(model, ids: torch.Tensor, group_size: int = 128, batch: int = 8, max_tokens: int = 4096,
        clip: bool = True, clip_tokens: int = 512, progress: bool = True,
        search_dtype: torch.dtype = torch.float32) -> dict:
    """AWQ on every block linear of a float model; folds the scales into it; returns {name: (q, s, z)}.
    `search_dtype`: the matmuls of the scale search (bf16 where the hardware does it: see search_scale)."""
    x = block_inputs(model, ids)
    cos, sin = model.rope(torch.arange(ids.shape[1], device=x.device), x.dtype)   # (1, 1, T, hd)
    out = {}
    for li, layer in enumerate(tqdm(model.layers, desc="awq", disable=not progress, leave=False)):
        at, ff = layer.attention, layer.feed_forward
        mods = [("wqkv", at.wqkv), ("wo", at.wo), ("w1", ff.w1), ("w3", ff.w3), ("w2", ff.w2)]
        X, _ = _capture(layer, x, cos, sin, mods, batch, max_tokens)
        # 1. scales, folded into the predecessor (function unchanged in float)
        s = search_scale(X["wqkv"], [at.wqkv.weight], group_size, dtype=search_dtype)
        layer.attention_norm.weight.div_(s.to(layer.attention_norm.weight.dtype))
        at.wqkv.weight.mul_(s.to(at.wqkv.weight.dtype))
        s = search_scale(X["w1"], [ff.w1.weight, ff.w3.weight], group_size, dtype=search_dtype)
        layer.ffn_norm.weight.div_(s.to(layer.ffn_norm.weight.dtype))
        ff.w1.weight.mul_(s.to(ff.w1.weight.dtype))
        ff.w3.weight.mul_(s.to(ff.w3.weight.dtype))
        s = search_scale(X["w2"], [ff.w2.weight], group_size, dtype=search_dtype)
        ff.w3.weight.div_(s[:, None].to(ff.w3.weight.dtype))
        ff.w2.weight.mul_(s.to(ff.w2.weight.dtype))
        # 2. clipping on the scaled weights with the scaled inputs, then RTN
        X, y = _capture(layer, x, cos, sin, mods, batch, max_tokens)
        for name, mod in mods:
            W = mod.weight.detach()
            # the clip search costs tokens x N x K per grid point: 512 tokens, as AWQ's auto_clip samples
            Xc = X[name][::max(1, X[name].shape[0] // clip_tokens)]
            c = search_clip(Xc, W, group_size) if clip else None
            sc, z = int4_qparams(W, group_size, c)
            out[f"layers.{li}.{'attention' if name in ('wqkv', 'wo') else 'feed_forward'}.{name}"] = (
                int4_quantize_with(W, sc, z, group_size), sc, z)
        x = y                                                    # float output feeds the next block
    return out
