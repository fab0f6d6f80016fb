"""Parallelism as functions applied to a plain model. `parallelize()` applies them in this order:

    channels_last (ddp/zero1) -> SyncBatchNorm (CUDA, optional) -> compile (per block) -> DDP | FSDP2

and `build_optimizer()` / `grad_scaler()` / `init_distributed()` sit beside it, so train.py, the bench
worker and the tests set a strategy up the same way.

Compile goes before wrapping (as in torchtitan) so each compiled region is one bottleneck block and the
DDP/FSDP hooks stay outside the graphs. Strategies:
- ddp:   DistributedDataParallel; every rank holds params, grads and optimizer state; grads all-reduced
         in buckets overlapped with backward.
- zero1: DDP + ZeroRedundancyOptimizer: optimizer state sharded (each rank steps 1/N of the params, then
         broadcasts them); grads still all-reduced in full.
- zero2: FSDP2 fully_shard(reshard_after_forward=False): params, grads and optimizer state sharded; params
         all-gathered once per step and kept unsharded from forward through backward (ZeRO-2-like traffic).
- fsdp:  FSDP2 fully_shard(reshard_after_forward=True): ZeRO-3, params re-gathered for backward.

The gloo AVG bug (pytorch issue 162338): FSDP2 reduce-scatters fp32/bf16 gradients with ReduceOp.AVG; on
gloo that op has been silently applied as a SUM, so gradients came out world_size times too large with no
error. `apply_fsdp` therefore forces SUM reductions on gloo (`set_force_sum_reduction_for_comms(True)`),
which makes FSDP2 divide by the world size itself after the reduce-scatter; correct whether or not the
installed torch has the bug. `gloo_avg_is_sum()` probes the backend directly, and the equivalence test
checks the FSDP2 gradients against a single-process reference.
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import Literal, get_args

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from projects.train.model import blocks

from common.config import UsageError
from common.device import dist_backend

Strategy = Literal["ddp", "zero1", "zero2", "fsdp"]
Optimizer = Literal["sgd", "adamw"]
STRATEGIES, OPTIMIZERS = get_args(Strategy), get_args(Optimizer)


def init_distributed(device: torch.device, timeout: timedelta | None = None) -> tuple[int, int]:
    """Join torchrun's process group (or make a group of one under plain python); returns (rank, world)."""
    backend, dev_id = dist_backend(device), device if device.type == "cuda" else None
    kw = {"timeout": timeout} if timeout else {}
    if "RANK" not in os.environ:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun hosts the store. Its c10d rendezvous (--standalone, --rdzv-backend=c10d) keeps that store
        # across --max-restarts attempts while env:// init assumes a fresh one, so a restarted gloo group read
        # the dead workers' addresses and hung (seen with torch 2.14). Keys namespaced by attempt avoid it.
        tcp = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", tcp)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), device_id=dev_id, **kw)
    else:
        dist.init_process_group(backend, device_id=dev_id, **kw)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size()


def parallelize(model: nn.Module, strategy: str, device: torch.device, *, channels_last: bool = False,
                sync_bn: bool = False, compile: bool = False, ddp_kwargs: dict | None = None) -> nn.Module:
    """The plain model wrapped for `strategy`, in the order of this module's docstring."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if channels_last and strategy in ("ddp", "zero1"):  # FSDP2: channels_last inputs only
        model = apply_channels_last(model)
    if sync_bn:
        model = apply_sync_bn(model, device)
    if compile:
        model = apply_compile(model)
    if strategy in ("ddp", "zero1"):
        return apply_ddp(model, device, **(ddp_kwargs or {}))
    return apply_fsdp(model, reshard_after_forward=strategy == "fsdp", device=device)


def build_optimizer(model: nn.Module, strategy: str, name: str, lr: float, momentum: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (K = 4 bytes of state per parameter) or AdamW (K = 8: two fp32 moments);
    under zero1 the state is split across ranks by ZeroRedundancyOptimizer."""
    if name == "sgd":
        cls, kw = torch.optim.SGD, dict(lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    elif name == "adamw":
        cls, kw = torch.optim.AdamW, dict(lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")
    if strategy == "zero1":
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **kw)
    return cls(model.parameters(), **kw)


def grad_scaler(strategy: str, device: torch.device, enabled: bool):
    """fp16 loss scaling (CUDA). Sharded grads need the inf/NaN check agreed across ranks: ShardedGradScaler
    all-reduces it; with DDP/ZeRO-1 every rank holds the same all-reduced grads, so the plain one agrees."""
    cls = ShardedGradScaler if strategy in ("zero2", "fsdp") else torch.amp.GradScaler
    return cls(device.type, enabled=enabled)


def apply_channels_last(model: nn.Module) -> nn.Module:
    """NHWC weights: the layout oneDNN and cuDNN convolutions run fastest in (inputs must match).
    Not for FSDP2: fully_shard refuses NHWC-strided parameters; there channels_last inputs alone select the
    NHWC kernels."""
    return model.to(memory_format=torch.channels_last)


def apply_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch. CUDA only: SyncBatchNorm has no CPU kernel."""
    if device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA (SyncBatchNorm does not run on CPU)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each bottleneck block in place (the stem and head are tiny and stay eager)."""
    for b in blocks(model):
        b.compile()
    return model


def apply_ddp(model: nn.Module, device: torch.device, bucket_cap_mb: float = 25, **ddp_kwargs) -> DDP:
    # gradient_as_bucket_view: grads live inside the all-reduce buckets, saving one copy of the grads.
    ddp_kwargs.setdefault("gradient_as_bucket_view", True)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
               bucket_cap_mb=bucket_cap_mb, **ddp_kwargs)


def apply_fsdp(model: nn.Module, reshard_after_forward: bool, device: torch.device) -> nn.Module:
    """FSDP2: one fully_shard unit per bottleneck block (all-gather/reduce-scatter granularity), then the root
    (stem conv/bn + fc). reshard_after_forward=False is zero2, True is fsdp (ZeRO-3)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for b in blocks(model):
        fully_shard(b, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if dist.get_backend() == "gloo":
        # pytorch issue 162338: gloo's ReduceOp.AVG in reduce-scatter has silently summed. Force SUM and let
        # FSDP2 divide by world size after the collective (same numbers as AVG, on every torch version).
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)
    return model


def gloo_avg_is_sum(group=None) -> bool:
    """True when this process group's reduce-scatter with ReduceOp.AVG returns the SUM (issue 162338)."""
    w = dist.get_world_size(group)
    out = torch.zeros(1)
    try:
        dist.reduce_scatter_tensor(out, torch.ones(w), op=dist.ReduceOp.AVG, group=group)
    except (RuntimeError, ValueError):  # a backend that refuses AVG is not silently wrong
        return False
    return w > 1 and out.item() == w


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (FSDP2 modules are the model itself)."""
    return model.module if isinstance(model, DDP) else model


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool):
    """Gradient communication on (last micro-step) or off (earlier micro-steps of an accumulation).

    Skipping it for all but the last micro-step saves K-1 all-reduces / reduce-scatters per step; the
    gradients accumulate locally and the final reduction carries their sum.
    """
    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)  # recursive over the block units
        yield
    else:
        yield


def sync_buffers(model: nn.Module) -> None:
    """Average the BatchNorm running statistics over ranks (timm's distribute_bn).

    Each rank updates them from its own batches; under FSDP2 they are replicated, unsharded tensors that
    drift apart, and DDP only broadcasts rank 0's at the next forward. Averaging before eval and checkpoint
    makes evaluation the same on every rank and the saved buffers a function of all ranks' data.
    """
    w = dist.get_world_size()
    if w == 1:
        return
    bufs = [b for b in unwrap(model).buffers() if b.is_floating_point()]
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= w
    off = 0
    for b in bufs:
        b.copy_(flat[off:off + b.numel()].view_as(b))
        off += b.numel()
