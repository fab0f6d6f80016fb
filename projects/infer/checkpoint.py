"""Checkpoints of quantized models: what quantize.py's module swaps produce, saved and loaded exactly.

`save_quantized` writes model.safetensors (integer tensors as stored, no kernel layouts) and quant.json
(scheme, group size, per-module kind, model args, sha256 and byte size of the weights file), each atomically;
`load_quantized` builds the model on meta, applies the same module swaps and loads with assign=True; a file
whose size/hash, keys, shapes or dtypes do not match its JSON raises one clear ValueError.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from common.files import file_sha256, write_atomic
from projects.infer.model import ModelArgs, Transformer
from projects.infer.quantize import Int4Linear, Int8Embedding, Int8Linear, W8A8Linear, block_linears

FORMAT_VERSION = 1


def _kinds(model: Transformer) -> dict[str, str]:
    kinds = {}
    for name, mod in model.named_modules():
        for cls, k in ((Int8Linear, "int8"), (Int4Linear, "int4"), (W8A8Linear, "w8a8")):
            if type(mod) is cls:
                kinds[name] = k
    if isinstance(model.tok_embeddings, Int8Embedding):
        kinds["tok_embeddings"] = "int8_tied"
    return kinds


def save_quantized(model: Transformer, out_dir: str | Path) -> Path:
    """out_dir/model.safetensors + out_dir/quant.json (scheme, per-module kind, args, file hash); atomic."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.output, "weight", None) is getattr(model.tok_embeddings, "weight", None):
        sd.pop("output.weight", None)  # tied float head: one copy
    kinds = _kinds(model)
    group = getattr(model, "quant_scheme", {}).get("group_size")
    tensors = out_dir / "model.safetensors"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"format": "pt", "mlsys_quant": str(FORMAT_VERSION)})
        os.replace(tmp, tensors)
    finally:
        Path(tmp).unlink(missing_ok=True)
    meta = {"format_version": FORMAT_VERSION, **getattr(model, "quant_scheme", {"scheme": "none"}),
            "group_size": group, "modules": kinds, "model_args": asdict(model.args),
            "dtype": str(model.norm.weight.dtype).removeprefix("torch."),
            "tensors": {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                        for k, v in sd.items()},
            "file_bytes": tensors.stat().st_size, "sha256": file_sha256(tensors)}
    write_atomic(out_dir / "quant.json", json.dumps(meta, indent=1) + "\n")
    return out_dir


def load_quantized(path: str | Path, device="cpu") -> Transformer:
    """The model saved by save_quantized; ValueError (one line) on a missing, truncated or mismatched file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    meta_p, tensors = path / "quant.json", path / "model.safetensors"
    if not meta_p.is_file() or not tensors.is_file():
        raise ValueError(f"{path} is not a quantized checkpoint (needs quant.json and model.safetensors)")
    try:
        meta = json.loads(meta_p.read_text())
        scheme, kinds, args = meta["scheme"], meta["modules"], ModelArgs(**meta["model_args"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{meta_p} is malformed ({type(e).__name__}: {e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_p}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    size = tensors.stat().st_size
    if size != meta["file_bytes"]:
        raise ValueError(f"{tensors} has {size} bytes, quant.json says {meta['file_bytes']} (truncated or replaced)")
    if file_sha256(tensors) != meta["sha256"]:
        raise ValueError(f"{tensors} does not match the sha256 in quant.json (corrupt or replaced)")
    try:
        # safetensors hands back tensors at arbitrary (here 8-byte) offsets of one buffer; the CPU int8
        # kernel (_weight_int8pack_mm, torch 2.14) segfaults on such unaligned weights, so each tensor gets
        # its own (64-byte aligned) allocation
        sd = {k: v.clone() for k, v in load_file(tensors, device=str(device)).items()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{tensors} cannot be read: {e}") from None
    dtype = getattr(torch, meta["dtype"])
    with torch.device("meta"):
        model = Transformer(args)
    gs = meta.get("group_size")
    for name, parent, attr, lin in block_linears(model):
        kind = kinds.get(name)
        with torch.device("meta"):
            if kind == "int8":
                m = Int8Linear(lin.in_features, lin.out_features, dtype)
            elif kind == "int4":
                m = Int4Linear(lin.in_features, lin.out_features, gs, dtype)
            elif kind == "w8a8":
                m = W8A8Linear(lin.in_features, lin.out_features, dtype)
            else:
                continue
        setattr(parent, attr, m)
    if kinds.get("output") == "int8":
        with torch.device("meta"):
            model.output = Int8Linear(args.dim, args.vocab_size, dtype)
        if kinds.get("tok_embeddings") == "int8_tied":
            model.tok_embeddings = Int8Embedding(model.output)
    expected = model.state_dict()
    if args.tie_embeddings and "output.weight" in expected and "output.weight" not in sd:
        expected.pop("output.weight")
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        raise ValueError(f"{tensors} does not match scheme {scheme!r}: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in expected.items():
        # integer tensors must match exactly; float ones (norms, scales) may be any float dtype
        int_mismatch = not (v.is_floating_point() and sd[k].is_floating_point()) and v.dtype != sd[k].dtype
        if v.shape != sd[k].shape or int_mismatch:
            raise ValueError(f"{tensors}: {k} is {sd[k].dtype} {tuple(sd[k].shape)}, scheme {scheme!r} "
                             f"needs {v.dtype} {tuple(v.shape)}")
    model.load_state_dict(sd, strict=False, assign=True)
    if args.tie_embeddings and not isinstance(model.output, Int8Linear):
        model.output.weight = model.tok_embeddings.weight
    from projects.infer.model import rope_inv_freq
    model.inv_freq = rope_inv_freq(args).to(device)
    model.quant_scheme = {k: meta[k] for k in ("scheme", "group_size", "smoothquant") if k in meta}
    return model.eval()
