"""Quantization-aware training: fake-quant with a straight-through estimator, a short fine-tune, then the
real int4 / int8 / W8A8 layout.

    from projects.infer.qat import prepare_qat, qat_finetune, convert_qat
    prepare_qat(model, "int4", group_size=128)         # block linears -> FakeQuantLinear
    qat_finetune(model, teacher, calib_ids, steps=20)  # KL to the float teacher's next-token distribution
    convert_qat(model)                                 # -> Int4Linear (RTN of the fine-tuned weights)

Forward uses the weights as they will be stored, ŵ = Q(w), with the gradient passed straight through
(w + (Q(w) - w).detach()), so training moves w where its rounded value lowers the loss. For W8A8 the
activations are fake-quantized per token too. The objective is distillation (KL between the float model's
and the fake-quant model's next-token distributions) on calibration text (tiny-shakespeare), not next-token
loss on a corpus: the fine-tune then recovers what quantization lost instead of adapting the model to a new
domain, which would move WikiText-2 perplexity for reasons that are not quantization.
Only the block linears train (the embedding/head stays as is, then int8 as in the PTQ schemes).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from projects.infer.quantize import (Int4Linear, Int8Linear, W8A8Linear, _quantize_head_int8, block_linears,
                                     fake_int4, int8_per_channel)


def fake_int8(w):
    q, s = int8_per_channel(w.detach())
    return (q.float() * s[:, None]).to(w.dtype)


def fake_int8_act(x):
    """Per-token symmetric int8 round trip of activations (..., K)."""
    s = (x.detach().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
    return torch.round(x / s).clamp(-127, 127) * s


class FakeQuantLinear(nn.Module):
    def __init__(self, lin: nn.Linear, scheme: str, group_size: int):
        super().__init__()
        self.weight = lin.weight
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.scheme, self.group_size = scheme, group_size

    def forward(self, x):
        w = self.weight
        wq = fake_int4(w, self.group_size) if self.scheme == "int4" else fake_int8(w)
        w = w + (wq - w).detach()                                 # straight-through estimator
        if self.scheme == "w8a8":
            x = x + (fake_int8_act(x) - x).detach()
        return F.linear(x, w)


SCHEMES = ("int4", "int8", "w8a8")


def prepare_qat(model, scheme: str = "int4", group_size: int = 128):
    if scheme not in SCHEMES:
        raise ValueError(f"unknown QAT scheme {scheme!r}; choose {', '.join(SCHEMES)}")
    for _, parent, attr, lin in block_linears(model):
        setattr(parent, attr, FakeQuantLinear(lin, scheme, group_size))
    return model


def fake_linears(model):
    return [m for m in model.modules() if isinstance(m, FakeQuantLinear)]


def qat_finetune(model, teacher, ids: torch.Tensor, steps: int = 20, lr: float = 1e-5, batch: int = 4,
                 progress: bool = True, bf16: bool = False) -> list[float]:
    """KL(teacher || student) on calibration ids (n, T), Adam on the fake-quant weights; returns losses.
    bf16: forward/backward matmuls under bf16 autocast (fp32 master weights, fp32 softmax and loss); only
    worth it where bf16 runs in hardware (common.device.bf16_native), where it halves a step."""
    params = [m.weight for m in fake_linears(model)]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    model.train()
    for step in tqdm(range(steps), desc="qat", disable=not progress, leave=False):
        i = (step * batch) % ids.shape[0]
        x = ids[i:i + batch]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t = F.log_softmax(teacher(x).float(), -1)                       # (B, T, V)
            s = F.log_softmax(model(x).float(), -1)
        loss = F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return [float(v) for v in losses]                              # one host sync, after training


@torch.no_grad()
def convert_qat(model, head: bool = True):
    """FakeQuantLinear -> the real layout of its scheme (the same rounding it trained against)."""
    scheme = None
    for _, parent, attr, m in [(n, p, a, l) for n, p, a, l in _fake_modules(model)]:
        lin = nn.Linear(m.in_features, m.out_features, bias=False, device=m.weight.device, dtype=m.weight.dtype)
        lin.weight.data = m.weight.data
        scheme = m.scheme
        if m.scheme == "int4":
            new = Int4Linear.from_linear(lin, m.group_size)
        elif m.scheme == "int8":
            new = Int8Linear.from_linear(lin)
        else:
            new = W8A8Linear.from_linear(lin)
        setattr(parent, attr, new)
    if head:
        _quantize_head_int8(model)
    model.quant_scheme = {"scheme": scheme, "group_size": getattr(m, "group_size", None), "qat": True}
    return model


def _fake_modules(model):
    out = []
    for name, mod in model.layers.named_modules():
        for attr, child in mod.named_children():
            if isinstance(child, FakeQuantLinear):
                out.append((name, mod, attr, child))
    return out
