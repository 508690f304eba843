"""ImageNet ResNets (He et al. 2015, torchvision v1.5 layout) built from the fused blocks:
state_dict-compatible with torchvision.models.resnet18 ... resnet152."""

from __future__ import annotations

import torch
from torch import nn

from resnet_fused.nn.blocks import FusedBasicBlock, FusedBottleneck
from resnet_fused.nn.conv_bn import conv_bn_forward
from resnet_fused.nn.fold import FoldCache
from resnet_fused.nn.shortcut import make_shortcut


class ResNet(nn.Module):
    """torchvision's ResNet (conv1, bn1, relu, maxpool, layer1..4, avgpool, fc) with fused blocks.

    plain=True removes every shortcut (the paper's plain baseline); shortcut="A" | "B" | "C" picks the
    shortcut option (torchvision's is "B").
    """

    def __init__(self, block, layers, num_classes: int = 1000, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64, replace_stride_with_dilation=None, norm_layer=None, *, plain: bool = False,
                 shortcut: str = "B", backend: str | None = None):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes, self.dilation = 64, 1
        replace_stride_with_dilation = replace_stride_with_dilation or [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation should be None or a 3-element tuple, got {replace_stride_with_dilation}")
        self.groups, self.base_width = groups, width_per_group
        self.plain, self.shortcut, self.backend = plain, shortcut, backend
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._folds = FoldCache()
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                last_bn = getattr(m, "bn3", None) if isinstance(m, FusedBottleneck) else getattr(m, "bn2", None)
                if isinstance(m, (FusedBasicBlock, FusedBottleneck)) and last_bn is not None and last_bn.weight is not None:
                    nn.init.constant_(last_bn.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        out_planes = planes * block.expansion
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            downsample = None if self.plain else make_shortcut(self.shortcut, self.inplanes, out_planes, s, self._norm_layer)
            layers.append(block(self.inplanes, planes, s, downsample, self.groups, self.base_width,
                                previous_dilation if i == 0 else self.dilation, self._norm_layer,
                                shortcut=not self.plain, backend=self.backend))
            self.inplanes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv_bn_forward(self.conv1, self.bn1, x, act="relu", backend=self.backend, cache=self._folds, name="conv1")
        x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet(block, layers, **kwargs) -> ResNet:
    return ResNet(block, layers, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return _resnet(FusedBasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    return _resnet(FusedBasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    return _resnet(FusedBottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    return _resnet(FusedBottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    return _resnet(FusedBottleneck, [3, 8, 36, 3], **kwargs)
