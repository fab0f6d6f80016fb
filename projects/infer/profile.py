"""Where a decode step's time goes: weight matmuls, attention, fused elementwise kernels, framework overhead.

    python -m projects.infer.profile --scheme q4_1 --compile cpp            # the fast path
    python -m projects.infer.profile --scheme int4 --compile default --no-kernels   # the path before it

Batch 1, one token per step at a context of `ctx` filled slots, `steps` steps under torch.profiler after a
warm-up (and compile). Each profiler event's self time goes to one bucket by its name:
- weight matmuls: the quantized/float linear kernels (mlsys::q4_1_linear, q8_0_linear, bf16_linear, torch's int4/int8
  weight-only kernels, aten::mm/addmm/bmm) -- the weight reads, with the dequantization they do inside;
- attention: mlsys::decode_attention or the scaled-dot-product kernels;
- fused elementwise: inductor's generated C++ kernels (norms, RoPE, SwiGLU, residuals; compiled rows only,
  with inductor's kernel profiling on) or, eager, every other aten op;
- overhead: the step's wall time minus the above (Python, dispatch, allocation, guards, thread wake-ups).
The step time itself is measured without the profiler; the buckets are scaled to it (the profiler's own
cost is spread evenly). Prints one JSON line; the infer bench records it for docs/infer.md.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from common import config

MATMUL = ("q4_1_linear", "q8_0_linear", "bf16_linear", "_weight_int4pack_mm", "_weight_int8pack_mm", "aten::mm",
          "mm_out", "addmm", "bmm", "aten::linear", "mkldnn", "_int_mm")
ATTENTION = ("decode_attention", "scaled_dot_product", "flash_attention")


@dataclass
class ProfileConfig:
    model: str = "smollm2-135m"
    """model name or HF folder"""
    scheme: Literal["bf16", "fp32", "int4", "int8", "q4_1", "q8_0"] = "q4_1"
    """weights: float, torch's int4 (g32) / int8 weight-only kernels, or llama.cpp's block formats"""
    compile: Literal["none", "default", "cpp"] = "cpp"
    """none = eager; default = torch.compile as before the C++ wrapper; cpp = compile_decode() (C++ wrapper)"""
    kernels: bool = True
    """use the C++ kernels (false: the PyTorch paths they replace, e.g. CPU flash attention)"""
    ctx: int = 70
    """filled cache slots at the profiled step (the decode benches' mean context)"""
    steps: int = 32
    """profiled steps"""
    threads: int = 2
    """torch CPU threads"""


def bucket(name: str) -> str:
    if any(k in name for k in MATMUL):
        return "weight_matmuls"
    if any(k in name for k in ATTENTION):
        return "attention"
    return "elementwise"


@torch.no_grad()  # as generate() runs the step: traced with autograd, the step would carry its wrapper's cost
def run(cfg: ProfileConfig) -> dict:
    os.environ["MLSYS_KERNELS"] = "1" if cfg.kernels else "0"  # read once, at the first kernel use
    torch.set_num_threads(cfg.threads)
    if cfg.compile != "none":
        import torch._inductor.config as ic
        ic.cpp.enable_kernel_profile = True  # generated kernels appear as profiler events
    from projects.infer.blockquant import quantize_q4_1, quantize_q8_0
    from projects.infer.generate import compile_decode, decode_step
    from projects.infer.weights import load
    from projects.infer.quantize import quantize_int4, quantize_int8
    model, _ = load(cfg.model, "cpu", torch.float32)
    quant = {"int4": lambda m: quantize_int4(m, 32), "int8": quantize_int8, "q4_1": quantize_q4_1,
             "q8_0": quantize_q8_0}
    if cfg.scheme in quant:
        quant[cfg.scheme](model)
    if cfg.scheme != "fp32":
        model.to(torch.bfloat16)
    if cfg.kernels and cfg.compile == "cpp":
        from projects.infer.gemv import use_gemv
        use_gemv(model)  # the float linears (bf16 scheme) on the GEMV kernel, as the fast path has them
    S = -(-(cfg.ctx + 8) // 64) * 64
    model.setup_caches(1, S)
    step = {"none": decode_step, "cpp": compile_decode(),
            "default": torch.compile(decode_step, fullgraph=True, dynamic=False)}[cfg.compile]
    tok, pos = torch.tensor([[42]]), torch.tensor([cfg.ctx])
    for _ in range(3):
        step(model, tok, pos, None)
    from torch.profiler import ProfilerActivity, profile
    # the fast path's steady steps, as generate() runs them: only the guards that tell cached graphs apart
    with torch.compiler.set_stance(skip_guard_eval_unsafe=cfg.compile == "cpp"):
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                step(model, tok, pos, None)
            walls.append((time.perf_counter() - t0) / cfg.steps)
        wall = sorted(walls)[2]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(cfg.steps):
                step(model, tok, pos, None)
            prof_wall = (time.perf_counter() - t0) / cfg.steps
    sums = {"weight_matmuls": 0.0, "attention": 0.0, "elementwise": 0.0}
    for e in prof.key_averages():
        name = e.key
        if name.startswith(("## Call", "Torch-Compiled", "TorchDynamo", "AOTDispatcher", "Pregraph")):
            continue  # wrappers around the kernels: their self time is the overhead bucket
        if cfg.compile != "none" and bucket(name) == "elementwise" and not name.startswith("graph_"):
            continue  # aten glue the C++ wrapper calls (empty, as_strided...) is overhead, not a kernel
        sums[bucket(name)] += e.self_cpu_time_total / 1e6 / cfg.steps
    scale = wall / prof_wall  # the profiler's own cost, spread evenly
    out = {k: v * scale * 1e3 for k, v in sums.items()}
    out["overhead"] = max(0.0, wall * 1e3 - sum(out.values()))
    return {**asdict(cfg), "ms_per_token": wall * 1e3, "tok_s": 1 / wall,
            **{f"{k}_ms": round(v, 3) for k, v in out.items()}}


def main(argv=None) -> int:
    cfg = config.parse(ProfileConfig, argv, prog="python -m projects.infer.profile",
                       description=__doc__.splitlines()[0])
    try:
        print(json.dumps(run(cfg)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
