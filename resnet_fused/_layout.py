"""The layout rules every layer shares, one copy each: the memory format an op writes, the dtype its
statistics take, a convolution's output shape, and pairs of conv arguments."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The format an op's activation outputs take for input x: channels_last when x is channels_last
    (and not also NCHW-contiguous, as a 1x1 map or C = 1 is), else NCHW. Dense outputs either way."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-channel statistics and coefficients are fp32, except for fp64 activations (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def dense(t: torch.Tensor | None, fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor | None:
    """t laid out densely in fmt (a no-op when it already is); None stays None."""
    return None if t is None else t.contiguous(memory_format=fmt)


def per_channel_empty(x: torch.Tensor) -> torch.Tensor:
    """An uninitialized (C,) vector in x's statistics dtype, x (N, C, H, W)."""
    return x.new_empty(x.shape[1], dtype=stat_dtype(x))


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_output_shape(input_shape: Sequence[int], weight_shape: Sequence[int], stride, padding, dilation) -> tuple[int, ...]:
    """(N, Cout, Ho, Wo) of conv2d on input (N, Cin, H, W) with weight (Cout, Cin / groups, KH, KW):
    Ho = (H + 2 ph - dh (KH - 1) - 1) // sh + 1, and the same for Wo."""
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    hw = [(input_shape[2 + i] + 2 * padding[i] - dilation[i] * (weight_shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    return (input_shape[0], weight_shape[0], *hw)
