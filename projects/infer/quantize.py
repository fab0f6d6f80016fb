"""Weight quantization applied from outside to the plain model, with real low-bit storage and kernels.

    from projects.infer.quantize import quantize_int8, quantize_int4, quantize_w8a8
    from projects.infer.checkpoint import save_quantized, load_quantized
    model = from_hf(path, dtype=torch.float32)     # quantize from fp32 masters
    quantize_int4(model, group_size=128)           # swaps nn.Linear for Int4Linear in place
    model.to(torch.bfloat16)                       # norms and scales to the compute dtype
    save_quantized(model, "out/")                  # out/model.safetensors + out/quant.json (checkpoint.py)

Schemes (each replaces `nn.Linear` modules; the model code never knows):

- int8 weight-only (`Int8Linear`): per output channel symmetric, scale = max|w_row| / 127, q = round(w / s)
  in [-127, 127]; |w - q*s| <= s/2 per element. CPU: `torch._weight_int8pack_mm(x_bf16, q, s)` (reads int8
  weights, fuses the scale); elsewhere the dequantized matmul `F.linear(x, q.to(x.dtype)) * s`, which
  inductor fuses into one int8-reading kernel (gpt-fast's path). The tied embedding/output head is
  quantized once and shared (`Int8Embedding` looks rows up from the same int8 matrix).
- int4 weight-only group-wise RTN (`Int4Linear`): per (row, group of `group_size` input columns) asymmetric
  min/max, scale = (max - min) / 15, q = round((w - min) / s) in [0, 15], dequantized as
  (q - 8) * s + z with z = min + 8 s (torch's int4 kernels' convention); |w - ŵ| <= s/2. Stored as two
  nibbles per byte (`pack_int4`: even column in the high nibble), repacked at load time into the kernel's
  own tiled layout: `_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu` on CPU,
  `_convert_weight_to_int4pack` + `_weight_int4pack_mm` on CUDA. Widths that are not a multiple of the group
  (SmolLM2's 576 with g128) are zero-padded: the last group holds the remaining columns only, and the
  activation is padded with zeros, so the padding never contributes. The head stays int8 (as llama.cpp keeps
  its output tensor at higher precision): it is tied to the embedding, which needs per-row lookups.
- W8A8 dynamic (`W8A8Linear`): int8 per-channel weights and int8 activations quantized on the fly; optional
  SmoothQuant (`smoothquant_scales`, alpha = 0.5) divides activation channel j by
  s_j = max|x_j|^a / max|w_j|^(1-a) and multiplies the weight's column j by it. Kernel: `torch._int_mm`
  (int8 x int8 -> int32) with per-token activation scales on CUDA and on CPUs with AMX int8 or AVX-512 VNNI;
  on AVX2-only x86 CPUs `_int_mm` has no vectorised path (far slower than fp32), so the CPU path there is
  FBGEMM's dynamic int8 linear (`quantized.linear_dynamic`: per-tensor uint8 activations, AVX2 `vpmaddubsw`,
  7-bit activation range to avoid its int16 saturation). Per-tensor activation scales cost SmolLM2 far more
  perplexity than per-token ones (its activations have large per-token outliers): the quantization record
  says which kernel ran on its machine.

Checkpoints of quantized models: checkpoint.py.

Calibration data (`calibration_ids`): random windows of tiny-shakespeare (default), WikiText-2 *valid* or
WordNet glosses, never WikiText-2 test, which perplexity is reported on.
"""
from __future__ import annotations

import random
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.env import assets_root
from projects.infer.model import Transformer


# ---------------------------------------------------------------- int8 per-channel symmetric
def int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8 in [-127, 127], scales (N,) fp32, with w ≈ q * scales[:, None]."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (q * s)^T with q (N, K) int8 and s (N,) stored; the matmul reads int8 weights."""

    def __init__(self, in_features: int, out_features: int, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, lin.weight.dtype, lin.weight.device)
        q, s = int8_per_channel(lin.weight.detach())
        m.qweight.copy_(q)
        m.scales.copy_(s)
        return m

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x):
        shape = x.shape
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and self.in_features % 8 == 0:
            # CPU kernel: int8 weights read once, scale fused. Its fp32 path is unvectorised (much slower
            # here), so fp32 goes through the dequantized matmul below; K % 8 != 0 crashes it (torch 2.14,
            # stories260K's 172-wide w2), so such layers do too
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scales)
            return y.view(*shape[:-1], self.out_features)
        return F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)


class Int8Embedding(nn.Module):
    """Rows of the shared int8 matrix (tied with the Int8Linear head): emb[i] = q[i] * s[i]."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.head = [head]  # a list so the head is not registered twice as a submodule

    def forward(self, idx):
        h = self.head[0]
        return h.qweight[idx].to(h.scales.dtype) * h.scales[idx, None]


# ---------------------------------------------------------------- int4 group-wise asymmetric
def int4_groupwise(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) uint8 in [0, 15], scales (N, G), zeros (N, G), G = ceil(K / group_size);
    ŵ = (q - 8) * scale + zero per group (the last group may be narrower)."""
    scales, zeros = int4_qparams(w, group_size)
    return int4_quantize_with(w, scales, zeros, group_size), scales, zeros


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, group_size), padded on the right by repeating the last column (no new range)."""
    N, K = w.shape
    G = -(-K // group_size)
    if G * group_size != K:
        w = torch.cat([w, w[:, -1:].expand(N, G * group_size - K)], dim=1)
    return w.view(N, G, group_size)


def int4_qparams(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None):
    """Asymmetric min/max (optionally shrunk by clip (N, G) in (0, 1]) -> scales, zeros (N, G) fp32."""
    g = _grouped(w.float(), group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    zeros = lo + 8 * scales
    return scales, zeros


def int4_quantize_with(w, scales, zeros, group_size):
    """q (N, K) uint8 for given per-group scales/zeros (N, G)."""
    N, K = w.shape
    s = scales.repeat_interleave(group_size, 1)[:, :K]
    lo = (zeros - 8 * scales).repeat_interleave(group_size, 1)[:, :K]
    return torch.round((w.float() - lo) / s).clamp(0, 15).to(torch.uint8)


def int4_dequantize(q, scales, zeros, group_size):
    K = q.shape[1]
    s = scales.float().repeat_interleave(group_size, 1)[:, :K]
    z = zeros.float().repeat_interleave(group_size, 1)[:, :K]
    return (q.float() - 8) * s + z


def fake_int4(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """w rounded to its int4 grid (per group of input channels, asymmetric) and back, in w's dtype: what an
    int4 layer computes with. Used by AWQ's searches and by QAT's forward."""
    s, z = int4_qparams(w.detach(), group_size, clip)
    return int4_dequantize(int4_quantize_with(w, s, z, group_size), s, z, group_size).to(w.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15], K even -> (N, K/2) uint8: column 2j in the high nibble, 2j+1 in the low."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4: (N, K/2) uint8 -> (N, K) uint8."""
    return torch.stack([p >> 4, p & 0xF], dim=-1).view(p.shape[0], -1)


class Int4Linear(nn.Module):
    """int4 group-wise weight-only linear. Stored: packed (N, Kp/2) uint8, scales/zeros (N, G); Kp = G * gs."""

    def __init__(self, in_features, out_features, group_size, dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        G = -(-in_features // group_size)
        self.padded_in = G * group_size
        self.register_buffer("qweight", torch.empty(out_features, self.padded_in // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.empty(out_features, G, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.empty(out_features, G, dtype=dtype, device=device))
        self._kernel = None  # (device, dtype, packed weight in the kernel's layout, scales_and_zeros)

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> "Int4Linear":
        """q (N, K) in [0, 15] plus (N, G) params -> stored buffers (columns padded with 8, i.e. ŵ = z)."""
        if q.shape[1] < self.padded_in:
            q = F.pad(q.to(torch.uint8), (0, self.padded_in - q.shape[1]), value=8)
        self.qweight.copy_(pack_int4(q))
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)
        self._kernel = None
        return self

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int) -> "Int4Linear":
        m = cls(lin.in_features, lin.out_features, group_size, lin.weight.dtype, lin.weight.device)
        return m.set_quantized(*int4_groupwise(lin.weight.detach(), group_size))

    def dequantize(self) -> torch.Tensor:
        q = unpack_int4(self.qweight)[:, :self.in_features]
        return int4_dequantize(q, self.scales, self.zeros, self.group_size)

    def _prepare(self, x):
        """The kernel's tiled weight layout, built once per device/dtype (not stored in checkpoints)."""
        key = (x.device, x.dtype)
        if self._kernel is not None and self._kernel[0] == key:
            return self._kernel
        w, sz = None, None
        fast = x.dtype == torch.bfloat16 and self.out_features % 8 == 0
        if fast and x.device.type == "cpu":
            w = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight).to(torch.int32), 1)
        elif fast and x.device.type == "cuda" and self.padded_in % 64 == 0:
            inner_k_tiles = 8 if self.padded_in % 256 == 0 else (4 if self.padded_in % 128 == 0 else 2)
            w = torch.ops.aten._convert_weight_to_int4pack(self.qweight.contiguous(), inner_k_tiles)
        if w is not None:
            # (G, N, 2): scale and zero of each group, as the kernels take them
            sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(x.dtype).contiguous()
        self._kernel = (key, w, sz)
        return self._kernel

    def forward(self, x):
        _, w, sz = self._prepare(x)
        shape = x.shape
        if w is None:  # no int4 kernel for this device/dtype/shape: dequantized matmul (correct, slower)
            return F.linear(x, self.dequantize().to(x.dtype))
        x2 = x.reshape(-1, shape[-1])
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))  # zero activations meet the pad columns
        if x.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, w, self.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, w, self.group_size, sz)
        return y.view(*shape[:-1], self.out_features)


# ---------------------------------------------------------------- W8A8 dynamic
def _int_mm_fast_on_cpu() -> bool:
    """Whether this CPU has int8 dot-product instructions that `torch._int_mm`'s CPU path (oneDNN) uses: AMX
    int8 or AVX-512 VNNI. Without them (AVX2 only) it has no vectorised path."""
    from common.provenance import cpu_flags
    return bool({"amx_int8", "avx512_vnni"} & set(cpu_flags()))


INT_MM_FAST = _int_mm_fast_on_cpu()   # read once: a compiled W8A8 forward sees a constant, not a file read


class W8A8Linear(nn.Module):
    """int8 weights (N, K) per channel, int8 activations quantized per call; optional SmoothQuant divisor."""

    def __init__(self, in_features, out_features, dtype=torch.bfloat16, device=None, kernel: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=dtype, device=device))
        self.kernel = kernel  # "auto" | "int_mm" | "fbgemm"
        self._packed = None

    @classmethod
    def from_linear(cls, lin: nn.Linear, smooth: torch.Tensor | None = None, kernel="auto") -> "W8A8Linear":
        m = cls(lin.in_features, lin.out_features, lin.weight.dtype, lin.weight.device, kernel)
        w = lin.weight.detach().float()
        if smooth is not None:
            w = w * smooth.float()[None, :]     # column j scaled up by s_j; the activation divided by it
            m.smooth.copy_(smooth)
        q, s = int8_per_channel(w)
        m.qweight.copy_(q)
        m.scales.copy_(s)
        return m

    def dequantize(self) -> torch.Tensor:  # the effective float weight (smoothing undone)
        return self.qweight.float() * self.scales.float()[:, None] / self.smooth.float()[None, :]

    def _use_int_mm(self, x) -> bool:
        if self.kernel != "auto":
            return self.kernel == "int_mm"
        return x.device.type == "cuda" or INT_MM_FAST

    def forward(self, x):
        shape = x.shape
        x2 = (x.reshape(-1, shape[-1]).float() / self.smooth.float())                  # (M, K)
        if self._use_int_mm(x):
            xs = (x2.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)             # per token (M, 1)
            xq = torch.round(x2 / xs).clamp(-127, 127).to(torch.int8)
            M = xq.shape[0]
            if M <= 16:  # _int_mm wants M > 16 on CUDA: pad rows (zeros) and drop them after
                xq = F.pad(xq, (0, 0, 0, 17 - M))
            acc = torch._int_mm(xq, self.qweight.t())[:M]                               # (M, N) int32
            y = acc.float() * xs * self.scales.float()
        else:
            if self._packed is None:
                with warnings.catch_warnings():  # quantized-tensor constructors warn about their future
                    warnings.simplefilter("ignore")
                    wq = torch._make_per_channel_quantized_tensor(
                        self.qweight.cpu(), self.scales.double().cpu(),
                        torch.zeros(self.out_features, dtype=torch.long), 0)
                    self._packed = torch.ops.quantized.linear_prepack(wq, None)
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, True)
        return y.to(x.dtype).view(*shape[:-1], self.out_features)


# ---------------------------------------------------------------- swapping modules
def block_linears(model: Transformer):
    """(qualified name, parent module, attribute, nn.Linear) for every linear inside the blocks."""
    out = []
    for name, mod in model.layers.named_modules():
        for attr, child in mod.named_children():
            if isinstance(child, nn.Linear):
                out.append((f"layers.{name}.{attr}" if name else f"layers.{attr}", mod, attr, child))
    return out


def _quantize_head_int8(model: Transformer) -> None:
    """int8 head; when tied, the embedding looks up rows of the same int8 matrix."""
    tied = model.output.weight is model.tok_embeddings.weight
    model.output = Int8Linear.from_linear(model.output)
    if tied:
        model.tok_embeddings = Int8Embedding(model.output)


def quantize_int8(model: Transformer, head: bool = True) -> Transformer:
    """int8 weight-only per channel on every block linear (and the head/tied embedding)."""
    for _, parent, attr, lin in block_linears(model):
        setattr(parent, attr, Int8Linear.from_linear(lin))
    if head:
        _quantize_head_int8(model)
    model.quant_scheme = {"scheme": "int8"}
    return model


def quantize_int4(model: Transformer, group_size: int = 128, head: bool = True) -> Transformer:
    """int4 group-wise RTN on every block linear; the (tied) head int8."""
    for _, parent, attr, lin in block_linears(model):
        setattr(parent, attr, Int4Linear.from_linear(lin, group_size))
    if head:
        _quantize_head_int8(model)
    model.quant_scheme = {"scheme": "int4", "group_size": group_size}
    return model


def apply_int4_weights(model: Transformer, qparams: dict, group_size: int, head: bool = True) -> Transformer:
    """Swap in Int4Linear from precomputed (q, scales, zeros) per linear name (GPTQ, AWQ, QAT results)."""
    for name, parent, attr, lin in block_linears(model):
        q, s, z = qparams[name]
        m = Int4Linear(lin.in_features, lin.out_features, group_size, lin.weight.dtype, lin.weight.device)
        setattr(parent, attr, m.set_quantized(q, s, z))
    if head:
        _quantize_head_int8(model)
    model.quant_scheme = {"scheme": "int4", "group_size": group_size}
    return model


def quantize_w8a8(model: Transformer, smooth: dict[str, torch.Tensor] | None = None, head: bool = True,
                  kernel: str = "auto") -> Transformer:
    """W8A8 dynamic on every block linear (SmoothQuant divisors per linear name if given); head int8 WO
    (its input is the final norm's output, and the logits are what perplexity reads)."""
    for name, parent, attr, lin in block_linears(model):
        s = smooth.get(name) if smooth else None
        setattr(parent, attr, W8A8Linear.from_linear(lin, s, kernel))
    if head:
        _quantize_head_int8(model)
    model.quant_scheme = {"scheme": "w8a8", "smoothquant": bool(smooth)}
    return model


@torch.no_grad()
def input_absmax(model: Transformer, ids: torch.Tensor, batch: int = 8) -> dict[str, torch.Tensor]:
    """Per input channel max |x| seen by each block linear over calibration ids (n, T)."""
    stats, hooks = {}, []
    for name, _, _, lin in block_linears(model):
        def hook(mod, inp, out, name=name):
            m = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0).float()
            stats[name] = torch.maximum(stats[name], m) if name in stats else m
        hooks.append(lin.register_forward_hook(hook))
    try:
        for i in range(0, ids.shape[0], batch):
            model(ids[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    return stats


def smoothquant_scales(model: Transformer, ids: torch.Tensor, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """SmoothQuant divisors s_j = max|x_j|^alpha / max|w_j|^(1-alpha) per block linear (from calibration)."""
    amax = input_absmax(model, ids)
    out = {}
    for name, _, _, lin in block_linears(model):
        wmax = lin.weight.detach().float().abs().amax(0).clamp(min=1e-5)
        s = (amax[name].clamp(min=1e-5).pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
        out[name] = s
    return out


# ---------------------------------------------------------------- calibration data
WORDNET_PASSAGES = 20000  # a seeded sample of the ~166k glosses/examples: ~0.3M tokens, as many as the other two


def calibration_text(source: str = "tinyshakespeare") -> str:
    """Calibration / QAT / distillation text: tiny-shakespeare, WikiText-2 *valid* or WordNet glosses and
    examples (a seeded sample of WORDNET_PASSAGES, one per line; Debian wordnet-base) -- never WikiText-2
    test, which perplexity is reported on."""
    if source == "wordnet":
        from projects.serve.index import wordnet_passages  # FileNotFoundError naming the package when absent
        passages = [t for t, _ in wordnet_passages()]
        random.Random(0).shuffle(passages)
        return "\n".join(passages[:WORDNET_PASSAGES])
    files = {"tinyshakespeare": assets_root() / "text" / "tinyshakespeare.txt",
             "wikitext2-valid": assets_root() / "text" / "wikitext-2" / "valid.txt"}
    if source not in files:
        raise ValueError(f"unknown calibration source {source!r}; choose {', '.join(files)}, wordnet "
                         "(WikiText-2 test is what perplexity is reported on, so it is never used)")
    path = files[source]
    if not path.is_file():
        raise ValueError(f"calibration text not found at {path} (set MLSYS_ASSETS)")
    return path.read_text(encoding="utf-8")


def calibration_ids(tok, n_samples: int = 32, seq_len: int = 256, source: str = "tinyshakespeare",
                    seed: int = 0) -> torch.Tensor:
    """(n_samples, seq_len) token windows at random offsets of the calibration text (GPTQ's recipe)."""
    ids = torch.tensor(tok(calibration_text(source), add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() <= seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, ids.numel() - seq_len) for _ in range(n_samples)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def _storage(t: torch.Tensor):
    """The tensors that hold t's bytes: t itself, or the inner tensors of a wrapper subclass (torchao's
    quantized weights report data_ptr() 0 and the logical shape, not their int8/int4 storage)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    if is_traceable_wrapper_subclass(t):
        for name in t.__tensor_flatten__()[0]:
            yield from _storage(getattr(t, name))
    else:
        yield t


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers, shared tensors counted once (no KV cache); tensor
    subclasses (torchao) counted by their inner storage."""
    seen, total = set(), 0
    for p in list(model.parameters()) + [b for n, b in model.named_buffers() if "cache" not in n
                                         and not n.endswith("inv_freq")]:
        for t in _storage(p):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
