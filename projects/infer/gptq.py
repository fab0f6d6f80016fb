"""GPTQ (Frantar et al. 2022), written out: int4 group-wise weights that minimise each layer's output error.

    from projects.infer.gptq import gptq
    qparams = gptq(model, calib_ids, group_size=128)      # {linear name: (q, scales, zeros)}
    apply_int4_weights(model, qparams, 128)               # from projects.infer.quantize

Per linear W (N, K) with calibration inputs X (n, K): H = 2/n X^T X. Columns are quantized one at a time;
each column's rounding error e is spread over the not-yet-quantized columns through the inverse Hessian
(W[:, j:] -= e ⊗ Hinv[i, j:] / Hinv[i, i]), which is the optimal update for the layer-wise squared error
||XW^T - XŴ^T||². The pieces of the paper and its reference code:
- damping: H += damp * mean(diag H) * I (damp 0.01), and dead inputs (diag 0) get H_ii = 1, W_:i = 0;
- the Cholesky form: Hinv = chol(H^-1)^T (upper), numerically stable where the plain inverse is not;
- lazy batch updates: within a block of 128 columns updates stay inside the block; the rest of W is
  updated once per block (W[:, i2:] -= Err @ Hinv[i1:i2, i2:]), a matmul instead of 128 rank-1 updates;
- act-order: columns visited by decreasing diag(H) (the most-activated inputs first, while there is still
  room to absorb their error). With groups, a column's group is the group of its ORIGINAL index, so the
  result keeps the contiguous-group layout the int4 kernels read; group params are computed from the
  original weights before any update ("static groups", as GPTQModel's `static_groups=True`), because under
  act-order a group's columns are visited out of order.
Without act-order, a group's params are taken from the current (updated) weights when its first column is
reached, as in the reference code.

Model level (`gptq`): blocks in order; each block's linears see the outputs of the already-quantized
blocks before it (the calibration activations are propagated through the quantized model, as in the
paper's sequential procedure). The head stays int8 RTN in every int4 scheme here, so GPTQ and RTN rows
differ only in the block linears.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from projects.infer.quantize import block_linears, int4_dequantize, int4_qparams


def _quant_col(w, s, z):
    """w (N,) with per-row scale/zero (N,) -> (q uint8 in [0, 15], dequantized fp32)."""
    lo = z - 8 * s
    q = torch.round((w - lo) / s).clamp(0, 15)
    return q, (q - 8) * s + z


@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, group_size: int = 128, damp: float = 0.01,
                  act_order: bool = True, block_size: int = 128):
    """W (N, K), H (K, K) -> q (N, K) uint8, scales (N, G), zeros (N, G) fp32 (ŵ = (q - 8) s + z)."""
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    N, K = W.shape
    G = -(-K // group_size)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        # static groups: params from the (dead-zeroed) original weights, one set per original group
        scales, zeros = int4_qparams(W, group_size)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        scales, zeros = torch.zeros(N, G, device=W.device), torch.zeros(N, G, device=W.device)
        perm = torch.arange(K, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // group_size                              # (K,) group of each visited column
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros(N, K, dtype=torch.uint8, device=W.device)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()                               # (N, B) this block, updated in place
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = int(group_of[j])
            if not act_order and j % group_size == 0:          # first column of a group (in order)
                cols = W1[:, i:i + group_size] if i + group_size <= i2 - i1 else W[:, j:j + group_size]
                s, z = int4_qparams(cols, group_size)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            w, d = W1[:, i], Hinv1[i, i]
            q, wq = _quant_col(w, scales[:, g], zeros[:, g])
            Q[:, j] = q.to(torch.uint8)
            err = (w - wq) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # spread over the rest of the block
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                   # lazy batch update of the later columns
    inv = torch.argsort(perm)
    return Q[:, inv], scales, zeros


def layer_error(W, q, scales, zeros, group_size, X):
    """Mean squared output error of the quantized layer on inputs X (n, K): mean((X W^T - X Ŵ^T)^2)."""
    Wq = int4_dequantize(q, scales, zeros, group_size)
    return ((X.float() @ (W.float() - Wq).t()) ** 2).mean().item()


@torch.no_grad()
def block_inputs(model, ids: torch.Tensor) -> torch.Tensor:
    """(n, T, dim) inputs of block 0 for calibration ids (n, T)."""
    return model.tok_embeddings(ids)


@torch.no_grad()
def gptq(model, ids: torch.Tensor, group_size: int = 128, damp: float = 0.01, act_order: bool = True,
         batch: int = 8, progress: bool = True) -> dict:
    """GPTQ for every block linear of a float model on calibration ids (n, T); returns {name: (q, s, z)}.

    The model's block linears are replaced by their dequantized GPTQ weights as it goes (so later blocks
    see quantized inputs); call `apply_int4_weights` on the result for the packed int4 model.
    """
    x = block_inputs(model, ids)                                                  # (n, T, dim)
    cos, sin = model.rope(torch.arange(ids.shape[1], device=x.device), x.dtype)   # (1, 1, T, hd)
    out = {}
    linears = block_linears(model)
    for li, layer in enumerate(tqdm(model.layers, desc="gptq", disable=not progress, leave=False)):
        mine = [t for t in linears if t[0].startswith(f"layers.{li}.")]
        H = {name: torch.zeros(lin.in_features, lin.in_features, device=x.device) for name, _, _, lin in mine}

        def make_hook(name):
            def hook(mod, inp, _):
                a = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()        # (tokens, K)
                H[name].add_(a.t() @ a)
            return hook
        hooks = [lin.register_forward_hook(make_hook(name)) for name, _, _, lin in mine]
        for i in range(0, x.shape[0], batch):
            layer(x[i:i + batch], cos, sin, None, None)
        for h in hooks:
            h.remove()
        n_tok = x.shape[0] * x.shape[1]
        for name, _, _, lin in mine:
            q, s, z = gptq_quantize(lin.weight, 2 * H[name] / n_tok, group_size, damp, act_order)
            out[name] = (q, s, z)
            lin.weight.copy_(int4_dequantize(q, s, z, group_size).to(lin.weight.dtype))
        for i in range(0, x.shape[0], batch):                 # next block's inputs, through quantized weights
            x[i:i + batch] = layer(x[i:i + batch], cos, sin, None, None)
    return out


