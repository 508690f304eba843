"""The InstanceNorm residual block of image-to-image GANs: x + IN(conv(relu(IN(conv(x))))), no ReLU
after the add; each IN (+ residual) (+ ReLU) is one fused bn_act call on per-(sample, channel) statistics."""

from __future__ import annotations

import torch
from torch import nn

from resnet_fused.ops.bn_act import bn_act
from resnet_fused._layout import memory_format


def instance_norm_act(norm: nn.InstanceNorm2d, x: torch.Tensor, residual: torch.Tensor | None = None,
                      relu: bool = True, backend: str | None = None) -> torch.Tensor:
    """act(norm(x) + residual) for an nn.InstanceNorm2d without running statistics.

    Instance norm of (N, C, H, W) is batch norm of the (1, N*C, H, W) view: the same fused kernels,
    with per-(sample, channel) statistics and the affine parameters repeated per sample.
    """
    if norm.track_running_stats or type(norm) is not nn.InstanceNorm2d:  # a correct unfused path
        y = norm(x)
        y = y + residual if residual is not None else y
        return torch.relu(y) if relu else y
    N, C, H, W = x.shape
    fmt = memory_format(x)
    rows = x.contiguous().view(1, N * C, H, W)  # (1, N*C, H, W) needs the NCHW layout
    res = residual.contiguous().view(1, N * C, H, W) if residual is not None else None
    weight = norm.weight.repeat(N) if norm.weight is not None else None
    bias = norm.bias.repeat(N) if norm.bias is not None else None
    out = bn_act(rows, None, None, weight, bias, True, 0.0, norm.eps, res, relu, backend=backend).view(N, C, H, W)
    return out.contiguous(memory_format=fmt)


class FusedInstanceNormResBlock(nn.Module):
    """out = x + in2(conv2(relu(in1(conv1(x))))) with 3x3 convs (reflection padding by default)."""

    def __init__(self, channels: int, padding_mode: str = "reflect", affine: bool = False, eps: float = 1e-5,
                 bias: bool = True, backend: str | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode, bias=bias)
        self.in1 = nn.InstanceNorm2d(channels, eps=eps, affine=affine)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode, bias=bias)
        self.in2 = nn.InstanceNorm2d(channels, eps=eps, affine=affine)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = instance_norm_act(self.in1, self.conv1(x), relu=True, backend=self.backend)
        return instance_norm_act(self.in2, self.conv2(out), residual=x, relu=False, backend=self.backend)
