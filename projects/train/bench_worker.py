"""One launch of the training bench: every rank times a list of runs (one model each) and rank 0 writes the
results. Started by projects/train/bench.py, not by hand:

    python -m projects.train.bench_worker SPEC.json OUT.json                          # world size 1
    torchrun --nproc_per_node=2 -m projects.train.bench_worker SPEC.json OUT.json     # world size 2

SPEC.json: {"runs": [run, ...]} where a run is a dict with the keys of `Run` below. OUT.json is rewritten
(atomically) after every run, so a crash keeps the runs before it. A run that raises is recorded with its
error and the launch goes on.

A run's "variants" share one model and are timed interleaved, step by step, so they see the same machine
state: "sync" (the normal step), "nocomm" (DDP step inside no_sync(): the same local compute with the
gradient all-reduce switched off, so 1 - t_nocomm / t_sync is the communication share of the step), "real"
(the real data path of data.py: uint8 split on the device, index + crop/flip + normalize inside the step).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from benchmarks.record import write_atomic
from common.device import autocast_dtype, get_device, synchronize
from common.memory import current_rss_bytes, peak_memory_bytes, reset_peak_memory, tensor_bytes
from projects.train import data, parallelize
from projects.train.model import resnet50_cifar
from projects.train.train import Config as TrainConfig


@dataclass
class Run:
    name: str
    kind: str = "strategy"  # "baseline": the plain loop of pytorch/examples; "strategy": projects.train code
    strategy: str = "ddp"
    optimizer: str = "sgd"  # parallelize.OPTIMIZERS; the memory rows run both
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    threads: int = 1  # intra-op threads per rank (CPU)
    batch_size: int = 32  # images per rank per step
    warmup: int = 2
    steps: int = 4
    variants: list = field(default_factory=lambda: ["sync"])
    ddp: dict = field(default_factory=dict)  # DDP kwargs; {} means parallelize.apply_ddp as train.py uses it
    data_dir: str = ""  # for the "real" variant: folder holding cifar-100-python/
    profile: bool = False  # one extra profiled step: time shares by op category


# ------------------------------------------------------------------ measuring helpers


def trim_heap() -> None:
    """Give freed heap back to the OS so the next run's peak RSS starts near the process floor."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the floor is just higher
        pass


def state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state held by THIS rank, summed from the local shards
    (DTensor.to_local for FSDP2; ZeroRedundancyOptimizer's local optimizer holds only its partition)."""
    params = list(model.parameters())
    local_opt = getattr(optimizer, "optim", optimizer)  # ZeRO-1 wraps a local optimizer over its partition
    opt_tensors = [v for st in local_opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return {"param_bytes": tensor_bytes(params), "grad_bytes": tensor_bytes(p.grad for p in params),
            "optim_bytes": tensor_bytes(opt_tensors)}


# Op categories for "where does the time go": first match wins (names of aten ops and inductor kernels).
CATEGORIES = (
    ("communication", ("gloo", "nccl", "all_reduce", "allreduce", "reduce_scatter", "all_gather", "broadcast")),
    ("convolution", ("conv",)),
    ("matmul", ("addmm", "mm", "matmul", "linear")),
    ("batchnorm", ("batch_norm",)),
    ("fused (inductor)", ("cpp_fused", "triton_", "compiled")),
    ("layout/copy", ("copy_", "to_dense", "reorder", "contiguous", "_to_copy", "clone", "to_mkldnn")),
    ("optimizer", ("_foreach", "sgd", "optimizer")),
    ("elementwise", ("add", "relu", "threshold", "mul", "fill_", "div", "sum", "mean", "log_softmax", "nll")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_shares(step, device: torch.device) -> dict:
    """Self time per op category over one step (CPU: self CPU time; CUDA: self device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        synchronize(device)
    shares: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        t = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        if t <= 0:
            continue
        shares[categorize(ev.key)] = shares.get(categorize(ev.key), 0.0) + t
        top.append((t, ev.key, ev.count))
    total = sum(shares.values()) or 1.0
    top.sort(reverse=True)
    return {"category_share": {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "share": t / total, "calls": n} for t, k, n in top[:12]],
            "total_ms": total / 1e3}


# ------------------------------------------------------------------ one run


def build(run: Run, device: torch.device):
    """The model and optimizer of a run, set up the way its kind says."""
    torch.manual_seed(0)  # same weights on every rank
    model = resnet50_cifar(100).to(device)
    if run.kind == "baseline":
        # pytorch/examples imagenet/main.py: model.train(), SGD(lr, momentum=0.9, weight_decay=1e-4),
        # nn.CrossEntropyLoss; NCHW, fp32, eager, one process, no wrapper.
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    # projects.train's order (parallelize.py), as train.py applies it. Under zero2/fsdp only the inputs are
    # channels_last (FSDP2 refuses NHWC parameters): oneDNN/cuDNN then run the convolutions NHWC anyway.
    model = parallelize.parallelize(model, run.strategy, device, channels_last=run.channels_last,
                                    compile=run.compile, ddp_kwargs=run.ddp)
    t = TrainConfig()  # train.py's optimizer settings
    return model, parallelize.build_optimizer(model, run.strategy, run.optimizer, t.lr, t.momentum, t.weight_decay)


def measure(run: Run, device: torch.device, rank: int, world: int, bar) -> dict:
    torch.set_num_threads(run.threads)
    trim_heap()
    rss_floor = current_rss_bytes()
    reset_peak_memory(device)
    model, opt = build(run, device)
    model.train()
    amp = autocast_dtype(device, run.precision)
    b = run.batch_size
    fmt = torch.channels_last if run.channels_last else torch.contiguous_format

    # Synthetic batch of the real shape, made once: the data path is not what these steps measure.
    g = torch.Generator().manual_seed(1000 + rank)
    x_syn = torch.randn(b, 3, 32, 32, generator=g).to(device).contiguous(memory_format=fmt)  # (b, 3, 32, 32)
    y_syn = torch.randint(0, 100, (b,), generator=g).to(device)
    real = {}
    if "real" in run.variants:
        split = data.load_split("cifar100", True, device, run.data_dir)
        real = {"split": split, "perm": data.epoch_permutation(len(split.labels), 0, 0, device), "cursor": 0,
                "epoch": 0}

    def batch(variant: str):
        if variant != "real":
            return x_syn, y_syn
        G = world * b
        if real["cursor"] + G > len(real["split"].labels):  # next epoch, as train.py does
            real["epoch"] += 1
            real["cursor"] = 0
            real["perm"] = data.epoch_permutation(len(real["split"].labels), 0, real["epoch"], device)
        xs, ys = data.train_batch(real["split"], real["perm"], real["cursor"], real["epoch"], 0, world, rank, b,
                                  1, True)  # (1, b, 3, 32, 32) uint8, (1, b)
        real["cursor"] += G
        return data.normalize(xs[0], "cifar100", run.channels_last), ys[0]

    criterion = nn.CrossEntropyLoss()
    scaler = parallelize.grad_scaler(run.strategy, device, enabled=run.precision == "fp16")  # as train.py

    def step(variant: str = "sync", keep_grads: bool = False):
        x, y = batch(variant)
        comm_off = variant == "nocomm" and isinstance(model, nn.parallel.DistributedDataParallel)
        with model.no_sync() if comm_off else contextlib.nullcontext():
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(x)  # (b, 100)
                loss = criterion(out, y) if run.kind == "baseline" else F.cross_entropy(out.float(), y)
            if run.kind == "baseline":
                opt.zero_grad()  # the examples' order: zero_grad, backward, step
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if run.kind != "baseline" and not keep_grads:
            opt.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {v: [] for v in run.variants}
    synchronize(device)
    t0 = time.perf_counter()
    step(run.variants[0])
    synchronize(device)
    first_step_s = time.perf_counter() - t0  # includes compilation when compile is on
    bar.update(1)
    for i in range(run.warmup * len(run.variants) - 1):
        step(run.variants[(i + 1) % len(run.variants)])
        bar.update(1)
    synchronize(device)
    for _ in range(run.steps):
        for v in run.variants:  # interleaved: every variant sees the same machine state
            t0 = time.perf_counter()
            step(v)
            synchronize(device)
            times[v].append(time.perf_counter() - t0)
            bar.update(1)

    # One more step to count state: parameters as held during the step (after forward: FSDP2 zero2 keeps
    # them unsharded until backward), then at rest with grads and optimizer state all present.
    held = {}
    hook = parallelize.unwrap(model).register_forward_hook(
        lambda m, i, o: held.__setitem__("param_bytes_in_step", tensor_bytes(m.parameters())))
    step(run.variants[0], keep_grads=True)
    hook.remove()
    mem = {**state_bytes(model, opt), **held}
    opt.zero_grad(set_to_none=True)
    synchronize(device)
    mem["peak_bytes"] = peak_memory_bytes(device)
    mem["rss_floor_bytes"] = rss_floor if device.type == "cpu" else None
    prof = profile_shares(lambda: step(run.variants[0]), device) if run.profile else None
    return {"times": times, "first_step_s": first_step_s, "memory": mem, "profile": prof}


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m projects.train.bench_worker SPEC.json OUT.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        spec = json.load(f)
    runs = [Run(**r) for r in spec["runs"]]
    device = get_device(spec.get("device", "auto"), int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = parallelize.init_distributed(device, timedelta(seconds=spec.get("collective_timeout_s", 900)))
    results = []
    total = sum((r.warmup + r.steps) * len(r.variants) for r in runs)
    bar = tqdm(total=total, disable=rank != 0, unit="step", desc=f"train bench, world size {world}",
               dynamic_ncols=True, file=sys.stderr)
    try:
        for run in runs:
            bar.set_postfix_str(run.name)
            try:
                res, err = measure(run, device, rank, world, bar), None
            except Exception as e:  # noqa: BLE001 -- recorded in the result, the launch goes on
                res, err = None, f"{type(e).__name__}: {e}"
                if rank == 0:
                    traceback.print_exc()
            per_rank = [None] * world
            dist.all_gather_object(per_rank, {"rank": rank, "result": res, "error": err})
            if rank == 0:
                results.append({"run": run.__dict__, "world": world, "device": str(device),
                                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                "ranks": per_rank})
                write_atomic(argv[1], json.dumps({"results": results}, indent=1))
    finally:
        bar.close()
        dist.barrier()  # no rank tears gloo down while the other still talks to it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
