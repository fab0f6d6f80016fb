"""Logit distillation from the unpruned teacher into a pruned student (Minitron's retraining step), on a token
budget, with checkpoints that resume to the same loss curve.

    python -m projects.infer.distill --student runs/infer/pruned --out runs/infer/distilled [--tokens 65536]
    python -m projects.infer.distill --preset smoke --student ... --out ...    # seconds: checks the loop

    from projects.infer.distill import DistillConfig, DistillData, distill
    data = DistillData(tok, cfg.sources, cfg.seq_len)
    log = distill(student, teacher, data, cfg, out_dir="runs/x")   # student trained in place; resumes from runs/x/ckpt

Objective: forward KL(p_teacher || p_student) of the next-token distributions at temperature T (times T^2,
as Hinton et al.), averaged over tokens; optionally plus `hidden_weight` x the mean squared error between
the final hidden states (the input of the last RMSNorm; the teacher's restricted to the hidden channels the
pruning kept). AdamW (betas 0.9/0.95) on every student parameter (`train_embeddings=False` freezes the tied
embedding/head), linear warm-up then cosine decay to `min_lr` x lr over the budget, gradient norm clipped at
1. Matmuls under bf16 autocast where the hardware does bf16 (common.device.bf16_native; fp32 master weights,
softmax and loss in fp32), the teacher held in bf16 there.

Data: windows of `seq_len` tokens from WikiText-2 *valid*, tiny-shakespeare and WordNet glosses
(quantize.calibration_text; never WikiText-2 test, which perplexity is reported on), each window's source
drawn by the `sources` weights. Batch k is a function of (seed, k) alone, so a resumed run sees the batches an
uninterrupted one would. A source whose text is missing here (WordNet without wordnet-base) is left out and
the run says so.

Checkpoints (`out/ckpt/`, every `ckpt_every` steps and at the end): student.safetensors (the weights),
optim.safetensors (AdamW's moments and step per parameter name), state.json (step, tokens, losses, the
config that fixes the run); written into a temporary folder, synced and swapped in (common.files.replace_dir),
so a crash leaves the previous checkpoint. Only tensors are stored (safetensors), nothing is unpickled. A
checkpoint of another run (different budget, data or schedule) is refused rather than silently continued.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import config
from common.device import bf16_native, get_device
from common.files import replace_dir

# the config fields that define the run: a checkpoint written under other values is not resumed
RUN_FIELDS = ("tokens", "batch", "seq_len", "lr", "min_lr", "warmup", "weight_decay", "temperature",
              "hidden_weight", "train_embeddings", "sources", "seed")


@dataclass
class DistillConfig:
    student: str = ""
    """HF folder of the pruned student (prune.py / the compress bench writes one)"""
    teacher: str = "smollm2-135m"
    """the unpruned teacher: a model name or HF folder"""
    out: str = "runs/infer/distill"
    """output folder: ckpt/ while training, model/ (HF folder) at the end"""
    tokens: int = 65536
    """token budget (student tokens; steps = tokens // (batch * seq_len))"""
    batch: int = 4
    """windows per step"""
    seq_len: int = 256
    """tokens per window"""
    lr: float = 1e-4
    """peak learning rate (AdamW)"""
    min_lr: float = 0.1
    """final learning rate as a fraction of lr (cosine decay)"""
    warmup: float = 0.05
    """fraction of the steps spent in linear warm-up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    temperature: float = 1.0
    """softmax temperature of the KL (loss scaled by T^2)"""
    hidden_weight: float = 0.0
    """weight of the final-hidden-state MSE term (0 = logits only)"""
    train_embeddings: bool = True
    """also train the (tied) embedding / head"""
    sources: str = "wikitext2-valid:0.5,tinyshakespeare:0.25,wordnet:0.25"
    """source:weight list (wikitext2-valid, tinyshakespeare, wordnet); never WikiText-2 test"""
    ckpt_every: int = 0
    """steps between checkpoints (0 = only at the end)"""
    seed: int = 0
    """data order"""
    bf16: Literal["auto", "on", "off"] = "auto"
    """bf16 autocast: auto = where the hardware does bf16"""
    threads: int = 0
    """torch threads (0 = torch default)"""
    device: str = "auto"
    """auto, cpu, cuda"""
    preset: Literal["default", "full", "smoke"] = "default"
    """which preset this config started from"""


def full() -> DistillConfig:
    return DistillConfig(tokens=1_048_576, batch=8, seq_len=512, lr=1e-4, ckpt_every=50, preset="full")


def smoke() -> DistillConfig:
    return DistillConfig(tokens=2048, batch=2, seq_len=128, preset="smoke")


PRESETS = {"default": DistillConfig, "full": full, "smoke": smoke}


# ---------------------------------------------------------------- data
def parse_sources(spec: str) -> dict[str, float]:
    out = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        out[name] = float(w or 1)
    return out


class DistillData:
    """Token streams of the distillation sources; `batch(step, n)` -> (n, seq_len) windows, a function of
    (seed, step) only. `skipped` names the sources whose text is not on this machine."""

    def __init__(self, tok, sources: str, seq_len: int, seed: int = 0):
        from projects.infer.quantize import calibration_text
        self.seq_len, self.seed = seq_len, seed
        self.streams, weights, self.skipped = [], [], {}
        for name, w in parse_sources(sources).items():
            try:
                text = calibration_text(name)
            except FileNotFoundError as e:       # WordNet not installed: say so, distill on the others
                self.skipped[name] = str(e).split(":")[0]
                continue
            ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            if ids.numel() <= seq_len:
                raise ValueError(f"source {name} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
            self.streams.append((name, ids))
            weights.append(w)
        if not self.streams:
            raise ValueError(f"no distillation source available ({self.skipped})")
        self.weights = torch.tensor(weights, dtype=torch.float)

    def batch(self, step: int, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        src = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        rows = []
        for s in src:
            ids = self.streams[s][1]
            start = int(torch.randint(0, ids.numel() - self.seq_len, (1,), generator=g))
            rows.append(ids[start:start + self.seq_len])
        return torch.stack(rows)

    def describe(self) -> str:
        tot = float(self.weights.sum())
        parts = [f"{name} {w / tot:.0%} ({ids.numel() / 1e3:.0f}k tokens)"
                 for (name, ids), w in zip(self.streams, self.weights.tolist())]
        return ", ".join(parts) + (f"; left out: {', '.join(f'{k} ({v})' for k, v in self.skipped.items())}"
                                   if self.skipped else "")


# ---------------------------------------------------------------- loss, schedule
class _KD(torch.autograd.Function):
    """T^2 * mean over rows of KL(softmax(t/T) || softmax(s/T)) and its gradient T/n (softmax(s/T) - softmax(t/T)),
    computed in one pass over row chunks that stay in cache: over a 49k vocabulary the unfused version (log-softmax,
    exp, sub, mul and their backward over (tokens, V) fp32 tensors) took a third of a distillation step."""

    @staticmethod
    def forward(ctx, s, t, T: float, chunk: int):
        s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        n = s2.shape[0]
        grad = torch.empty(s2.shape, dtype=torch.float32, device=s.device)
        total = torch.zeros((), dtype=torch.float64, device=s.device)
        for i in range(0, n, chunk):
            ls = torch.log_softmax(s2[i:i + chunk].float() / T if T != 1 else s2[i:i + chunk].float(), -1)
            lt = torch.log_softmax(t2[i:i + chunk].float() / T if T != 1 else t2[i:i + chunk].float(), -1)
            pt = lt.exp()
            total += (pt * (lt - ls)).sum(dtype=torch.float64)
            grad[i:i + chunk] = ls.exp_().sub_(pt).mul_(T / n)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = s.shape, s.dtype
        return (total * (T * T / n)).float()

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (grad * g).view(ctx.shape).to(ctx.dtype), None, None, None


def kd_loss(student_logits, teacher_logits, temperature: float = 1.0, chunk: int = 64) -> torch.Tensor:
    """Forward KL(p_t || p_s) at temperature T, times T^2, mean over tokens; logits (..., V). The teacher's
    logits get no gradient."""
    return _KD.apply(student_logits, teacher_logits.detach(), float(temperature), chunk)


def lr_at(step: int, steps: int, cfg: DistillConfig) -> float:
    warm = max(1, round(cfg.warmup * steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    p = (step - warm) / max(1, steps - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * p)))


def use_bf16(cfg: DistillConfig, device) -> bool:
    return cfg.bf16 == "on" or (cfg.bf16 == "auto" and bf16_native(device))


# ---------------------------------------------------------------- checkpoints
def _trainable(student, cfg) -> list[tuple[str, torch.nn.Parameter]]:
    emb = student.tok_embeddings.weight
    return [(n, p) for n, p in student.named_parameters() if cfg.train_embeddings or p is not emb]


def _run_key(cfg: DistillConfig) -> dict:
    return {k: getattr(cfg, k) for k in RUN_FIELDS}


def save_checkpoint(path: Path, student, opt, named, state: dict) -> None:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        sd = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
        if student.args.tie_embeddings:
            sd.pop("output.weight", None)
        save_file(sd, tmp / "student.safetensors")
        moments = {}
        for name, p in named:
            for k, v in opt.state.get(p, {}).items():
                moments[f"{name}::{k}"] = v.detach().reshape(-1) if k == "step" else v.detach().contiguous()
        save_file(moments, tmp / "optim.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        replace_dir(tmp, path)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: Path, student, opt, named, cfg) -> dict | None:
    """The saved state dict (student and optimizer restored in place), or None when there is none."""
    from safetensors.torch import load_file
    path = Path(path)
    if not (path / "state.json").is_file():
        return None
    state = json.loads((path / "state.json").read_text())
    if state.get("run") != _run_key(cfg):
        diff = {k: (state.get("run", {}).get(k), v) for k, v in _run_key(cfg).items()
                if state.get("run", {}).get(k) != v}
        raise ValueError(f"{path} is a checkpoint of another run (saved vs now: {diff}); use another --out")
    sd = load_file(path / "student.safetensors")
    missing = student.load_state_dict(sd, strict=False).missing_keys
    if [k for k in missing if k != "output.weight"]:
        raise ValueError(f"{path}/student.safetensors lacks {missing[:3]}")
    if student.args.tie_embeddings:
        student.output.weight = student.tok_embeddings.weight
    moments = load_file(path / "optim.safetensors")
    for name, p in named:
        st = {k.split("::", 1)[1]: v for k, v in moments.items() if k.split("::", 1)[0] == name}
        if st:
            st["step"] = st["step"].reshape(())
            opt.state[p] = st
    return state


# ---------------------------------------------------------------- the loop
def distill(student, teacher, data: DistillData, cfg: DistillConfig, out_dir: str | Path | None = None,
            hidden_index: list[int] | None = None, stop_at: int | None = None, progress: bool = True) -> dict:
    """Train `student` (fp32 master weights, in place) against `teacher` for cfg.tokens tokens. With out_dir,
    resumes from out_dir/ckpt and checkpoints there; `stop_at` ends after that step (as an interruption would,
    after a checkpoint). Returns {"losses", "steps", "tokens", "seconds", "resumed_from", "bf16"}."""
    device = student.norm.weight.device
    steps = cfg.tokens // (cfg.batch * cfg.seq_len)
    if steps < 1:
        raise ValueError(f"a budget of {cfg.tokens} tokens is less than one step of {cfg.batch}x{cfg.seq_len}")
    bf16 = use_bf16(cfg, device)
    named = _trainable(student, cfg)
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    ckpt = Path(out_dir) / "ckpt" if out_dir is not None else None
    state = load_checkpoint(ckpt, student, opt, named, cfg) if ckpt is not None else None
    start = state["step"] if state else 0
    losses = list(state["losses"]) if state else []
    seconds = state["seconds"] if state else 0.0
    hidden = {}
    hooks = []
    if cfg.hidden_weight:
        hooks = [m.norm.register_forward_pre_hook(lambda mod, a, k=k: hidden.__setitem__(k, a[0]))
                 for k, m in (("s", student), ("t", teacher))]
    idx = torch.tensor(hidden_index, device=device) if hidden_index is not None else None
    end = min(steps, stop_at) if stop_at is not None else steps
    student.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, end), desc="distill", disable=not progress, leave=False, initial=start, total=steps)
    try:
        for step in bar:
            x = data.batch(step, cfg.batch).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, steps, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = student(x)
            loss = kd_loss(s_logits, t_logits, cfg.temperature)
            if cfg.hidden_weight:
                th = hidden["t"].float()
                th = th[..., idx] if idx is not None else th
                loss = loss + cfg.hidden_weight * F.mse_loss(hidden["s"].float(), th)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
            opt.step()
            losses.append(loss.item())
            if progress:
                done = (step + 1 - start) * cfg.batch * cfg.seq_len
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{done / (time.perf_counter() - t0):.0f}")
            last = step + 1 == end
            if ckpt is not None and ((cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or last):
                save_checkpoint(ckpt, student, opt, named, {
                    "step": step + 1, "tokens": (step + 1) * cfg.batch * cfg.seq_len, "losses": losses,
                    "seconds": seconds + time.perf_counter() - t0, "run": _run_key(cfg),
                    "model_args": dataclasses.asdict(student.args)})
    finally:
        for h in hooks:
            h.remove()
        for p in student.parameters():
            p.requires_grad_(False)
        student.eval()
    return {"losses": losses, "steps": end, "tokens": end * cfg.batch * cfg.seq_len, "bf16": bf16,
            "seconds": seconds + time.perf_counter() - t0, "resumed_from": start}


# ---------------------------------------------------------------- CLI
def main(argv=None) -> int:
    cfg = config.parse(DistillConfig, argv, prog="python -m projects.infer.distill",
                       description=__doc__.splitlines()[0], presets=PRESETS)
    from projects.infer.weights import load, resolve, save_hf
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        if not cfg.student:
            raise ValueError("--student is required (a HF folder of the pruned model)")
        device = get_device(cfg.device)
        student, tok = load(cfg.student, device, torch.float32)
        teacher, _ = load(cfg.teacher, device, torch.bfloat16 if use_bf16(cfg, device) else torch.float32)
        data = DistillData(tok, cfg.sources, cfg.seq_len, cfg.seed)
        plan_p = resolve(cfg.student) / "pruning.json"
        hidden = json.loads(plan_p.read_text())["hidden"] if plan_p.is_file() else None
        print(f"distilling on {data.describe()}", file=sys.stderr)
        log = distill(student, teacher, data, cfg, cfg.out, hidden_index=hidden)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = json.loads((resolve(cfg.student) / "config.json").read_text())
    out = save_hf(student, Path(cfg.out) / "model", base, tok,
                  {"distill.json": json.dumps({"config": dataclasses.asdict(cfg), **log}, indent=1)})
    print(f"{log['steps']} steps, {log['tokens']} tokens in {log['seconds']:.0f} s; loss "
          f"{log['losses'][0]:.4f} -> {log['losses'][-1]:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
