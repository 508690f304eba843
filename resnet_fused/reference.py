"""Plain-PyTorch definitions of every resnet_fused op.

These are the specification: the C++ (CPU, CUDA) kernels and the Triton kernels must compute the
same function, and tests and benchmarks import them. Every function here is also the ``"torch"``
backend. Tensors are 4-D, (N, C, H, W) in logical order, NCHW-contiguous or channels_last; math
runs in fp32 for fp16/bf16 inputs; per-channel vectors (scale, shift, statistics) are fp32 (C,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_fused._layout import memory_format, stat_dtype
from resnet_fused.activations import Activation, activation

__all__ = [
    "add_relu",
    "bn_stats",
    "bn_act_apply",
    "act_backward",
    "bn_act_backward_reduce",
    "bn_act_backward_elemt",
    "bn_scale_shift",
    "bn_backward_coeffs",
    "scale_shift_fp64",
    "backward_coeffs_fp64",
    "bn_act_batch",
    "bn_act_running",
    "bn_act_backward",
    "bn_update_running",
    "bn_act",
    "conv2d_stats",
    "conv_genstats",
    "conv_bn_act",
    "cudnn_conv_add_relu",
]

_CHANNEL = (0, 2, 3)  # reduce over N, H, W


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    # (C,) -> (1, C, 1, 1) for broadcasting against (N, C, H, W)
    return v.view(1, -1, 1, 1)


def _relu_mask(grad_out: torch.Tensor, output: torch.Tensor | None) -> torch.Tensor:
    # d relu(z)/dz = (z > 0), read off the saved output: relu(z) > 0  <=>  z > 0. As eager's
    # threshold_backward: 0 where output <= 0, else grad_out, so a NaN output passes its gradient.
    return grad_out if output is None else torch.where(output <= 0, 0, grad_out)


def add_relu(input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(input + residual), in input's dtype and memory format."""
    acc = stat_dtype(input)
    return torch.relu(input.to(acc) + residual.to(acc)).to(input.dtype).contiguous(memory_format=memory_format(input))


def bn_stats(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over (N, H, W), fp32 (C,) each (computed in fp64 here).

    An empty input (N = 0 or H * W = 0) gives zeros.
    """
    if input.numel() == 0:
        zeros = input.new_zeros(input.shape[1], dtype=stat_dtype(input))
        return zeros, zeros.clone()
    x = input.double()
    mean = x.mean(_CHANNEL)
    var = (x - _per_channel(mean)).square().mean(_CHANNEL)
    return mean.to(stat_dtype(input)), var.to(stat_dtype(input))


def bn_act_apply(
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    act: str,
    alpha: float,
) -> torch.Tensor:
    """act(input * scale[c] + shift[c] (+ residual)), in input's dtype and memory format; math in fp32
    (fp64 for fp64 input). act, alpha: an Activation's name and parameter (resnet_fused/activations.py)."""
    return Activation(act, alpha)(_pre_activation(input, scale, shift, residual)).to(input.dtype).contiguous(
        memory_format=memory_format(input))


def _pre_activation(input, scale, shift, residual) -> torch.Tensor:
    # z = input * scale[c] + shift[c] (+ residual), in fp32 (fp64 for fp64 input)
    acc = stat_dtype(input)
    z = input.to(acc) * _per_channel(scale) + _per_channel(shift)
    return z + residual.to(acc) if residual is not None else z


def act_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: torch.Tensor | None,
    act: str,
    alpha: float,
) -> torch.Tensor:
    """grad_out * act'(z), z = input * scale[c] + shift[c] (+ residual) recomputed in fp32 (aten's
    backward formula of the activation at z), in grad_out's dtype and input's memory format: the
    gradient reaching the normalization (and the residual) of bn_act_apply."""
    z = _pre_activation(input, scale, shift, residual)
    dz = Activation(act, alpha).backward(grad_out.to(z.dtype), z)
    return dz.to(grad_out.dtype).contiguous(memory_format=memory_format(input))


def bn_act_backward_reduce(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    output: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum dy, sum dy * (x - mean)) per channel, fp32, where dy = grad_out, 0 where output <= 0.

    ``output=None`` means no ReLU followed the normalization: dy = grad_out.
    """
    dy = _relu_mask(grad_out.double(), output)
    xmu = input.double() - _per_channel(mean.double())
    return dy.sum(_CHANNEL).to(stat_dtype(input)), (dy * xmu).sum(_CHANNEL).to(stat_dtype(input))


def bn_act_backward_elemt(
    grad_out: torch.Tensor,
    output: torch.Tensor | None,
    input: torch.Tensor | None,
    mean: torch.Tensor | None,
    dy_scale: torch.Tensor,
    x_scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    need_grad_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_input = dy * dy_scale[c] (+ (x - mean[c]) * x_scale[c] + shift[c]); grad_residual = dy.

    dy = grad_out, 0 where output <= 0 (``output=None``: no ReLU). ``input``, ``mean``, ``x_scale``
    and ``shift`` are given together (training) or all omitted (eval, where grad_input = dy * scale).
    grad_input has grad_out's dtype and input's memory format (grad_out's when input is omitted);
    grad_residual is dy in grad_out's dtype, or an empty tensor when not needed.
    """
    acc = stat_dtype(grad_out)
    dy = _relu_mask(grad_out.to(acc), output)
    gi = dy * _per_channel(dy_scale)
    if input is not None:
        gi = gi + (input.to(acc) - _per_channel(mean)) * _per_channel(x_scale) + _per_channel(shift)
    fmt = memory_format(input if input is not None else grad_out)
    grad_input = gi.to(grad_out.dtype).contiguous(memory_format=fmt)
    if need_grad_residual:
        grad_residual = dy.to(grad_out.dtype).contiguous(memory_format=fmt)
    else:
        grad_residual = grad_out.new_empty(0)
    return grad_input, grad_residual


def scale_shift_fp64(mean, var, weight, bias, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """bn_scale_shift's math, kept in fp64: batch_norm(x) = x * scale + shift per channel, with
    invstd = 1 / sqrt(var + eps), scale = weight * invstd, shift = bias - mean * scale (weight None: 1,
    bias None: 0). The one copy of this formula: the kernels, fold_bn and the fp64 path use it."""
    invstd = torch.rsqrt(var.double() + eps)
    scale = invstd if weight is None else invstd * weight.double()
    shift = -mean.double() * scale if bias is None else bias.double() - mean.double() * scale
    return scale, shift


def bn_scale_shift(
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_norm(x) = x * scale[c] + shift[c]: scale = weight / sqrt(var + eps), shift = bias - mean * scale.

    Per channel, math in fp64 whatever the inputs' floating dtypes, outputs fp32 (C,) each.
    weight None means 1, bias None means 0.
    """
    return tuple(t.float() for t in scale_shift_fp64(mean, var, weight, bias, eps))


def backward_coeffs_fp64(sum_dy, sum_dy_xmu, var, weight, eps, count, training):
    """bn_backward_coeffs's math, kept in fp64 (see there); count may be a 0-dim tensor (sync BN)."""
    invstd = torch.rsqrt(var.double() + eps)
    a = invstd if weight is None else invstd * weight.double()
    if training:
        b = -a * invstd.square() * sum_dy_xmu.double() / count
        c = -a * sum_dy.double() / count
    else:
        b = c = torch.zeros_like(a)
    return a, b, c, sum_dy_xmu.double() * invstd


def bn_backward_coeffs(
    sum_dy: torch.Tensor,
    sum_dy_xmu: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    count: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-channel coefficients of the batch-norm backward, from bn_act_backward_reduce's sums:

    grad_input = dy * a + (x - mean) * b + c, invstd = 1 / sqrt(var + eps), over `count` values per channel:
      a = weight * invstd (weight None: 1)
      training: b = -a * invstd^2 * sum_dy_xmu / count,  c = -a * sum_dy / count
      eval (statistics are constants): b = c = 0
    grad_weight = sum_dy_xmu * invstd.
    Math in fp64 whatever the inputs' floating dtypes, outputs fp32 (C,) each.
    """
    return tuple(t.float() for t in backward_coeffs_fp64(sum_dy, sum_dy_xmu, var, weight, eps, count, training))


def bn_act_batch(
    input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
    eps: float, act: str, alpha: float, batch_mean: torch.Tensor | None = None, batch_var: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None, momentum: float | None = None,
    momentum_tensor: torch.Tensor | None = None, num_batches_tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(act(batch_norm(input) + residual), mean, biased var): training with the batch's statistics, or with
    batch_mean / batch_var when a producer took them (the statistics returned are then copies of those). In place:
    num_batches_tracked += 1, then bn_update_running (count N H W) where running_mean is given and the batch is not
    empty; momentum None with neither momentum_tensor nor num_batches_tracked leaves the statistics as they are."""
    if batch_mean is None:
        batch_mean, batch_var = bn_stats(input)
    scale, shift = bn_scale_shift(batch_mean, batch_var, weight, bias, eps)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    count = input.numel() // max(input.shape[1], 1)
    moves = any(v is not None for v in (momentum, momentum_tensor, num_batches_tracked))
    if running_mean is not None and count > 0 and moves:
        bn_update_running(running_mean, running_var, batch_mean, batch_var, count, momentum, momentum_tensor,
                          num_batches_tracked)
    return bn_act_apply(input, scale, shift, residual, act, alpha), batch_mean.clone(), batch_var.clone()


def bn_act_running(
    input: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    eps: float,
    act: str,
    alpha: float,
) -> torch.Tensor:
    """act(batch_norm(input) + residual) normalized by the running statistics (eval)."""
    scale, shift = bn_scale_shift(running_mean, running_var, weight, bias, eps)
    return bn_act_apply(input, scale, shift, residual, act, alpha)


def bn_act_backward(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    output: torch.Tensor | None,
    eps: float,
    training: bool,
    need_grad_input: bool,
    need_grad_params: bool,
    need_grad_residual: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_residual) of act(batch_norm(input) + residual), act ReLU (output given,
    dy = grad_out, 0 where output <= 0) or none (output None, dy = grad_out); invstd = 1 / sqrt(var + eps), M = N H W:
      training: grad_input = w invstd (dy - sum dy / M - (x - mean) invstd^2 sum dy (x - mean) / M)
      eval (statistics are constants): grad_input = dy w invstd
      grad_weight = invstd sum dy (x - mean), grad_bias = sum dy, in the statistics' dtype, taken in training or when
      need_grad_params; grad_residual = dy. Computed in fp64; an output not asked for is an empty tensor."""
    fmt = memory_format(input)
    dy = _relu_mask(grad_out.double(), output)
    xmu = input.double() - _per_channel(mean.double())
    invstd = torch.rsqrt(var.double() + eps)
    a = invstd if weight is None else invstd * weight.double()  # w invstd
    grad_weight = grad_bias = empty = grad_out.new_empty(0)
    if training or need_grad_params:
        sum_dy, sum_dy_xmu = dy.sum(_CHANNEL), (dy * xmu).sum(_CHANNEL)
        grad_weight, grad_bias = (v.to(stat_dtype(input)) for v in (sum_dy_xmu * invstd, sum_dy))
    grad_input = empty
    if need_grad_input:
        if training:
            count = input.numel() // max(input.shape[1], 1)
            gi = _per_channel(a) * (dy - _per_channel(sum_dy / count)
                                    - xmu * _per_channel(invstd.square() * sum_dy_xmu / count))
        else:
            gi = dy * _per_channel(a)
        grad_input = gi.to(grad_out.dtype).contiguous(memory_format=fmt)
    grad_residual = dy.to(grad_out.dtype).contiguous(memory_format=fmt) if need_grad_residual else empty
    return grad_input, grad_weight, grad_bias, grad_residual


def bn_update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: float,
    momentum: float | None,
    momentum_tensor: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
) -> None:
    """In place: running += w (batch - running) (torch.lerp), the batch variance unbiased by count / (count - 1);
    w = momentum_tensor (one value) if given, else momentum, else 1 / num_batches_tracked (already counted: the
    cumulative average of nn.BatchNorm2d's momentum=None). Math in fp64, stored in the running statistics' dtype."""
    w = (momentum_tensor.double().reshape(()) if momentum_tensor is not None else momentum if momentum is not None
         else 1.0 / num_batches_tracked.double().reshape(()))
    for running, batch in ((running_mean, mean.double()), (running_var, var.double() * (count / (count - 1)))):
        r = running.double()
        running.copy_(r + w * (batch - r))


def bn_act(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    act="relu",
) -> torch.Tensor:
    """act(batch_norm(input, ...) + residual) in eager PyTorch: the composition the fused op replaces
    (act: anything resnet_fused.activations.activation takes)."""
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return activation(act)(y)


def conv2d_stats(
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    input_mean: torch.Tensor | None = None,
    input_var: torch.Tensor | None = None,
    input_weight: torch.Tensor | None = None,
    input_bias: torch.Tensor | None = None,
    input_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, biased var of y per channel), y = conv2d(a, weight): a = input, or with input_mean /
    input_var a = relu(batch_norm(input)) normalized by those (batch) statistics."""
    a = input
    if input_mean is not None:  # batch_norm(x) = x * scale + shift, per channel
        scale, shift = scale_shift_fp64(input_mean, input_var, input_weight, input_bias, input_eps)
        a = bn_act_apply(input, scale.to(input_mean.dtype), shift.to(input_mean.dtype), None, "relu", 0.0)
    y = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    return (y, *bn_stats(y))


def conv_genstats(input, weight, stride, padding, dilation, input_mean=None, input_var=None, input_weight=None,
                  input_bias=None, input_eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """conv2d_stats with groups 1: what resnet_fused::conv_genstats computes (on CUDA in one cuDNN graph, the input
    BN + ReLU applied as the conv loads, the statistics from the conv's epilogue)."""
    return conv2d_stats(input, weight, stride, padding, dilation, 1, input_mean, input_var, input_weight, input_bias, input_eps)


def conv_bn_act(
    input: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    act="relu",
) -> torch.Tensor:
    """act(batch_norm(conv2d(input, ...)) + residual) in eager PyTorch: what the fused convolution replaces."""
    y = F.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
    return bn_act(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, residual, act)


def cudnn_conv_add_relu(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor,
    stride,
    padding,
    dilation,
    groups: int,
) -> torch.Tensor:
    """relu(conv2d(input, weight, bias) + residual): what the op resnet_fused::cudnn_conv_add_relu computes in
    one cuDNN call (the `cuda` backend's inference, on BN-folded weights)."""
    return torch.relu(F.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)
