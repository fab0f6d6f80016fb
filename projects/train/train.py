"""Distributed ResNet-50 training on CIFAR-100 (DDP, ZeRO-1, FSDP2 as ZeRO-2 and ZeRO-3), one main().

    # one process (CPU or one GPU); plain python is world size 1
    python -m projects.train.train --preset smoke --data synthetic
    # N processes on one host: gloo on CPU, NCCL on GPUs
    torchrun --nproc_per_node=2 -m projects.train.train --strategy fsdp --precision bf16 --accum 2 \
        --data-dir data --download
    # the CIFAR-100 recipe (docs/train.md; not run on this repo's CPU machines)
    torchrun --nproc_per_node=8 -m projects.train.train --preset cifar100 --batch-size 16 --data-dir data --download
    # fault tolerance: a dead rank makes torchrun restart the group, which resumes from the last checkpoint
    torchrun --nproc_per_node=2 --max-restarts=3 -m projects.train.train --resume auto --ckpt-every 200 ...
    # two hosts: run on each, same endpoint (torchrun's own c10d rendezvous, no launcher of ours)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 \
        --rdzv-id=job1 -m projects.train.train ...
    # a few CPU minutes on real images that reach an accuracy random weights cannot (docs/train.md)
    python -m projects.train.train --preset fashion

Every flag is a field of Config below (`--help` prints them with their docs); `--preset NAME` starts from a
preset function and the other flags override it. Metrics go to <out-dir>/metrics.jsonl and to Weights &
Biases (offline unless WANDB_API_KEY is set; `--wandb off` disables it).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import config
from common.config import UsageError
from common.device import autocast_dtype, get_device
from projects.train import checkpoint, data, parallelize
from projects.train.model import resnet50_cifar


@dataclass
class Config:
    strategy: parallelize.Strategy = "ddp"
    """ddp | zero1 (DDP + sharded optimizer) | zero2 | fsdp (FSDP2 ZeRO-2/3)"""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32 | bf16 autocast | fp16 autocast + GradScaler (CUDA only)"""
    device: str = "auto"
    """auto (CUDA if present, else CPU), cpu or cuda"""
    data: Literal["cifar100", "fashion-mnist", "synthetic"] = "cifar100"
    """cifar100 | fashion-mnist (Debian package, offline) | synthetic"""
    data_dir: str = ""
    """folder holding cifar-100-python/ (default data/) or the Fashion-MNIST IDX files (default
    /usr/share/datasets/fashion-mnist)"""
    download: bool = False
    """download CIFAR-100 into --data-dir if it is not there (needs network)"""
    train_limit: int = 0
    """use only the first N train images (0: all)"""
    eval_limit: int = 0
    """evaluate on the first N test images only (0: all)"""
    batch_size: int = 128
    """images per rank per micro-step; global batch = batch_size x world x accum"""
    accum: int = 1
    """gradient accumulation micro-steps per optimizer step"""
    epochs: int = 200
    """epochs to train (ignored when --max-steps is set)"""
    max_steps: int = 0
    """optimizer steps to train (0: epochs x steps per epoch); the LR schedule spans them"""
    lr: float = 0.1
    """peak learning rate"""
    optimizer: parallelize.Optimizer = "sgd"
    """sgd (Nesterov momentum) | adamw (two fp32 moments: twice SGD's optimizer state; wants a far smaller
    --lr)"""
    momentum: float = 0.9
    """SGD momentum (Nesterov)"""
    weight_decay: float = 5e-4
    """L2 weight decay on every parameter"""
    label_smoothing: float = 0.0
    """label smoothing of the training loss"""
    schedule: Literal["cosine", "onecycle"] = "cosine"
    """cosine (linear warm-up, then cosine to 0) | onecycle"""
    warmup: float = 0.01
    """fraction of the steps spent warming up (one-cycle: rising)"""
    augment: bool = True
    """random crop (pad 4) + horizontal flip, on the device"""
    channels_last: bool = False
    """NHWC inputs (and weights, for ddp/zero1: FSDP2 refuses NHWC params)"""
    compile: bool = False
    """torch.compile each bottleneck block"""
    sync_bn: bool = False
    """SyncBatchNorm across ranks (CUDA only)"""
    seed: int = 0
    """seed of the weights, the epoch orders and the augmentation"""
    out_dir: str = "runs/train"
    """metrics.jsonl, config.json and ckpt/ go here"""
    log_every: int = 50
    """log metrics every N steps (the only host syncs of the loop)"""
    eval_every: int = 0
    """evaluate every N steps (0: at the end only)"""
    ckpt_every: int = 0
    """checkpoint every N steps (0: at the end only)"""
    keep: int = 3
    """keep the newest K checkpoints"""
    resume: str = ""
    """'auto' (newest good checkpoint in out-dir/ckpt, if any) or a checkpoint directory"""
    stop_after: int = 0
    """checkpoint and exit after this step, as if interrupted (resume with --resume auto)"""
    wandb: Literal["auto", "online", "offline", "off"] = "auto"
    """auto (online if WANDB_API_KEY is set, else offline) | online | offline | off"""
    progress: bool = True
    """rank-0 progress bar"""
    kill_at_step: int = 0
    """fault injection for tests: the last rank SIGKILLs itself after this step, first attempt only
    (TORCHELASTIC_RESTART_COUNT=0)"""

    def __post_init__(self):
        if self.accum < 1 or self.batch_size < 1:
            raise ValueError("--accum and --batch-size must be >= 1")
        if self.keep < 1 or self.log_every < 1:
            raise ValueError("--keep and --log-every must be >= 1")
        if min(self.max_steps, self.eval_every, self.ckpt_every, self.epochs) < 0:
            raise ValueError("--max-steps, --eval-every, --ckpt-every and --epochs must be >= 0")


# ------------------------------------------------------------------ presets: plain functions


def cifar100() -> Config:
    """The CIFAR-100 recipe for a global batch of 128 (weiaicunzai/pytorch-cifar100, cosine instead of steps):
    on N ranks pass --batch-size 128/N (390 steps per epoch either way)."""
    return Config(batch_size=128, epochs=200, lr=0.1, weight_decay=5e-4, warmup=0.005,
                  eval_every=390, ckpt_every=390, log_every=50)


def fashion() -> Config:
    """A few CPU minutes on real Fashion-MNIST images, one-cycle; bf16 autocast where bf16 runs in hardware
    (faster than fp32 there: the train record's bf16 row), fp32 elsewhere (emulated bf16 is far slower)."""
    from common.device import fast_dtype
    precision = fast_dtype()
    # Picked over a few runs of this check (bf16, zero_init_residual): half this lr with augmentation learned
    # steadily but ended below the threshold, twice it spiked at its peak; this one without augmentation passed
    # with a margin. 100 steps of 32 images is far from overfitting, so crops and flips only slow it.
    return Config(data="fashion-mnist", precision=precision, batch_size=32, max_steps=100, augment=False,
                  lr=0.025, schedule="onecycle", warmup=0.25, label_smoothing=0.0, eval_limit=1000,
                  log_every=10, out_dir="runs/fashion", wandb="off")


def smoke() -> Config:
    """Seconds: tiny batches, few steps (checks that everything runs)."""
    return Config(batch_size=4, max_steps=4, lr=0.01, train_limit=64, eval_limit=32, log_every=2, wandb="off",
                  out_dir="runs/smoke")


PRESETS = {"cifar100": cifar100, "fashion": fashion, "smoke": smoke}


def parse_config(argv: list[str] | None) -> Config:
    """Flags from Config's fields (their docstrings are the help); --preset first, explicit flags win."""
    return config.parse(Config, argv, prog="python -m projects.train.train", description=__doc__.split("\n")[0],
                        presets=PRESETS)


# ------------------------------------------------------------------ schedule, loss, eval


def lr_scheduler(cfg: Config, optimizer, total_steps: int):
    warm = max(1, round(cfg.warmup * total_steps))
    if cfg.schedule == "onecycle":
        if total_steps < 4:
            raise UsageError("--schedule onecycle needs at least 4 steps")
        # OneCycleLR divides by its phase lengths: at least 2 steps of rise, at least 1 of fall
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                   pct_start=min(max(warm, 2), total_steps - 2) / total_steps,
                                                   cycle_momentum=False)   # keep --momentum as given

    def mult(s: int) -> float:  # linear warm-up to the peak, then cosine to 0 at total_steps
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total_steps - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, mult)


@torch.no_grad()
def evaluate(model, split: data.Split, cfg: Config, device, amp_dtype, rank: int, world: int) -> dict:
    """Top-1, top-5 and mean loss over the test split, all-reduced. Every rank runs the same number of
    forwards (FSDP2 all-gathers inside each), the last chunk padded and masked."""
    net = parallelize.unwrap(model)
    net.eval()
    n, b = len(split.labels), cfg.batch_size
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top1, top5, count
    for start in range(0, n, b * world):
        idx = torch.arange(start + rank * b, start + (rank + 1) * b, device=device)
        valid = idx < n
        idx = torch.where(valid, idx, torch.zeros_like(idx))
        x = data.normalize(split.images[idx], cfg.data, cfg.channels_last)
        y = split.labels[idx]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, reduction="none")
        top5 = logits.topk(min(5, logits.size(1)), dim=1).indices  # (b, 5)
        hit = top5 == y[:, None]
        v = valid.double()
        sums += torch.stack([(loss.double() * v).sum(), (hit[:, 0] * v).sum(), (hit.any(1) * v).sum(), v.sum()])
    dist.all_reduce(sums)
    net.train()
    loss, top1, top5, count = sums.tolist()
    return {"eval_loss": loss / count, "eval_top1": top1 / count, "eval_top5": top5 / count}


def _wandb_run(cfg: Config, rank: int):
    mode = cfg.wandb if cfg.wandb != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if rank != 0 or mode == "off" or os.environ.get("WANDB_MODE") == "disabled":
        return None
    import wandb

    return wandb.init(project="mlsys-train", mode=mode, dir=cfg.out_dir, config=dataclasses.asdict(cfg))


# ------------------------------------------------------------------ main


def train(cfg: Config) -> int:
    # ---- processes: torchrun sets RANK/WORLD_SIZE/MASTER_*; plain python is a group of one
    device = get_device(cfg.device, int(os.environ.get("LOCAL_RANK", 0)))
    try:
        amp_dtype = autocast_dtype(device, cfg.precision)
    except ValueError as e:  # fp16 on CPU
        raise UsageError(str(e)) from e
    rank, world = parallelize.init_distributed(device)
    out, ckpt_root = Path(cfg.out_dir), Path(cfg.out_dir) / "ckpt"
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)

    # ---- data: whole splits on the device
    data_dir = cfg.data_dir or ("data" if cfg.data == "cifar100" else None)
    if cfg.download:  # rank 0 downloads first; its error (if any) is every rank's error
        err = [""]
        if rank == 0:
            try:
                data.load_split(cfg.data, True, torch.device("cpu"), data_dir, True, 1)
            except data.DataError as e:
                err[0] = str(e)
        dist.broadcast_object_list(err, src=0)
        if err[0]:
            raise data.DataError(err[0])
    train_set = data.load_split(cfg.data, True, device, data_dir, False, cfg.train_limit)
    test_set = data.load_split(cfg.data, False, device, data_dir, False, cfg.eval_limit)
    G = world * cfg.batch_size * cfg.accum  # images per optimizer step
    steps_per_epoch = len(train_set.labels) // G
    if steps_per_epoch == 0:
        raise UsageError(f"the global batch ({G} images) is larger than the train split ({len(train_set.labels)})")
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # ---- model, then parallelism applied from outside (parallelize.py has the order and why)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = resnet50_cifar(train_set.num_classes).to(device)
    model = parallelize.parallelize(model, cfg.strategy, device, channels_last=cfg.channels_last,
                                    sync_bn=cfg.sync_bn, compile=cfg.compile)
    optimizer = parallelize.build_optimizer(model, cfg.strategy, cfg.optimizer, cfg.lr, cfg.momentum,
                                            cfg.weight_decay)
    scheduler = lr_scheduler(cfg, optimizer, total_steps)
    scaler = parallelize.grad_scaler(cfg.strategy, device, enabled=cfg.precision == "fp16")

    # ---- resume: newest good checkpoint (auto) or the one named; the data position is a global cursor
    step, epoch, cursor = 0, 0, 0
    path = None
    box = ["", ""]   # (path, error): a bad checkpoint found by rank 0 stops every rank with its message
    if rank == 0:
        try:
            path = checkpoint.resolve(cfg.resume, ckpt_root, say)
            box[0] = str(path) if path else ""
        except checkpoint.CheckpointError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1]:
        raise checkpoint.CheckpointError(box[1])
    if box[0]:
        st = checkpoint.load(Path(box[0]), model, optimizer)
        step, epoch, cursor = st["step"], st["epoch"], st["cursor"]
        if st.get("total_steps", total_steps) != total_steps:
            # the LR schedule is a function of total_steps: a different one would jump (or overrun OneCycle)
            raise UsageError(f"checkpoint {box[0]} is from a run of {st['total_steps']} steps, this one has "
                             f"{total_steps} (another --epochs/--max-steps or global batch); pass "
                             f"--max-steps {st['total_steps']} to continue it")
        scheduler.load_state_dict(st["scheduler"])
        if st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        say(f"resumed from {box[0]} at step {step} (epoch {epoch}, sample {cursor}; saved at world size "
            f"{st['world_size']}, now {world})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None
    run = _wandb_run(cfg, rank)

    def log(rec: dict) -> None:
        if rank == 0:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            if run is not None:
                run.log(rec, step=rec["step"])

    def save() -> None:
        parallelize.sync_buffers(model)
        trainer = {"step": step, "epoch": epoch, "cursor": cursor, "total_steps": total_steps,
                   "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "global_batch": G}
        checkpoint.save(ckpt_root, step, model, optimizer, trainer, dataclasses.asdict(cfg), cfg.keep)

    # ---- the loop
    # Train metrics accumulate on the device; the only host syncs are at log/eval/checkpoint steps.
    acc = torch.zeros(2, device=device)  # loss sum, correct (this rank, since the last log)
    perm = data.epoch_permutation(len(train_set.labels), cfg.seed, epoch, device)
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0 or not cfg.progress, unit="step",
               dynamic_ncols=True)
    t_log, start_step = time.perf_counter(), step
    step_log = step
    model.train()
    while step < total_steps:
        if cursor + G > len(train_set.labels):  # epoch done (the last incomplete global batch is dropped)
            epoch, cursor = epoch + 1, 0
            perm = data.epoch_permutation(len(train_set.labels), cfg.seed, epoch, device)
        xs, ys = data.train_batch(train_set, perm, cursor, epoch, cfg.seed, world, rank, cfg.batch_size,
                                  cfg.accum, cfg.augment)  # (K, b, 3, 32, 32) uint8, (K, b)
        for m in range(cfg.accum):
            # Gradient communication only on the last micro-step: earlier ones accumulate locally.
            with parallelize.grad_sync(model, enabled=m == cfg.accum - 1):
                x = data.normalize(xs[m], cfg.data, cfg.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(x)  # (b, classes)
                    loss = F.cross_entropy(logits.float(), ys[m], label_smoothing=cfg.label_smoothing)
                scaler.scale(loss / cfg.accum).backward()  # the K micro-steps sum to the mean over K*b
            acc += torch.stack([loss.detach() * cfg.batch_size, (logits.argmax(1) == ys[m]).sum().float()])
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step, cursor = step + 1, cursor + G
        bar.update(1)

        if step % cfg.log_every == 0 or step == total_steps:
            dist.all_reduce(acc)
            loss_sum, correct = acc.tolist()  # one host sync per log window
            seen = (step - step_log) * G
            ips = seen / (time.perf_counter() - t_log)
            rec = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum / seen,
                   "train_acc": correct / seen, "images_per_s": ips, "time": time.time()}
            log(rec)
            bar.set_postfix(loss=f"{rec['train_loss']:.3f}", img_s=f"{ips:.1f}")
            acc.zero_()
            t_log, step_log = time.perf_counter(), step
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps:
            parallelize.sync_buffers(model)
            ev = evaluate(model, test_set, cfg, device, amp_dtype, rank, world)
            log({"step": step, "epoch": epoch, **ev})
            say(f"step {step}: eval loss {ev['eval_loss']:.4f} top-1 {ev['eval_top1']:.4f} "
                f"top-5 {ev['eval_top5']:.4f}")
            t_log = time.perf_counter()  # eval time is not training throughput
        if (cfg.ckpt_every and step % cfg.ckpt_every == 0) or step == total_steps or step == cfg.stop_after:
            save()
            t_log = time.perf_counter()
        if step == cfg.stop_after:
            say(f"stopping after step {step} as asked (--stop-after); resume with --resume auto")
            break
        if step == cfg.kill_at_step and rank == world - 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            os.kill(os.getpid(), signal.SIGKILL)  # a crash with no chance to clean up

    if start_step == total_steps:  # resumed a finished run (e.g. at another world size): evaluate, re-save
        parallelize.sync_buffers(model)
        ev = evaluate(model, test_set, cfg, device, amp_dtype, rank, world)
        log({"step": step, "epoch": epoch, **ev})
        say(f"step {step}: eval loss {ev['eval_loss']:.4f} top-1 {ev['eval_top1']:.4f} top-5 {ev['eval_top5']:.4f}")
        if not checkpoint.step_dir(ckpt_root, step).exists():
            save()
    bar.close()
    if metrics_file:
        metrics_file.close()
    if run is not None:
        run.finish()
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except SystemExit as e:  # --help, or a bad flag already said on one line
        return int(e.code or 0)
    try:
        return train(cfg)
    except (UsageError, data.DataError, checkpoint.CheckpointError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
