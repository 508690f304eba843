"""Argument checks of the public functions: each bad input gets a ValueError / TypeError naming the
function, the argument, and the shapes, dtypes and devices involved."""

from __future__ import annotations

import torch
from torch import Tensor

from resnet_fused._layout import conv_output_shape


def check_activation(x: Tensor, fn: str, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"resnet_fused.{fn}: `{name}` must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"resnet_fused.{fn}: expected `{name}` to be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"resnet_fused.{fn}: expected `{name}` to be floating point, got {x.dtype}")


def check_like(t: Tensor, ref: Tensor, fn: str, name: str) -> None:
    """t has ref's (the input's) shape, dtype and device."""
    check_matches(t, ref.shape, ref.dtype, ref.device, fn, name, "`input`")


def check_matches(t: Tensor, shape, dtype: torch.dtype, device: torch.device, fn: str, name: str, what: str) -> None:
    """t has this shape, dtype and device, those of `what`."""
    if not isinstance(t, Tensor):
        raise TypeError(f"resnet_fused.{fn}: `{name}` must be a Tensor, got {type(t).__name__}")
    if t.shape != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(
            f"resnet_fused.{fn}: `{name}` must match {what}: got {tuple(t.shape)} {t.dtype} on {t.device}, "
            f"{what.strip('`')} is {tuple(shape)} {dtype} on {device}"
        )


# the dtypes a per-channel vector may have (what the C++ kernels read, csrc/checks.h is_vector_dtype)
VECTOR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_channel_vector(v: Tensor | None, channels: int, device: torch.device, fn: str, name: str, of: str) -> None:
    """v is None or a (channels,) vector of VECTOR_DTYPES on `device`; `of` names what has the channels."""
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"resnet_fused.{fn}: `{name}` must be a Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.numel() != channels:
        raise ValueError(f"resnet_fused.{fn}: expected `{name}` of shape ({channels},), one per channel of {of}, got {tuple(v.shape)}")
    if v.dtype not in VECTOR_DTYPES:
        raise TypeError(f"resnet_fused.{fn}: expected `{name}` to be float32, float64, float16 or bfloat16, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"resnet_fused.{fn}: `{name}` is on {v.device} but `input` is on {device}")


def check_channel_vectors(vectors: dict[str, Tensor | None], channels: int, device: torch.device, fn: str, of: str) -> None:
    for name, v in vectors.items():
        check_channel_vector(v, channels, device, fn, name, of)


def check_running_args(running_mean: Tensor | None, running_var: Tensor | None, momentum, fn: str) -> None:
    if momentum is None:
        raise TypeError(f"resnet_fused.{fn}: momentum=None is nn.BatchNorm2d's cumulative average: pass 1 / num_batches_tracked")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"resnet_fused.{fn}: give both running_mean and running_var, or neither")


def check_batch(input: Tensor, fn: str) -> None:
    """Batch statistics need more than one value per channel (as F.batch_norm)."""
    if input.numel() == input.shape[1] and input.numel() > 0:
        raise ValueError(f"resnet_fused.{fn}: expected more than 1 value per channel when training, got input size {tuple(input.shape)}")


def check_conv(input: Tensor, conv_weight: Tensor, groups: int, fn: str) -> None:
    check_activation(input, fn, "input")
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError(f"resnet_fused.{fn}: expected `conv_weight` of shape (Cout, Cin / groups, KH, KW), got "
                         f"{tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight).__name__}")
    if conv_weight.shape[1] * groups != input.shape[1]:
        raise ValueError(f"resnet_fused.{fn}: `conv_weight` {tuple(conv_weight.shape)} with groups={groups} expects "
                         f"{conv_weight.shape[1] * groups} input channels, `input` {tuple(input.shape)} has {input.shape[1]}")
    if conv_weight.device != input.device or (conv_weight.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type)):
        raise ValueError(f"resnet_fused.{fn}: `conv_weight` is {conv_weight.dtype} on {conv_weight.device}, "
                         f"`input` is {input.dtype} on {input.device}")


def check_residual_of_conv(residual: Tensor | None, input: Tensor, weight: Tensor, stride, padding, dilation, fn: str) -> None:
    """residual (if any) must match the convolution's output, which is not computed yet."""
    if residual is not None:
        out_shape = conv_output_shape(input.shape, weight.shape, stride, padding, dilation)
        check_matches(residual, out_shape, input.dtype, input.device, fn, "residual", "the convolution's output")


def residual_for(residual: Tensor | None, y: Tensor, fn: str) -> Tensor | None:
    """The residual to add to y: under autocast y may come out in the autocast dtype while the
    residual does not; it is then cast to y's dtype, as ``y += residual`` would. Else it must match y."""
    if residual is not None and residual.dtype != y.dtype and torch.is_autocast_enabled(y.device.type):
        residual = residual.to(y.dtype)
    if residual is not None:
        check_like(residual, y, fn, "residual")
    return residual
