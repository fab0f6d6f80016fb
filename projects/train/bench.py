"""Training bench: images/s, scaling efficiency, communication share and memory per rank for ddp, zero1,
zero2 and fsdp, against the plain fp32 loop a user writes first, all measured in one run on one machine.

    python -m projects.train.bench            # default: the subset answering every goal
    python -m projects.train.bench --full     # the whole matrix (CPU: about an hour)
    python -m projects.train.bench --preset smoke --results-dir /tmp/r    # seconds; checks that it runs
    make bench-train                          # default, then README table and docs/train_*.png

What a run does (details in docs/train.md, "Training bench"):
1. Probes in this process: FLOPs per image (torch.utils.flop_counter, forward and forward+backward), one
   thread's fp32 GEMM rate (the ceiling a 1-thread training step can approach) and bf16 GEMM rate (bf16 rows
   run only where bf16 is faster than fp32, i.e. hardware bf16: AVX512-BF16/AMX on CPU, any recent GPU).
2. One launch per world size (projects/train/bench_worker.py; world size 1 as plain python, >= 2 under
   torchrun; CPU: one thread per rank, CUDA: one GPU per rank). Each rank times `warmup` + `steps`
   synchronized steps per configuration on synthetic data of the real shape; the median step time (slowest
   rank per step) gives images/s. Variants of one model are timed interleaved: DDP with communication off
   (no_sync around the whole step: the communication share of a step) and the real data path of data.py.
3. Memory per rank: parameter, gradient and optimizer bytes summed from the local shards, against the ZeRO
   paper's formulas, and the peak (CUDA allocator; CPU peak RSS of the rank's process).
4. The record benchmarks/results/train.json (goals, notes, provenance); plot() draws docs/train_*.png.
"""
from __future__ import annotations

import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from benchmarks.record import RESULTS_DIR, goal, make_record, save_figure, write_record
from common import config
from common.config import UsageError
from common.env import REPO_ROOT
from common.provenance import cpu_flags
from projects.train import parallelize

MiB = 2**20
# DDP's switch for the per-forward buffer broadcast (renamed in recent torch; the old name warns)
_NO_BUFFER_SYNC = "forward_sync_buffers" if "forward_sync_buffers" in \
    inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters else "broadcast_buffers"
STRATEGIES = parallelize.STRATEGIES
# ZeRO paper (Rajbhandari et al. 2020, sec. 3/5.1), per parameter. Params and grads are fp32 (autocast keeps
# fp32 weights, so bf16 rows hold the same state); the optimizer keeps K bytes of state per parameter: SGD
# with momentum the fp32 momentum buffer (Nesterov and weight decay add none), AdamW two fp32 moments.
P_BYTES, G_BYTES = 4, 4
K_BYTES = {"sgd": 4, "adamw": 8}

# Dense peak FLOP/s by device name (substring, spec sheets), for MFU on CUDA. fp32 uses the TF32 tensor-core
# peak: cuDNN convolutions run in TF32 by default (torch.backends.cudnn.allow_tf32 is True).
GPU_PEAK = {  # name: (bf16/fp16, tf32)
    "H200": (989e12, 495e12), "H100 SXM": (989e12, 495e12), "H100 80GB HBM3": (989e12, 495e12),
    "H100 PCIe": (756e12, 378e12), "H100": (756e12, 378e12), "A100": (312e12, 156e12),
    "L40S": (362e12, 183e12), "L4": (121e12, 60e12), "A10G": (70e12, 35e12), "RTX 4090": (165e12, 83e12),
}


@dataclass
class BenchConfig:
    preset: Literal["default", "full", "smoke"] = "default"
    """default (answers every goal) | full (whole matrix) | smoke (seconds)"""
    batch_size: int = 0
    """images per rank per step; 0: 32 on CPU (seconds a step at one thread, large enough that the GEMMs run
    near the core's rate: the record's step_ms), 256 on CUDA"""
    warmup: int = 1
    """untimed steps per configuration (allocator, oneDNN primitives; DDP rebuilds its buckets at the next
    step, which the median of the timed steps outvotes)"""
    steps: int = 3
    """timed steps per configuration (median reported)"""
    threads: int = 1
    """CPU threads per rank (the baseline also runs once with 2 threads in one process)"""
    bucket_cap_mb: float = 25.0
    """DDP bucket size of the tuned DDP rows"""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cpu or cuda"""
    data_dir: str = ""
    """folder holding cifar-100-python/ for the real-data row; empty: a fake set in the official format
    written by scripts/make_fake_cifar100.py (offline)"""
    results_dir: str = ""
    """where train.json goes (default benchmarks/results)"""
    launch_timeout_s: int = 3600
    """kill a launch (one world size) after this many seconds"""

    def __post_init__(self):
        if self.batch_size < 0 or self.warmup < 1 or self.steps < 1 or self.threads < 1:
            raise ValueError("--batch-size must be >= 0, --warmup, --steps and --threads >= 1")


def default() -> BenchConfig:
    return BenchConfig()


def full() -> BenchConfig:
    return BenchConfig(preset="full", warmup=2, steps=5)


def smoke() -> BenchConfig:
    """Seconds per configuration: batch 2, one warm-up and one timed step, the fewest runs."""
    return BenchConfig(preset="smoke", batch_size=2, warmup=1, steps=1)


PRESETS = {"default": default, "full": full, "smoke": smoke}


def parse_config(argv: list[str] | None) -> BenchConfig:
    """Flags from BenchConfig's fields; --preset picks the start (--full is --preset full), flags win."""
    return config.parse(BenchConfig, argv, prog="python -m projects.train.bench", description=__doc__.split("\n")[0],
                        presets=PRESETS)


# ------------------------------------------------------------------ probes (this process)


def train_flops_per_image(batch: int = 2) -> dict[str, float]:
    """Forward and forward+backward FLOPs of one image, counted by torch.utils.flop_counter on the real model
    (train mode). Backward costs ~2x forward (input and weight gradients), except the first conv, whose input
    needs no gradient."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from projects.train.model import flops_per_image, resnet50_cifar

    torch.manual_seed(0)
    model = resnet50_cifar(100)
    fwd = flops_per_image(model)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    return {"forward": float(fwd), "train": fc.get_total_flops() / batch,
            "params": float(sum(p.numel() for p in model.parameters()))}


def gemm_rate(dtype: torch.dtype, n: int, threads: int = 1, device: str = "cpu", reps: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` at `threads` threads (median of reps, after one warm-up)."""
    from common.timing import timed

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t, _ = timed(lambda: a @ b, warmup=1, repeats=reps, device=device)
    finally:
        torch.set_num_threads(old)
    return 2 * n**3 / t


def probe(device_type: str, threads: int) -> dict:
    """Hardware facts the plan and the notes depend on."""
    if device_type == "cuda":
        return {"bf16_fast": True, "fp16": True, "sgemm_flops": None, "bf16_gemm_flops": None, "cpu_bf16_isa": None}
    flags = cpu_flags()
    isa = sorted(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f in flags)
    fp32 = gemm_rate(torch.float32, 1024, threads)
    # bf16 at a small size first: without hardware bf16 it can be orders of magnitude slower than fp32.
    bf16 = gemm_rate(torch.bfloat16, 256, threads, reps=1)
    if bf16 > 0.5 * fp32:
        bf16 = gemm_rate(torch.bfloat16, 1024, threads)
    return {"bf16_fast": bf16 > 1.2 * fp32, "fp16": False, "sgemm_flops": fp32, "bf16_gemm_flops": bf16,
            "cpu_isa": isa}


# ------------------------------------------------------------------ the plan


def run(name: str, **kw) -> dict:
    return {"name": name, **kw}


def plan(cfg: BenchConfig, device_type: str, n_gpus: int, bf16_fast: bool, data_dir: str) -> dict[int, list[dict]]:
    """world size -> the runs of that launch (dicts of bench_worker.Run fields)."""
    cuda = device_type == "cuda"
    b = cfg.batch_size or (256 if cuda else 32)
    base = dict(batch_size=b, warmup=cfg.warmup, steps=cfg.steps, threads=cfg.threads)
    # Tuned DDP: grads as views into the buckets (no copy), static graph (bucket order fixed after step 1, no
    # per-step unused-parameter search), and no broadcast of BatchNorm buffers from rank 0 before every
    # forward (a blocking collective on the critical path; train.py averages them before eval/checkpoint).
    tuned = dict(bucket_cap_mb=cfg.bucket_cap_mb, gradient_as_bucket_view=True, static_graph=True,
                 **{_NO_BUFFER_SYNC: False})
    if cuda:
        worlds = sorted({w for w in (1, 2, 4, 8) if w <= n_gpus} | {n_gpus})
        precisions = ["bf16", "fp16", "fp32"] if cfg.preset == "full" else ["bf16"]
    else:
        worlds = [1, 2]
        precisions = ["fp32", "bf16"] if bf16_fast else ["fp32"]
    low = "bf16" if bf16_fast else "fp32"  # the precision the best configuration uses

    def label(strategy, precision, cl, comp, ddp=None):
        s = f"{strategy} {precision}" + (" channels_last" if cl else "") + (" compiled" if comp else "")
        return s + (" (apply_ddp defaults)" if ddp == {} else "")

    def srun(strategy, precision, cl=True, comp=False, variants=("sync",), ddp=None, profile=False):
        d = tuned if ddp is None and strategy in ("ddp", "zero1") else (ddp or {})
        return run(label(strategy, precision, cl, comp, ddp), kind="strategy", strategy=strategy, precision=precision,
                   channels_last=cl, compile=comp, variants=list(variants), ddp=d, data_dir=data_dir,
                   profile=profile, **base)

    def adamw_memory(strategy, precision):
        """State bytes with AdamW (K = 8): one step to create its moments and one to count, nothing timed."""
        return {**srun(strategy, precision), "name": label(strategy, precision, True, False) + ", AdamW (memory only)",
                "optimizer": "adamw", "warmup": 1, "steps": 0}

    out: dict[int, list[dict]] = {}
    plain = dict(kind="baseline", strategy="none", precision="fp32", channels_last=False, compile=False)
    one = [run("baseline: plain fp32 loop, 1 thread", profile=True, **plain, **base)]
    if not cuda:
        one.append(run("baseline: plain fp32 loop, 2 threads, 1 process", **plain, **{**base, "threads": 2}))
    if cfg.preset == "smoke":
        out[1] = one[:1] + [srun("ddp", "fp32", variants=("sync", "real"))]
        out[2] = [srun("ddp", "fp32", variants=("sync", "nocomm")), srun("fsdp", "fp32")]
        return out
    if cfg.preset == "default":
        hi = "fp32" if not cuda else "bf16"
        one += [srun("ddp", hi, variants=("sync", "real"), profile=True)]
        # single-rank references for zero1/zero2/fsdp scaling: one warm-up step is enough without DDP's
        # bucket rebuild (keeps the default preset inside its ~8 minutes)
        one += [{**srun(s, hi), "warmup": min(cfg.warmup, 1)} for s in STRATEGIES[1:]]
        if low != hi:
            one += [srun("ddp", low, profile=True)]
        if cuda:  # fusion pays when fast bf16 convolutions leave the elementwise ops as the bottleneck; on a
            # CPU inductor's compile of the step takes minutes of a ~7-minute preset: --full has it there
            one += [srun("ddp", low, comp=True, profile=True)]
        out[1] = one
        for w in worlds[1:]:
            runs = [srun("ddp", hi, variants=("sync", "nocomm"))]
            if w == 2:
                runs.append(srun("ddp", hi, ddp={}))
            runs += [srun(s, hi) for s in STRATEGIES[1:]]
            out[w] = runs + [adamw_memory(s, hi) for s in STRATEGIES]
        return out
    # full: every strategy x precision x world x layout x compile (compile last: its warm-up is long)
    for w in worlds:
        runs = list(one) if w == 1 else []
        for comp in (False, True):
            for p in precisions:
                for cl in (False, True):
                    for s in STRATEGIES:
                        variants = ("sync",)
                        if s == "ddp" and w > 1:
                            variants = ("sync", "nocomm")
                        elif s == "ddp" and w == 1 and cl and not comp and p == precisions[0]:
                            variants = ("sync", "real")
                        runs.append(srun(s, p, cl, comp, variants, profile=w == 1 and s == "ddp"))
        if w == 2 or (cuda and w == worlds[-1]):
            runs += [srun("ddp", precisions[0], ddp={})]
            runs += [run(f"ddp {precisions[0]} channels_last, bucket_cap_mb={mb}", kind="strategy", strategy="ddp",
                         precision=precisions[0], channels_last=True, ddp={**tuned, "bucket_cap_mb": mb},
                         data_dir=data_dir, **base) for mb in (5, 100) if mb != cfg.bucket_cap_mb]
        out[w] = runs + ([adamw_memory(s, precisions[0]) for s in STRATEGIES] if w > 1 else [])
    return out


# ------------------------------------------------------------------ launching


def launch(world: int, runs: list[dict], cfg: BenchConfig, tmp: Path) -> list[dict]:
    spec, out = tmp / f"spec_ws{world}.json", tmp / f"out_ws{world}.json"
    spec.write_text(json.dumps({"runs": runs, "device": cfg.device}))
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads), "PYTHONPATH": str(REPO_ROOT),
           "TORCHINDUCTOR_COMPILE_THREADS": os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1")}
    worker = ["-m", "projects.train.bench_worker", str(spec), str(out)]
    cmd = [sys.executable, *worker] if world == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *worker]
    print(f"launch: world size {world}, {len(runs)} configurations", file=sys.stderr, flush=True)
    try:
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=cfg.launch_timeout_s).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    got = json.loads(out.read_text())["results"] if out.exists() else []
    if rc != 0 or len(got) < len(runs):
        print(f"warning: launch at world size {world} ended with {rc}; {len(got)}/{len(runs)} configurations "
              f"measured", file=sys.stderr)
    return got


# ------------------------------------------------------------------ analysis


def zero_formula(strategy: str, n: int, params: float, optimizer: str) -> float:
    """Bytes per rank of params + grads + optimizer state by the ZeRO paper's formulas (fp32 params/grads):
    DDP (P+G+K)Psi; ZeRO-1 / P_os (P+G)Psi + K Psi/N; ZeRO-2 / P_os+g P Psi + (G+K) Psi/N; ZeRO-3 / FSDP
    (P+G+K) Psi/N."""
    P, G, K = P_BYTES, G_BYTES, K_BYTES[optimizer]
    per = {"ddp": P + G + K, "zero1": P + G + K / n, "zero2": P + (G + K) / n, "fsdp": (P + G + K) / n}[strategy]
    return per * params


def gpu_peak(name: str | None, precision: str) -> float | None:
    for key, (low, tf32) in GPU_PEAK.items():
        if name and key in name:
            return tf32 if precision == "fp32" else low
    return None


def rows_of(result: dict, flops: dict) -> list[dict]:
    """One row per variant of a measured configuration (timings from the slowest rank at each step)."""
    r, world = result["run"], result["world"]
    errors = [x["error"] for x in result["ranks"] if x["error"]]
    common = {"strategy": "baseline" if r["kind"] == "baseline" else r["strategy"],
              "optimizer": r.get("optimizer", "sgd"), "precision": r["precision"],
              "world": world, "channels_last": r["channels_last"], "compile": r["compile"],
              "threads": r["threads"], "batch_per_rank": r["batch_size"],
              # DDP kwargs of ddp/zero1 rows ({}: parallelize.apply_ddp as train.py calls it); None otherwise
              "ddp": r["ddp"] if r["kind"] != "baseline" and r["strategy"] in ("ddp", "zero1") else None}
    if errors:
        return [{"config": r["name"], **common, "variant": "sync", "data": "synthetic", "error": errors[0]}]
    res = [x["result"] for x in result["ranks"]]
    mems = [x["memory"] for x in res]
    state = [m["param_bytes"] + m["grad_bytes"] + m["optim_bytes"] for m in mems]
    worst = max(range(world), key=lambda i: state[i])  # the fullest rank is what must fit
    peak = max(m["peak_bytes"] for m in mems)
    out = []
    for v in r["variants"]:
        per_step = [max(x["times"][v][i] for x in res) for i in range(len(res[0]["times"][v]))]
        row = {"config": r["name"] + {"sync": "", "real": ", real data path", "nocomm": ", no communication"}[v],
               **common, "variant": v, "data": "real" if v == "real" else "synthetic",
               "timed_steps": len(per_step), "first_step_s": res[0]["first_step_s"]}
        if per_step:  # memory-only runs time nothing
            t = statistics.median(per_step)
            ips_rank = r["batch_size"] / t
            row.update({"step_ms": 1e3 * t, "step_ms_min": 1e3 * min(per_step), "step_ms_max": 1e3 * max(per_step),
                        "images_per_s": world * ips_rank, "images_per_s_per_rank": ips_rank,
                        "gflops_per_rank": flops["train"] * ips_rank / 1e9})
        row |= {"param_mib": mems[worst]["param_bytes"] / MiB, "grad_mib": mems[worst]["grad_bytes"] / MiB,
               "optim_mib": mems[worst]["optim_bytes"] / MiB, "state_mib": state[worst] / MiB,
               "state_bytes": state[worst], "state_bytes_per_rank": state,
               "param_in_step_mib": (mems[worst].get("param_bytes_in_step") or 0) / MiB,
               # held through the step: zero2 keeps the gathered parameters from forward to backward
               "state_in_step_bytes": max(m["param_bytes_in_step"] + m["grad_bytes"] + m["optim_bytes"]
                                          for m in mems),
               "peak_mib": peak / MiB, "peak_kind": "CUDA allocator peak" if "cuda" in result["device"]
               else "peak RSS of the rank's process",
               "rss_floor_mib": (mems[0]["rss_floor_bytes"] or 0) / MiB or None}
        peak_flops = gpu_peak(result.get("device_name"), r["precision"])
        if peak_flops and per_step:
            row["mfu"] = row["gflops_per_rank"] * 1e9 / peak_flops
        if v == r["variants"][0] and res[0].get("profile"):
            row["profile"] = res[0]["profile"]
        out.append(row)
    return out


def _key(row: dict) -> tuple:
    return (row["strategy"], row["optimizer"], row["precision"], row["channels_last"], row["compile"], row["data"],
            json.dumps(row.get("ddp"), sort_keys=True), row["variant"])


def analyze(results: list[dict], flops: dict, probe_info: dict, cfg: BenchConfig, device_type: str,
            fake_data: bool) -> tuple[list[dict], list[dict], list[str], dict]:
    rows = [row for res in results for row in rows_of(res, flops)]
    ok = [r for r in rows if "error" not in r]
    timed = [r for r in ok if "step_ms" in r]
    base = next((r for r in ok if r["strategy"] == "baseline" and r["threads"] == 1 and r["world"] == 1), None)
    two_threads = next((r for r in ok if r["strategy"] == "baseline" and r["threads"] > 1), None)
    ws1 = {_key(r): r for r in timed if r["world"] == 1}
    for r in timed:
        if base:
            r["speedup_vs_baseline"] = r["images_per_s_per_rank"] / base["images_per_s_per_rank"]
        ref = ws1.get(_key(r)) if r["world"] > 1 else None
        if ref is None and r["world"] > 1 and r["variant"] == "nocomm":  # no-comm vs the ws1 step
            ref = ws1.get(_key({**r, "variant": "sync"}))
        if ref is None and r["world"] > 1 and r.get("ddp") is not None:  # DDP-knob variants vs tuned ws1
            ref = next((x for x in timed if x["world"] == 1 and x["strategy"] == r["strategy"] and
                        x["precision"] == r["precision"] and x["channels_last"] == r["channels_last"] and
                        x["compile"] == r["compile"] and x["variant"] == "sync" and x["data"] == "synthetic"),
                       None)
        if ref is not None:
            r["scaling_efficiency"] = r["images_per_s"] / (r["world"] * ref["images_per_s"])
            r["scaling_reference"] = ref["config"]
    # Communication share: 1 - (same local compute, communication off) / (the step). For DDP it is exactly
    # the all-reduce time the overlap did not hide; for zero1/zero2/fsdp it is everything the strategy adds
    # over a DDP step without communication at the same world size (collectives + their copies).
    for r in timed:
        if r["world"] == 1 or r["variant"] != "sync" or r["strategy"] == "baseline":
            continue
        nocomm = next((x for x in timed if x["world"] == r["world"] and x["variant"] == "nocomm" and
                       x["precision"] == r["precision"] and x["channels_last"] == r["channels_last"] and
                       x["compile"] == r["compile"]), None)
        if nocomm:
            r["comm_share"] = 1 - nocomm["step_ms"] / r["step_ms"]
    # Memory against the ZeRO formulas, at each world size > 1, per optimizer
    for r in ok:
        ddp = next((x for x in ok if x["world"] == r["world"] and x["strategy"] == "ddp" and
                    x["optimizer"] == r["optimizer"] and x["precision"] == r["precision"] and
                    x["variant"] == "sync" and x["data"] == "synthetic"), None)
        if r["strategy"] in STRATEGIES and ddp and r["world"] > 1:
            r["state_ratio_vs_ddp"] = r["state_bytes"] / ddp["state_bytes"]
            r["formula_ratio_vs_ddp"] = zero_formula(r["strategy"], r["world"], flops["params"], r["optimizer"]) / \
                zero_formula("ddp", r["world"], flops["params"], r["optimizer"])
            # zero2 against its formula as held during the step (the paper's ZeRO-2 keeps full parameters);
            # the others at rest (ddp/zero1 hold the same either way; fsdp reshards after each block).
            held = r["state_in_step_bytes"] if r["strategy"] == "zero2" else r["state_bytes"]
            r["formula_error"] = held / ddp["state_bytes"] / r["formula_ratio_vs_ddp"] - 1
    goals, notes = goals_and_notes(ok, timed, rows, base, two_threads, flops, probe_info, cfg, device_type,
                                   fake_data)
    extra = {"flops_per_image": flops, "probe": probe_info,
             "zero_formulas": {o: {s: {str(n): zero_formula(s, n, flops["params"], o) for n in (1, 2)}
                                   for s in STRATEGIES} for o in K_BYTES},
             "profiles": {r["config"]: r.pop("profile") for r in ok if "profile" in r}}
    return rows, goals, notes, extra


def _pick(rows, **kw):
    return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]


def _fmt_share(shares: dict) -> str:
    return ", ".join(f"{k} {100 * v:.0f}%" for k, v in list(shares.items())[:5])


def goals_and_notes(ok, timed, rows, base, two_threads, flops, probe_info, cfg, device_type, fake_data):
    goals, notes = [], []
    cpu = device_type == "cpu"
    b = ok[0]["batch_per_rank"] if ok else 0
    notes.append(f"Batch {b} images per rank per step, {cfg.warmup} warm-up + {cfg.steps} timed steps per "
                 f"configuration" + (", one thread per rank: at 32x32 a step of this batch takes seconds on one "
                                     "core, large enough that the convolution GEMMs run near the core's rate, "
                                     "small enough for the default preset's time budget."
                                     if cpu and b >= 16 else ".")
                 + " Images/s is the median over timed steps (each step timed on the slowest rank) after warm-up; "
                   "speedups are images/s per rank against the baseline's images/s, i.e. per core on CPU.")
    notes.append(f"FLOPs per image (torch.utils.flop_counter): forward {flops['forward'] / 1e9:.2f} GFLOP, "
                 f"forward+backward {flops['train'] / 1e9:.2f} GFLOP; {flops['params'] / 1e6:.2f} M parameters.")
    # --- DDP scaling
    ddp2 = [r for r in _pick(ok, strategy="ddp", world=2, variant="sync", data="synthetic")
            if "scaling_efficiency" in r]
    best = max(ddp2, key=lambda r: r["scaling_efficiency"], default=None)
    note = ""
    if best:
        nocomm = next((r for r in _pick(ok, strategy="ddp", world=2, variant="nocomm",
                                        precision=best["precision"]) if "scaling_efficiency" in r), None)
        note = (f"{best['config']}: {best['images_per_s']:.2f} images/s at 2 ranks vs "
                f"{best['images_per_s'] / 2 / best['scaling_efficiency']:.2f} at 1; communication share of the step "
                f"{100 * best.get('comm_share', float('nan')):.1f}%")
        if nocomm:
            note += (f"; with communication switched off (no_sync for the whole step) the 2 ranks reach "
                     f"{nocomm['scaling_efficiency']:.2f}: the distance from that to 1 is the two ranks slowing "
                     f"each other (shared caches, memory bandwidth, clocks), the rest is communication")
    goals.append(goal("ddp_scaling_efficiency", "images/s(2 ranks) / (2 x images/s(1 rank)), DDP, "
                      + ("CPU, 1 thread per rank" if cpu else "GPU"),
                      best["scaling_efficiency"] if best else None, 0.90, ">=",
                      note or "not measured (no DDP row at world size 2)"))
    # --- best speedup vs the baseline
    cands = [r for r in ok if r["threads"] == 1 and r["data"] == "synthetic" and r["variant"] == "sync"
             and r["strategy"] != "baseline" and "speedup_vs_baseline" in r]
    top = max(cands, key=lambda r: r["speedup_vs_baseline"], default=None)
    goals.append(goal("best_speedup_vs_baseline", "images/s per rank of the best configuration / the plain fp32 "
                      "loop's (same model, batch and threads per rank)",
                      top["speedup_vs_baseline"] if top else None, 1.5, ">=",
                      f"best: {top['config']} at world size {top['world']}" if top else "no baseline measured"))
    # --- memory: each ratio against its ZeRO-formula bound (the least the strategy can hold), per optimizer
    formula_txt = {"ddp": "(P+G+K)", "zero1": "(P+G+K/N)", "zero2": "(P+(G+K)/N)", "fsdp": "(P+G+K)/N"}
    opt_txt = {"sgd": "SGD momentum", "adamw": "AdamW"}
    for s, opt, target in (("fsdp", "sgd", 0.55), ("zero1", "sgd", 0.86), ("zero1", "adamw", 0.78)):
        r = next((x for x in _pick(ok, strategy=s, optimizer=opt, world=2, variant="sync")
                  if "state_ratio_vs_ddp" in x), None)
        note = "not measured"
        if r:
            note = (f"{r['state_mib']:.1f} MiB per rank (fullest rank) vs DDP; the bound, ZeRO formula "
                    f"{formula_txt[s]} / (P+G+K) with P=G=4 (fp32 params and grads), K={K_BYTES[opt]} "
                    f"({opt_txt[opt]}) at N=2, is {r['formula_ratio_vs_ddp']:.3f}; measured/formula - 1 = "
                    f"{100 * r['formula_error']:+.1f}%")
        name = f"{s}_state_bytes_ratio" if opt == "sgd" else f"{s}_{opt}_state_bytes_ratio"
        goals.append(goal(name, f"{s} per-rank params+grads+optimizer bytes / DDP's, {opt_txt[opt]}, world size 2",
                          r["state_ratio_vs_ddp"] if r else None, target, "<=", note))
    errs: dict[str, float] = {}   # the largest error of each strategy x optimizer (DDP has two rows)
    for x in ok:
        if x["world"] == 2 and x["variant"] == "sync" and "formula_error" in x:
            k = f"{x['strategy']} {x['optimizer']}"
            errs[k] = max(errs.get(k, 0.0), x["formula_error"], key=abs)
    goals.append(goal("zero_formula_max_error", "max |measured / ZeRO-formula ratio - 1| over every strategy, "
                      "SGD momentum and AdamW, world size 2", max(map(abs, errs.values())) if errs else None, 0.05,
                      "<=", ("; ".join(f"{k} {100 * e:+.1f}%" for k, e in errs.items())
                             + " (zero2 as held during the step)") if errs else "not measured"))
    # --- notes: the 2-thread process, bf16, profiles, data path, compile
    ddp1 = next(iter(_pick(timed, strategy="ddp", world=1, variant="sync", data="synthetic", compile=False)), None)
    if two_threads and best:
        per_proc, ranks2 = two_threads["images_per_s"], best["images_per_s"]
        word = "beats" if per_proc > ranks2 else "does not beat"
        notes.append(f"One process with 2 threads (plain fp32 loop) {word} 2 ranks x 1 thread: "
                     f"{per_proc:.2f} vs {ranks2:.2f} images/s ({best['config']}). Data parallelism pays "
                     f"across devices, not across the two cores of one CPU: here the ranks share caches and "
                     f"memory bandwidth and gloo's all-reduce of {flops['params'] * 4 / 1e6:.0f} MB of gradients "
                     f"costs CPU time that a single process never spends.")
    if cpu and probe_info.get("sgemm_flops"):
        sg = probe_info["sgemm_flops"]
        fast = probe_info["bf16_fast"]
        txt = (f"CPU probe (1 thread): fp32 GEMM {sg / 1e9:.1f} GFLOP/s, bf16 GEMM "
               f"{probe_info['bf16_gemm_flops'] / 1e9:.2f} GFLOP/s; ISA flags {', '.join(probe_info['cpu_isa']) or 'none'}. ")
        if not fast:
            txt += ("This CPU has no hardware bf16 (no avx512_bf16 / amx_bf16), so bf16 runs in slow emulated kernels: "
                    "bf16 rows are not run (one ResNet-50 step would take minutes) and the best configuration is "
                    "an fp32 one. ")
        if base:
            txt += (f"The baseline step runs at {base['gflops_per_rank']:.1f} GFLOP/s "
                    f"({100 * base['gflops_per_rank'] * 1e9 / sg:.0f}% of the fp32 GEMM rate)")
            if top:
                txt += (f", the best configuration at {top['gflops_per_rank']:.1f} GFLOP/s "
                        f"({100 * top['gflops_per_rank'] * 1e9 / sg:.0f}%)")
            txt += (": in fp32 the step is bounded by the GEMM rate, so layout and fusion can only win the "
                    "distance to it; a >= 1.5x speedup per core needs faster arithmetic (hardware bf16) "
                    "or less of it." if not fast else ".")
        notes.append(txt)
    for r in ok:
        if r.get("profile"):
            notes.append(f"Where the time goes, {r['config']} (torch.profiler, self time of one step by op "
                         f"category): {_fmt_share(r['profile']['category_share'])}.")
    if ddp1 and base:
        notes.append(f"channels_last and the projects.train step vs the plain loop at 1 thread: "
                     f"{ddp1['config']} {ddp1['images_per_s']:.2f} vs baseline {base['images_per_s']:.2f} images/s.")
    real = next(iter(_pick(ok, variant="real")), None)
    if real:
        syn = next((r for r in ok if _key(r) == _key({**real, "variant": "sync", "data": "synthetic"})
                    and r["world"] == real["world"]), None)
        src = "fake images in the official cifar-100-python format (scripts/make_fake_cifar100.py; offline)" \
            if fake_data else "the CIFAR-100 copy given by --data-dir"
        if syn:
            notes.append(f"Real data path (data.py: uint8 split on the device, batched crop/flip, normalize, inside "
                         f"the timed step; {src}): {real['images_per_s']:.2f} vs {syn['images_per_s']:.2f} images/s "
                         f"on synthetic tensors, timed interleaved on one model: the data path is "
                         f"{100 * (1 - real['images_per_s'] / syn['images_per_s']):.1f}% of the step.")
    zero2 = next(iter(_pick(ok, strategy="zero2", optimizer="sgd", world=2, variant="sync")), None)
    if zero2:
        notes.append(f"zero2 (FSDP2, reshard_after_forward=False) holds sharded state at rest "
                     f"({zero2['state_mib']:.1f} MiB) but keeps the parameters unsharded from forward to backward: "
                     f"{zero2['param_in_step_mib']:.1f} MiB of parameters during the step, which is what the ZeRO-2 "
                     f"formula P Psi + (G+K) Psi/N counts.")
    if any(r["strategy"] in ("zero2", "fsdp") and r["channels_last"] for r in ok):
        notes.append("zero2/fsdp 'channels_last' rows have channels_last inputs only: FSDP2's fully_shard refuses "
                     "NHWC-strided parameters (NotImplementedError), so their weights stay NCHW; a channels_last "
                     "input still selects the NHWC convolution kernels.")
    if cfg.preset == "default":
        notes.append("Preset default: the subset answering every goal; `--full` adds NCHW vs channels_last and "
                     "torch.compile for every strategy, precision and world size, and DDP bucket sizes."
                     + ("" if device_type == "cuda" else " torch.compile is left to --full on a CPU: fusing "
                        "BatchNorm/ReLU/adds can win only their share of the step (see the profiles in "
                        "extra.profiles), while inductor's CPU compile of the 16 blocks (forward + backward) takes "
                        "minutes on 2 cores."))
    bad = [r for r in rows if "error" in r]
    for r in bad:
        notes.append(f"{r['config']} (world size {r['world']}) failed: {r['error']}")
    return goals, notes


# ------------------------------------------------------------------ record and plots

COLUMNS = ["config", "world", "images_per_s", "images_per_s_per_rank", "speedup_vs_baseline",
           "scaling_efficiency", "comm_share", "state_mib", "peak_mib"]
UNITS = {"config": "", "world": "", "images_per_s": "images/s", "images_per_s_per_rank": "images/s",
         "speedup_vs_baseline": "x", "scaling_efficiency": "", "comm_share": "", "state_mib": "MiB",
         "peak_mib": "MiB", "mfu": "", "step_ms": "ms", "gflops_per_rank": "GFLOP/s", "param_mib": "MiB",
         "grad_mib": "MiB", "optim_mib": "MiB"}


def build_record(cfg: BenchConfig, rows, goals, notes, extra, device_type: str) -> dict:
    columns = COLUMNS + (["mfu"] if device_type == "cuda" else [])
    return make_record("train", cfg, rows, goals, units=UNITS, columns=columns, preset=cfg.preset, notes=notes,
                       libs=["torchvision", "tqdm", "matplotlib"], extra=extra)


def plot(record: dict, docs_dir: Path) -> list[Path]:
    """docs/train_throughput.png (images/s vs world size per strategy) and docs/train_memory.png (bytes per
    rank by strategy: params / grads / optimizer state stacked, peak marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs_dir = Path(docs_dir)
    docs_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in record["rows"] if "error" not in r and r.get("images_per_s")]
    sub = f"{record['provenance']['machine']['cpu_model']}, preset {record.get('preset')}"
    out = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = {}
    for r in rows:
        if r["strategy"] == "baseline" or r["variant"] != "sync" or r["data"] != "synthetic" or r.get("ddp") == {}:
            continue  # ddp == {}: the apply_ddp-defaults comparison row (fsdp rows have ddp None)
        if "bucket_cap_mb=" in r["config"]:
            continue
        name = r["config"]
        lines.setdefault(name, {})[r["world"]] = r["images_per_s"]
    for name, pts in sorted(lines.items()):
        ws = sorted(pts)
        if len(ws) > 1:
            ax.plot(ws, [pts[w] for w in ws], marker="o", label=name)
    ref = next((v for k, v in lines.items() if k.startswith("ddp") and 1 in v and len(v) > 1), None)
    if ref:
        ws = sorted(ref)
        ax.plot(ws, [ref[1] * w for w in ws], "k:", label="linear scaling of ddp")
    for r in rows:
        if r["strategy"] == "baseline":
            ax.axhline(r["images_per_s"], ls="--", lw=1, color="grey" if r["threads"] == 1 else "brown",
                       label=r["config"])
    ax.set_xlabel("world size (ranks; CPU: 1 thread each)")
    ax.set_ylabel("images/s (all ranks)")
    ax.set_xticks(sorted({r["world"] for r in rows}))
    ax.set_title(f"ResNet-50 / 32x32 training throughput\n{sub}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out.append(save_figure(fig, docs_dir, "train_throughput.png"))

    measured = [r for r in record["rows"] if "error" not in r]  # the memory-only AdamW rows time nothing
    mem = [r for r in measured if r["strategy"] in STRATEGIES and r["world"] == max(x["world"] for x in rows)
           and r["variant"] == "sync" and r["data"] == "synthetic" and not r["compile"] and r.get("ddp") != {}
           and "bucket_cap_mb=" not in r["config"]]
    if mem:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        names = [r["config"] for r in mem]
        x = range(len(mem))
        bottom = [0.0] * len(mem)
        for key, label in (("param_mib", "parameters"), ("grad_mib", "gradients"), ("optim_mib", "optimizer state")):
            vals = [r[key] for r in mem]
            ax.bar(x, vals, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, vals)]
        held = [r.get("param_in_step_mib", 0) - r["param_mib"] for r in mem]
        idx = [i for i, (h, r) in enumerate(zip(held, mem)) if h > 0.01 * r["param_mib"]]
        if idx:  # zero2: the gathered parameters are kept from forward to backward
            ax.bar(idx, [held[i] for i in idx], bottom=[bottom[i] for i in idx], fill=False, hatch="//",
                   edgecolor="grey", label="unsharded parameters held during the step")
        ax.scatter(x, [r["peak_mib"] for r in mem], marker="_", s=600, color="k", label=f"peak ({mem[0]['peak_kind']})")
        if mem[0].get("rss_floor_mib"):
            ax.scatter(x, [r["rss_floor_mib"] for r in mem], marker="_", s=600, color="grey",
                       label="process RSS before the model was built")
        ax.set_xticks(list(x), names, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(f"MiB per rank (world size {mem[0]['world']}, fullest rank)")
        ax.set_title(f"Memory per rank by strategy (local shards)\n{sub}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.grid(axis="y", alpha=0.3)
        out.append(save_figure(fig, docs_dir, "train_memory.png"))
    return out


# ------------------------------------------------------------------ main


def fake_cifar(root: Path, n_train: int = 4096) -> Path:
    """The official-format fake set (scripts/make_fake_cifar100.py) so the real loading code runs offline."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_fake_cifar100", REPO_ROOT / "scripts" / "make_fake_cifar100.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write(root, n_train, 16, seed=0)
    return root


def bench(cfg: BenchConfig) -> int:
    from common.device import get_device

    t_start = time.perf_counter()
    if cfg.data_dir and not (Path(cfg.data_dir) / "cifar-100-python").is_dir():
        raise UsageError(f"--data-dir {cfg.data_dir} holds no cifar-100-python/ folder")
    device = get_device(cfg.device)
    n_gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    print("probing FLOPs per image and the GEMM rates ...", file=sys.stderr, flush=True)
    flops = train_flops_per_image()
    probe_info = probe(device.type, cfg.threads)
    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        tmp = Path(tmp)
        data_dir = cfg.data_dir or str(fake_cifar(tmp / "cifar"))
        launches = plan(cfg, device.type, n_gpus, probe_info["bf16_fast"], data_dir)
        results = []
        for world, runs in launches.items():
            results += launch(world, runs, cfg, tmp)
    if not results:
        print("error: no configuration was measured (see the launch output above)", file=sys.stderr)
        return 1
    rows, goals, notes, extra = analyze(results, flops, probe_info, cfg, device.type, not cfg.data_dir)
    extra["wall_s"] = time.perf_counter() - t_start
    extra["plan"] = {str(w): [r["name"] for r in runs] for w, runs in launches.items()}
    rec = build_record(cfg, rows, goals, notes, extra, device.type)
    write_record(rec, Path(cfg.results_dir) if cfg.results_dir else RESULTS_DIR)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except SystemExit as e:  # --help, or a bad flag already said on one line
        return int(e.code or 0)
    try:
        return bench(cfg)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
