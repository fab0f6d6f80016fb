"""Checkpoints that survive a crash at any point and reshard to another world size.

Layout of one checkpoint, `<out>/ckpt/step_00000120/`:
    *.distcp, .metadata    torch.distributed.checkpoint (DCP): model (params + BN buffers) and optimizer
                           momentum, keyed by parameter name; sharded DTensors under FSDP2, so each rank
                           writes its shard and a load at another world size reshards.
    trainer.json           step, epoch, global sample cursor, optimizer param_groups, LR scheduler, GradScaler
    rng_rank{r}.json       every RNG of rank r: Python, NumPy, torch CPU, CUDA
    config.json            the resolved run config
    manifest.json          size + sha256 of every file above; written last
It is written into `.tmp-step_...` and renamed only once the manifest is in, so a directory named step_* is
complete; a load first checks the manifest, so a truncated or corrupted file is detected and reported.
Everything but tensors is JSON: nothing here is unpickled with weights_only=False (only tensors go through
DCP; DCP unpickles its own .metadata, which is covered by the manifest checksum).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer

from common.files import file_sha256, write_atomic

from projects.train.parallelize import unwrap


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete or corrupt: reported in one line."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


# ---------------------------------------------------------------- RNG state, as JSON


def rng_state() -> dict:
    v, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": [v, list(internal), gauss],
           "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(s: dict) -> None:
    v, internal, gauss = s["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(x, dtype=torch.uint8) for x in s["cuda"]])


# ---------------------------------------------------------------- model + optimizer tensors


def _zero_local(optimizer: ZeroRedundancyOptimizer, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, param) of the params whose optimizer state this rank holds under ZeRO-1."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [(names[id(p)], p) for g in optimizer.optim.param_groups for p in g["params"]]


def _tensor_state(model: nn.Module, optimizer) -> tuple[dict, list[dict]]:
    """({"model": {name: T}, "optim": {name: {"momentum_buffer": T}}}, param_groups without tensors).

    DDP and FSDP2 go through torch.distributed.checkpoint.state_dict (names without the DDP `module.`
    prefix, DTensor shards under FSDP2). ZeroRedundancyOptimizer is not supported there; each rank
    contributes the momentum of the params it owns, under the same names, so a zero1 checkpoint loads into
    ddp and back, and at any world size.
    """
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        msd = get_model_state_dict(model)
        osd = {n: {k: v for k, v in optimizer.optim.state[p].items() if torch.is_tensor(v)}
               for n, p in _zero_local(optimizer, model) if p in optimizer.optim.state}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return {"model": msd, "optim": osd}, groups
    msd, full = get_state_dict(model, optimizer)
    return {"model": msd, "optim": full["state"]}, full["param_groups"]


def _write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj))


def save(root: Path, step: int, model: nn.Module, optimizer, trainer: dict, config: dict, keep: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    rank = dist.get_rank()
    root, final = Path(root), step_dir(root, step)
    tmp = root / f".tmp-{final.name}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    tensors, groups = _tensor_state(model, optimizer)
    dcp.save(tensors, checkpoint_id=tmp)
    _write_json(tmp / f"rng_rank{rank}.json", rng_state())
    dist.barrier()
    if rank == 0:
        _write_json(tmp / "trainer.json", {**trainer, "param_groups": groups, "world_size": dist.get_world_size()})
        _write_json(tmp / "config.json", config)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"step": step, "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size,
                                                                      "sha256": file_sha256(p)} for p in files}}
        _write_json(tmp / "manifest.json", manifest)
        if final.exists():  # re-saving the same step (e.g. a resumed run that had nothing left to do)
            shutil.rmtree(final)
        os.replace(tmp, final)  # the checkpoint exists, complete, or not at all
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        rotate(root, final, keep)
    dist.barrier()
    return final


def rotate(root: Path, final: Path, keep: int) -> None:
    """Keep the checkpoint just written and the keep - 1 newest before it; delete older ones. Directories with a
    higher step are left alone: a run resumed from an earlier checkpoint (the newer ones failed verification,
    or the user chose it) must neither lose what it just wrote to them nor delete what it did not write."""
    older = [p for p in complete_dirs(root) if p.name < final.name]
    for old in older[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- finding and verifying


def complete_dirs(root: Path) -> list[Path]:
    """step_* directories under root, newest first (a directory with that name was fully written)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)


def verify(path: Path) -> None:
    """Raise CheckpointError with a one-line reason unless every file matches the manifest."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable manifest.json ({type(e).__name__})") from e
    for rel, meta in files.items():
        p = path / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {rel} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {path} is truncated: {rel} has {p.stat().st_size} bytes, "
                                  f"expected {meta['bytes']}")
        if file_sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: sha256 of {rel} does not match its manifest")
    for name in ("trainer.json", ".metadata"):
        if name not in files:
            raise CheckpointError(f"checkpoint {path} is incomplete: no {name} in its manifest")


def resolve(resume: str, root: Path, warn) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one under root (None if there is none; a
    corrupt one is reported through warn() and skipped); anything else is a path that must verify."""
    if not resume:
        return None
    if resume != "auto":
        verify(Path(resume))
        return Path(resume)
    cands = complete_dirs(root)
    for i, c in enumerate(cands):
        try:
            verify(c)
            return c
        except CheckpointError as e:
            nxt = cands[i + 1].name if i + 1 < len(cands) else "none left"
            warn(f"warning: {e}; trying the previous one ({nxt})")
    if cands:
        raise CheckpointError(f"no usable checkpoint under {root}: all {len(cands)} failed verification")
    return None


def load(path: Path, model: nn.Module, optimizer) -> dict:
    """Collective: load model + optimizer into the (wrapped) model in place, restore this rank's RNG if the
    checkpoint has one for it, and return trainer.json. The caller verified `path` first."""
    path = Path(path)
    tensors, groups = _tensor_state(model, optimizer)
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        # templates for the momentum of the params this rank owns now (any world size)
        tensors["optim"] = {n: {"momentum_buffer": torch.empty_like(p)} for n, p in _zero_local(optimizer, model)}
    try:
        dcp.load(tensors, checkpoint_id=path)
    except (RuntimeError, ValueError, KeyError, CheckpointException) as e:  # e.g. a checkpoint of another model
        # (DCP wraps planner errors in CheckpointException, a BaseException, not an Exception)
        raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {str(e).splitlines()[0]}") from e
    trainer = json.loads((path / "trainer.json").read_text())
    saved_groups = trainer["param_groups"]
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, tensors["model"])
        for n, p in _zero_local(optimizer, model):
            optimizer.optim.state[p] = tensors["optim"][n]
        for opt in (optimizer, optimizer.optim):
            for g, s in zip(opt.param_groups, saved_groups):
                g.update({k: v for k, v in s.items() if k != "params"})
    else:
        if not isinstance(saved_groups[0].get("params"), list):  # saved by zero1: names of every param
            saved_groups = [{**s, "params": g["params"]} for s, g in zip(saved_groups, groups)]
        set_state_dict(model, optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={"state": tensors["optim"], "param_groups": saved_groups})
    rng = path / f"rng_rank{dist.get_rank()}.json"
    if rng.is_file():
        set_rng_state(json.loads(rng.read_text()))
    return trainer


def load_model_weights(path: Path, model: nn.Module) -> nn.Module:
    """Load only the weights of a checkpoint (any strategy, any world size) into a plain model, in one
    process, without a process group: for evaluation and for comparing runs."""
    verify(path)
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    model.load_state_dict(sd["model"])
    return model
