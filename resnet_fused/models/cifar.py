"""The CIFAR-10 ResNets of He et al. (2015), section 4.2: depth 6n+2, a 3x3 conv of 16 filters, three
stages of 2n layers with 16, 32 and 64 filters (stride 2 at the start of stages 2 and 3), global
average pooling and a linear classifier. Option A shortcuts by default, as in the paper."""

from __future__ import annotations

import torch
from torch import nn

from resnet_fused.nn.blocks import FusedBasicBlock
from resnet_fused.nn.conv_bn import conv_bn_forward
from resnet_fused.nn.fold import FoldCache
from resnet_fused.nn.shortcut import make_shortcut


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, shortcut: str = "A", plain: bool = False,
                 backend: str | None = None):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, 1202), got {depth}")
        n = (depth - 2) // 6
        self.depth, self.plain, self.backend = depth, plain, backend
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                s = stride if i == 0 else 1
                downsample = None if plain else make_shortcut(shortcut, in_planes, planes, s)
                blocks.append(FusedBasicBlock(in_planes, planes, s, downsample, shortcut=not plain, backend=backend))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        self._folds = FoldCache()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_bn_forward(self.conv1, self.bn1, x, act="relu", backend=self.backend, cache=self._folds, name="conv1")
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int, num_classes: int = 10, shortcut: str = "A", plain: bool = False, backend: str | None = None) -> CifarResNet:
    """ResNet-`depth` for 32x32 images (depth = 6n + 2); plain=True: the same network without shortcuts."""
    return CifarResNet(depth, num_classes, shortcut, plain, backend)
