"""llama.cpp's block formats in our model: Q4_1 (4-bit, scale and minimum per 32) and Q8_0 (8-bit, scale per 32).

    from projects.infer.blockquant import quantize_q4_1, quantize_q8_0
    quantize_q4_1(model)      # block linears Q4_1, the (tied) head/embedding Q8_0: the GGUF's own recipe
    quantize_q8_0(model)      # everything Q8_0

Quantizers are llama.cpp's reference ones (ggml-quants.c, quantize_row_q4_1_ref / q8_0_ref), in torch:
- Q4_1: per block of 32, d = (max - min) / 15, m = min, q = round((w - m) / d) in [0, 15], d and m stored
  fp16; w ≈ d q + m. Applied to weights that already lie on a Q4_1 grid (the offline SmolLM2 is the GGUF's
  dequantized Q4_1), it gives back the file's blocks, so this is the GGUF's grid held exactly
  (tests/test_quantize.py checks it block by block against the file).
- Q8_0: per block of 32, d = max|w| / 127, q = round(w / d), d fp16; w ≈ d q.
Storage: the same bytes as the GGUF (Q4_1 0.625 bytes/weight, Q8_0 1.0625), in the layout the kernels read
(`pack_*`; `unpack_*` gives back the GGUF's rows): output rows in tiles of 16 (the last one zero-padded), and
per (tile, block of 32 columns) the tile's 16 x 32 values as 16 column pairs x 16 rows x 2, so one vector of
int16 is one column pair for all 16 rows (csrc/blockquant.cpp's `tile`). Q4_1 halves it: byte (c, row, e) holds pair c
in its low nibble and pair c + 8 in its high one. The scales d (and m) are (tiles, blocks, 16).

Compute: for small M (decode, short prompts) on x86 the C++ kernels in csrc/blockquant.cpp (integer dot products, the
activations rounded to int16 per block of 32); otherwise (long prefill, GPUs, no compiler) the weight is
dequantized to the activation dtype (on CPU by the C++ kernel, in one pass) and multiplied by `F.linear`, the
platform's GEMM (AMX/oneDNN on CPU).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from projects.infer import kernels

QK = 32
TILE = 16         # output rows per tile of the kernels' layout
# Up to this many activation rows the C++ kernel (its cost grows with the rows); beyond, the weight dequantized once
# and the platform GEMM (AMX/oneDNN), whose per-row cost is far lower. Where the two cross depends on the GEMM the
# CPU has (later without AMX); 32 keeps batched decode and short prompts on the kernel.
KERNEL_MAX_M = 32


def _blocks(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    if K % QK:
        raise ValueError(f"block formats need in_features % {QK} == 0, got {K}")
    return w.float().view(N, K // QK, QK)


def q4_1_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> qs (N, K/2) uint8, d (N, K/32) fp16, m (N, K/32) fp16 (llama.cpp's Q4_1 reference)."""
    b = _blocks(w)
    lo, hi = b.amin(-1), b.amax(-1)                                            # (N, G)
    d = (hi - lo) / 15
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = ((b - lo[..., None]) * inv[..., None] + 0.5).floor().clamp(0, 15).to(torch.uint8)   # (N, G, 32)
    qs = q[..., :16] | (q[..., 16:] << 4)                                      # (N, G, 16)
    return qs.reshape(w.shape[0], -1), d.half(), lo.half()


def q4_1_dequantize(qs, d, m, dtype=torch.float32) -> torch.Tensor:
    N, G = d.shape
    b = qs.view(N, G, 16)
    q = torch.cat([b & 0x0F, b >> 4], dim=-1).to(dtype)                        # (N, G, 32)
    return (q * d.to(dtype)[..., None] + m.to(dtype)[..., None]).view(N, G * QK)


def q8_0_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> qs (N, K) int8, d (N, K/32) fp16 (llama.cpp's Q8_0 reference)."""
    b = _blocks(w)
    d = b.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(b * inv[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), d.half()


def q8_0_dequantize(qs, d, dtype=torch.float32) -> torch.Tensor:
    N, G = d.shape
    return (qs.view(N, G, QK).to(dtype) * d.to(dtype)[..., None]).view(N, G * QK)


def _to_tiles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values -> (T, G, 16 column pairs, 16 rows, 2), rows zero-padded to a multiple of 16."""
    N, K = q.shape
    q = F.pad(q, (0, 0, 0, -N % TILE))
    return q.view(-1, TILE, K // QK, QK // 2, 2).permute(0, 2, 3, 1, 4)


def _from_tiles(t: torch.Tensor, N: int) -> torch.Tensor:
    """_to_tiles' inverse: (T, G, 16, 16, 2) -> (N, K)."""
    T, G = t.shape[:2]
    return t.permute(0, 3, 1, 2, 4).reshape(T * TILE, G * QK)[:N]


def _scale_tiles(d: torch.Tensor) -> torch.Tensor:
    """(N, G) block scales -> (T, G, 16)."""
    N, G = d.shape
    return F.pad(d, (0, 0, 0, -N % TILE)).view(-1, TILE, G).transpose(1, 2).contiguous()


def _scale_rows(d: torch.Tensor, N: int) -> torch.Tensor:
    return d.transpose(1, 2).reshape(-1, d.shape[1])[:N]


def pack_q4_1(qs, d, m):
    """GGUF rows qs (N, K/2), d, m (N, K/32) -> the kernels' tiles: qs (T, K/32, 256), d, m (T, K/32, 16)."""
    N, G = d.shape
    b = qs.view(N, G, 16)
    q = _to_tiles(torch.cat([b & 0x0F, b >> 4], -1).view(N, G * QK))        # (T, G, 16 pairs, 16 rows, 2)
    packed = q[:, :, :8] | (q[:, :, 8:] << 4)                                  # pairs c and c + 8 share bytes
    return packed.reshape(q.shape[0], G, 256), _scale_tiles(d), _scale_tiles(m)


def unpack_q4_1(qs, d, m, N: int):
    """pack_q4_1's inverse: the GGUF's rows for the first N outputs."""
    T, G, _ = qs.shape
    b = qs.view(T, G, 8, TILE, 2)
    q = _from_tiles(torch.cat([b & 0x0F, b >> 4], 2), N).view(N, G, QK)      # (N, G, 32) in column order
    return (q[..., :16] | (q[..., 16:] << 4)).view(N, G * 16), _scale_rows(d, N), _scale_rows(m, N)


def pack_q8_0(qs, d):
    """GGUF rows qs (N, K), d (N, K/32) -> tiles qs (T, K/32, 512), d (T, K/32, 16)."""
    q = _to_tiles(qs)
    return q.reshape(q.shape[0], q.shape[1], 512), _scale_tiles(d)


def unpack_q8_0(qs, d, N: int):
    T, G, _ = qs.shape
    return _from_tiles(qs.view(T, G, QK // 2, TILE, 2), N), _scale_rows(d, N)


class _BlockLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        if in_features % QK:
            raise ValueError(f"block formats need in_features % {QK} == 0, got {in_features}")
        self.in_features, self.out_features = in_features, out_features

    def _kernel_ok(self, x2: torch.Tensor) -> bool:
        return x2.device.type == "cpu" and x2.shape[0] <= KERNEL_MAX_M and kernels.available()

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._kernel_ok(x2):
            y = self._kernel(x2)
        else:
            # dequantized in fp32, then cast: d and m are fp16, which bf16 arithmetic would round further
            y = F.linear(x2, self.dequantize(x.dtype))
        return y.view(*shape[:-1], self.out_features)


class Q4_1Linear(_BlockLinear):
    """y = x @ ŵ^T with ŵ = d q + m per block of 32 input columns; buffers qs, d, m in the kernels' tiles."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features)
        T, G = -(-out_features // TILE), in_features // QK
        self.register_buffer("qs", torch.empty(T, G, 256, dtype=torch.uint8, device=device))
        self.register_buffer("d", torch.empty(T, G, TILE, dtype=torch.float16, device=device))
        self.register_buffer("m", torch.empty(T, G, TILE, dtype=torch.float16, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Q4_1Linear":
        mod = cls(lin.in_features, lin.out_features, lin.weight.device)
        for buf, val in zip((mod.qs, mod.d, mod.m), pack_q4_1(*q4_1_quantize(lin.weight.detach()))):
            buf.copy_(val)
        return mod

    def rows(self):
        """The GGUF's (qs, d, m) rows."""
        return unpack_q4_1(self.qs, self.d, self.m, self.out_features)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.qs.device.type == "cpu" and kernels.available():  # one threaded pass (prefill runs it per call)
            return torch.ops.mlsys.q4_1_dequantize(self.qs, self.d, self.m, self.out_features, dtype)
        return q4_1_dequantize(*self.rows()).to(dtype)  # fp32 arithmetic, then the cast

    def _kernel(self, x2):
        return torch.ops.mlsys.q4_1_linear(x2, self.qs, self.d, self.m, self.out_features)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts the float buffers; the block scales stay fp16 like the file's
        d, m = self.d, self.m
        super()._apply(fn, recurse)
        self.d, self.m = d.to(self.qs.device), m.to(self.qs.device)
        return self


class Q8_0Linear(_BlockLinear):
    """y = x @ ŵ^T with ŵ = d q per block of 32 input columns; buffers qs (int8) and d (fp16) in tiles."""

    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__(in_features, out_features)
        T, G = -(-out_features // TILE), in_features // QK
        self.register_buffer("qs", torch.empty(T, G, 512, dtype=torch.int8, device=device))
        self.register_buffer("d", torch.empty(T, G, TILE, dtype=torch.float16, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Q8_0Linear":
        mod = cls(lin.in_features, lin.out_features, lin.weight.device)
        for buf, val in zip((mod.qs, mod.d), pack_q8_0(*q8_0_quantize(lin.weight.detach()))):
            buf.copy_(val)
        return mod

    def rows(self):
        """The GGUF's (qs, d) rows."""
        return unpack_q8_0(self.qs, self.d, self.out_features)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        if self.qs.device.type == "cpu" and kernels.available():
            return torch.ops.mlsys.q8_0_dequantize(self.qs, self.d, self.out_features, dtype)
        return q8_0_dequantize(*self.rows()).to(dtype)

    def _kernel(self, x2):
        return torch.ops.mlsys.q8_0_linear(x2, self.qs, self.d, self.out_features)

    def _apply(self, fn, recurse=True):
        d = self.d
        super()._apply(fn, recurse)
        self.d = d.to(self.qs.device)
        return self


class Q8_0Embedding(nn.Module):
    """Rows of the tied Q8_0 head: emb[i] = d[i] q[i]; in the dtype of `dtype_like` (the model's norms)."""

    def __init__(self, head: Q8_0Linear, dtype: torch.dtype):
        super().__init__()
        self.head = [head]  # a list so the head is not registered twice as a submodule
        self.dtype = dtype

    def forward(self, idx):
        h = self.head[0]
        T, G = h.d.shape[:2]
        t, j = idx // TILE, idx % TILE                   # row idx is row j of tile t
        q = h.qs.view(T, G, QK // 2, TILE, 2)[t, :, :, j, :]                      # (*idx, G, 16 pairs, 2)
        rows = q.reshape(*idx.shape, G, QK).float() * h.d[t, :, j].float()[..., None]
        return rows.view(*idx.shape, G * QK).to(self.dtype)

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return super()._apply(fn, recurse)


def _quantize_head_q8_0(model) -> None:
    tied = model.output.weight is model.tok_embeddings.weight
    model.output = Q8_0Linear.from_linear(model.output)
    if tied:
        model.tok_embeddings = Q8_0Embedding(model.output, model.norm.weight.dtype)


def _quantize(model, layer: type, scheme: str):
    from projects.infer.quantize import block_linears
    for _, parent, attr, lin in block_linears(model):
        setattr(parent, attr, layer.from_linear(lin))
    _quantize_head_q8_0(model)
    model.quant_scheme = {"scheme": scheme}
    return model


def quantize_q4_1(model):
    """Q4_1 on every block linear, Q8_0 head (and tied embedding): the SmolLM2 GGUF's tensor types."""
    return _quantize(model, Q4_1Linear, "q4_1")


def quantize_q8_0(model):
    """Q8_0 on every block linear and the head (llama.cpp's Q8_0 file)."""
    return _quantize(model, Q8_0Linear, "q8_0")
