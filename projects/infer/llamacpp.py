"""llama.cpp as a peer: the same GGUF, same threads, prompt and token count, measured by our harness.

    .venv/bin/python -m projects.infer.llamacpp                 # greedy text and tokens/s, SmolLM2 Q4_1

`llama-cpp-python` (pinned in pyproject's `llamacpp` extra) has no binary wheel on PyPI, so
`scripts/build_llamacpp.sh` builds it once from source (GGML_NATIVE: the peer at its best on this CPU) into a
wheel cache outside the clone, and `make bench` installs it from there. Without it the peer rows say so.

Everything goes through the low-level context (`llama_decode` of one batch per step, logits read in place):
no Python sampler chain and no copies of the logits, so the row measures llama.cpp, not the binding.
Perplexity is computed by OUR protocol (our tokenizer's ids and chunks; eval.py) from llama.cpp's logits,
so the two implementations are compared on one yardstick.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "llama-cpp-python not installed: run `bash scripts/build_llamacpp.sh` (builds once, ~10-20 min)"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version as v
    try:
        return v("llama_cpp_python")
    except PackageNotFoundError:
        return None


class LlamaCpp:
    """One llama.cpp context over a GGUF: greedy generation and full-sequence logits, on token ids."""

    def __init__(self, gguf: str | Path, threads: int, n_ctx: int = 1024, flash_attn: bool = True,
                 logits_all: bool = False):
        import llama_cpp
        if not Path(gguf).is_file():
            raise ValueError(f"{gguf} not found")
        self.lib = llama_cpp
        # n_batch = n_ubatch = n_ctx: a 512-token prompt is one decode call (one prefill pass), as ours
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=flash_attn, logits_all=logits_all,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = n_ctx
        self._ctx = self.llm._ctx.ctx

    def close(self) -> None:
        self.llm.close()

    def _decode(self, ids: list[int], pos0: int, all_logits: bool) -> None:
        # the binding's own batch (n_batch slots) and decode call: logits of the last token, or all
        self.llm._batch.set_batch(ids, n_past=pos0, logits_all=all_logits)
        self.llm._ctx.decode(self.llm._batch)

    def _last_logits(self) -> np.ndarray:
        ptr = self.lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,))

    def _clear(self) -> None:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self._ctx), True)

    def generate(self, ids: list[int], n: int) -> list[int]:
        """Greedy: exactly n new tokens after the prompt ids (no stop token), prompt in one decode call."""
        if len(ids) + n > self.n_ctx:
            raise ValueError(f"{len(ids)} + {n} tokens exceed the context of {self.n_ctx}")
        self._clear()
        self._decode(ids, 0, False)
        out = []
        for i in range(n):
            out.append(int(self._last_logits().argmax()))
            if i < n - 1:
                self._decode(out[-1:], len(ids) + i, False)
        return out

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (T,) -> logits (T, vocab) fp32 of one fresh sequence (perplexity through our protocol)."""
        T = ids.numel()
        if T > self.n_ctx:
            raise ValueError(f"{T} tokens exceed the context of {self.n_ctx}")
        self._clear()
        self._decode([int(t) for t in ids], 0, True)
        ptr = self.lib.llama_get_logits(self._ctx)
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(T, self.n_vocab))
        return torch.from_numpy(arr.copy())


def peer_gguf(fmt: str, threads: int) -> Path:
    """The GGUF of a peer row: q4_1 is the SmolLM2 file as shipped; q8_0 is llama.cpp's requantization of it."""
    from common.env import cache_root
    from projects.infer.weights import smollm2_gguf
    src = smollm2_gguf()
    if fmt == "q4_1":
        return src
    if fmt == "q8_0":
        return requantize(src, cache_root() / "llamacpp" / src.name.replace("Q4_1", "Q8_0"), "Q8_0", threads)
    raise ValueError(f"no llama.cpp peer for {fmt!r} (q4_1, q8_0)")


def requantize(src: Path, dst: Path, ftype: str, threads: int) -> Path:
    """llama.cpp's own quantizer: src GGUF -> dst at `ftype` (Q8_0, Q4_0), once (kept if present)."""
    import llama_cpp
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(".part")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype}) returned {rc}")
    tmp.replace(dst)
    return dst


def gguf_read_bytes(gguf: Path) -> dict:
    """Bytes of the weights one decode step reads, from the file's own tensor table: every tensor except the
    embedding table, plus the head (output.weight, or the embedding table read whole when tied) and one row."""
    from gguf import GGUFReader
    r = GGUFReader(str(gguf))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    types = {t.name: t.tensor_type.name for t in r.tensors}
    emb = sizes.pop("token_embd.weight")
    head = sizes.get("output.weight")
    n_rows = next(int(t.shape[-1]) for t in r.tensors if t.name == "token_embd.weight")
    total = sum(sizes.values()) + (0 if head is not None else emb) + emb // n_rows
    return {"weights_bytes": total, "file_bytes": gguf.stat().st_size,
            "types": sorted(set(types.values())), "head_type": types.get("output.weight", types["token_embd.weight"])}


def main() -> int:
    import time
    from projects.infer.weights import load, smollm2_gguf
    if not available():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    _, tok = load("smollm2-135m")
    ids = tok("The history of the Roman Empire")["input_ids"]
    m = LlamaCpp(smollm2_gguf(), threads=torch.get_num_threads())
    m.generate(ids, 8)
    t0 = time.perf_counter()
    out = m.generate(ids, 128)
    dt = time.perf_counter() - t0
    print(tok.decode(out))
    print(f"[128 tokens in {dt:.2f} s incl. prefill: {128 / dt:.1f} tokens/s]", file=sys.stderr)
    m.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
