"""Batch-norm math shared by every op that normalizes: BN folding and the BN backward (bn_act, conv2d_stats' prologue, synchronized BN). The per-channel scale / shift is
the kernel op bn_scale_shift (math: reference.scale_shift_fp64)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from resnet_fused._layout import memory_format, stat_dtype
from resnet_fused.activations import Activation
from resnet_fused.ops.kernels import kernels
from resnet_fused.reference import backward_coeffs_fp64, scale_shift_fp64


def fold_bn(conv_weight: Tensor, conv_bias: Tensor | None, running_mean: Tensor, running_var: Tensor,
            bn_weight: Tensor | None, bn_bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Weight and bias of one convolution equal to batch_norm(conv2d(x)) with running statistics:
    w' = w * s[co], b' = bn_bias + (conv_bias - running_mean) * s, s = bn_weight / sqrt(running_var + eps).
    Math in fp64, rounded once to the conv weight's dtype. Differentiable."""
    mean = running_mean.double() if conv_bias is None else running_mean.double() - conv_bias.double()
    scale, shift = scale_shift_fp64(mean, running_var, bn_weight, bn_bias, eps)
    weight = conv_weight.double() * scale.view(-1, 1, 1, 1)
    return weight.to(conv_weight.dtype), shift.to(conv_weight.dtype)


def save_for_bn_act_grads(ctx, act: Activation, input: Tensor, weight: Tensor | None, bias: Tensor | None,
                          residual: Tensor | None, out: Tensor, mean: Tensor, var: Tensor) -> None:
    """What bn_act_grads reads, saved on an autograd ctx (ctx.saved_tensors: input, weight, out, mean, var,
    bias, residual; ctx.act, ctx.bias_dtype): ReLU's backward reads the output; another activation's
    recomputes z from input, bias and residual; none reads neither."""
    needs_z = act.backward_reads_input
    ctx.act = act
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(input, weight, out if act.backward_reads_output else None, mean, var,
                          bias if needs_z else None, residual if needs_z else None)


def bn_act_grads(
    backend: str, grad_out: Tensor, x: Tensor, out: Tensor | None, mean: Tensor, var: Tensor, weight: Tensor | None,
    eps: float, act: Activation, training: bool, needs: tuple[bool, bool, bool, bool], bias_dtype: torch.dtype | None,
    sync: tuple[object, Tensor] | None = None, *, bias: Tensor | None = None, residual: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias, grad_residual) of out = act(x * scale + shift + residual),
    scale and shift from (batch or running) statistics `mean`, `var`; `needs` says which are wanted.
    `out`: the saved output, read for ReLU's mask (None otherwise); `bias`, `residual`: the forward's,
    read to recompute z for any other activation. sync = (process group, global count): statistics over
    every rank's batch (nn.SyncBatchNorm), so grad_input takes the sums of all ranks (one all_reduce);
    grad_weight and grad_bias stay local (DDP averages parameter gradients itself).

    dz = d out / dz: ReLU reads it off `out` inside the two passes below (grad_out where out > 0 or NaN,
    else 0); another activation takes one pass first, dz = act_backward(grad_out, x, scale, shift,
    residual) (z recomputed in fp32), which is also grad_residual. Then one reduction pass gives sum dz
    and sum dz (x - mean) per channel and one elementwise pass writes grad_input (and grad_residual = dz
    under a ReLU):
      training: dx = w invstd (dz - sum dz / M - (x - mean) invstd^2 sum dz (x - mean) / M)
                   = dz * dy_scale + (x - mean) * x_scale + shift
      eval:     dx = dz * w invstd
      grad_weight = invstd sum dz (x - mean),  grad_bias = sum dz
    """
    needs_x, needs_w, needs_b, needs_r = needs
    k = kernels(backend)
    acc = stat_dtype(x)
    grad_out = grad_out.contiguous(memory_format=memory_format(x))  # one layout for both passes
    relu = act.backward_reads_output
    out = out if relu else None
    if act.backward_reads_input:  # dz = grad_out * act'(z): the gradient of the normalization's output
        z_scale, z_shift = k.bn_scale_shift(mean, var, weight, bias, eps)  # z = x * z_scale + z_shift (+ residual)
        grad_out = k.act_backward(grad_out, x, z_scale, z_shift, residual, act.name, act.alpha)

    # per-channel (C,) coefficients: fp64 math, handed to the kernels in acc (fp32; fp64 on the torch backend)
    dy_scale = x_scale = shift = grad_weight = sum_dy = None
    if (training and needs_x) or needs_w or needs_b:
        sum_dy, sum_dy_xmu = k.bn_act_backward_reduce(grad_out, x, mean.to(acc), out)
        dy_scale, x_scale, shift, grad_weight = k.bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps,
                                                                     x.numel() // x.shape[1], training)
        if sync is not None and training and needs_x:  # the count stays on the device: the fp64 formula here
            group, count = sync
            sums = torch.stack([sum_dy, sum_dy_xmu]).double()
            dist.all_reduce(sums, group=group)
            dy_scale, x_scale, shift = (t.to(acc) for t in backward_coeffs_fp64(sums[0], sums[1], var, weight, eps, count, True)[:3])
    elif needs_x:  # eval, only grad_input = dy * dy_scale: dy_scale = weight * invstd is bn_scale_shift's scale
        dy_scale = k.bn_scale_shift(mean, var, weight, None, eps)[0]

    grad_input = grad_residual = None
    need_masked_residual = needs_r and relu
    if needs_x:
        if training:
            grad_input, masked = k.bn_act_backward_elemt(grad_out, out, x, mean.to(acc), dy_scale, x_scale, shift,
                                                         need_masked_residual)
        else:
            grad_input, masked = k.bn_act_backward_elemt(grad_out, out, None, None, dy_scale, None, None, need_masked_residual)
        if need_masked_residual:
            grad_residual = masked
    elif need_masked_residual:  # d relu(z)/dz = (out > 0), NaN passing: threshold_backward
        grad_residual = torch.ops.aten.threshold_backward(grad_out, out, 0)
    if needs_r and not relu:
        grad_residual = grad_out

    grad_weight = grad_weight.to(weight.dtype) if needs_w else None
    grad_bias = sum_dy.to(bias_dtype) if needs_b else None
    return grad_input, grad_weight, grad_bias, grad_residual
