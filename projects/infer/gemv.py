"""Float linears on the C++ GEMV kernel for decode: nn.Linear with bf16 weights, small M, on x86 CPUs.

    from projects.infer.gemv import use_gemv
    use_gemv(model)        # after model.to(torch.bfloat16); before compile_decode()

At batch 1..8 a decode step is a matrix-vector product per layer, bound by reading the weights once. The
platform GEMM (oneDNN/MKL through aten::mm) reaches a fraction of the read bandwidth at these shapes (the
infer record's profile and head_gemv_GBps); csrc/gemv.cpp's bf16_linear streams the weight rows at close to it.
Every other shape (prefill, M > 8), device or dtype goes to F.linear unchanged. The weights are the same
Parameters (a tied head stays tied); nothing is copied.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from projects.infer import kernels

MAX_M = 8


class GemvLinear(nn.Linear):
    """nn.Linear whose small-M CPU bf16 calls use mlsys::bf16_linear."""

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] <= MAX_M and self.weight.dtype == torch.bfloat16 and x.device.type == "cpu" \
                and kernels.has_bf16_gemv():
            return torch.ops.mlsys.bf16_linear(x2, self.weight).view(*shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_gemv(model: nn.Module) -> nn.Module:
    """Swap every bias-free nn.Linear whose width is a multiple of 32 for GemvLinear (same Parameter)."""
    for m in model.modules():
        if type(m) is nn.Linear and m.bias is None and m.in_features % 32 == 0:
            m.__class__ = GemvLinear  # the same module and Parameters (a tied head stays tied), another forward
    return model
