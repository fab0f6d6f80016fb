"""ResNet-50 for 32x32 images: torchvision's resnet50 with the usual CIFAR stem.

The ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) shrinks a 32x32 image to 8x8 before the first
residual stage; the CIFAR stem keeps 32x32: a 3x3 stride-1 conv and no max-pool, so layer1..layer4 see
32, 16, 8, 4 pixels. Forward ≈ 1.3 GMACs per image. The model is a plain nn.Module: DDP, FSDP2,
channels_last and torch.compile are applied from outside (parallelize.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.resnet import Bottleneck


def resnet50_cifar(num_classes: int = 100) -> nn.Module:
    # zero_init_residual: the last BatchNorm of every residual branch starts with gamma = 0, so each of the 16
    # blocks starts as the identity and the untrained network is a shallow one (Goyal et al. 2017, "Accurate,
    # Large Minibatch SGD"): no early loss spikes from summing 16 random branches, faster short runs
    model = resnet50(num_classes=num_classes, zero_init_residual=True)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # (B, 64, 32, 32)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's init
    model.maxpool = nn.Identity()
    return model


def blocks(model: nn.Module) -> list[nn.Module]:
    """The 16 bottleneck blocks in forward order: the units FSDP2 shards and torch.compile compiles."""
    return [m for m in model.modules() if isinstance(m, Bottleneck)]


def flops_per_image(model: nn.Module, size: int = 32) -> int:
    """Forward FLOPs (2 x MACs) of one image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    model.train(was_training)
    return fc.get_total_flops()
