"""The three shortcuts of He et al. (2015): A, parameter-free; B, projection when the shape changes;
C, projection on every block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "C")


class ShortcutA(nn.Module):
    """Identity with stride and zero-padded channels: x[:, :, ::s, ::s], then (out - in) zero
    channels, half before and half after (option A of the paper; no parameters)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1):
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"ShortcutA pads channels: out_planes ({out_planes}) must be >= in_planes ({in_planes})")
        self.in_planes, self.out_planes, self.stride = in_planes, out_planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_planes - self.in_planes
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.out_planes}, stride={self.stride}"


def projection(in_planes: int, out_planes: int, stride: int, norm_layer=nn.BatchNorm2d) -> nn.Sequential:
    """1x1 conv + BN: torchvision's `downsample` (state_dict keys downsample.0, downsample.1)."""
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), norm_layer(out_planes))


def make_shortcut(option: str, in_planes: int, out_planes: int, stride: int, norm_layer=nn.BatchNorm2d) -> nn.Module | None:
    """The block's `downsample` for shortcut option A, B or C (None: plain identity)."""
    if option not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {option!r}")
    changes_shape = stride != 1 or in_planes != out_planes
    if option == "C" or (option == "B" and changes_shape):
        return projection(in_planes, out_planes, stride, norm_layer)
    if option == "A" and changes_shape:
        return ShortcutA(in_planes, out_planes, stride)
    return None
