"""A convolution that also returns its output's batch statistics (``resnet_fused::conv2d_stats``), and
the deferred BN + ReLU built on it (``conv_bn_defer``, ``DeferredBnReLU``): in training, a conv
followed by BN + ReLU writes only its raw output and statistics; the next convolution applies that
BN + ReLU to its input as it loads and recomputes it in its backward, so the activation is never
written or saved."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused._layout import conv_output_shape, memory_format, pair, per_channel_empty
from resnet_fused.activations import RELU
from resnet_fused.ops._autocast import lower_precision_fp
from resnet_fused.ops._bn_math import bn_act_grads
from resnet_fused.ops._checks import check_batch, check_channel_vector, check_channel_vectors, check_conv, check_running_args
from resnet_fused.ops.bn_act import STAGE_BACKENDS, bn_act_train, update_running_stats
from resnet_fused.ops.kernels import kernels, triton_conv_applies


@torch.library.custom_op("resnet_fused::conv2d_stats", mutates_args=())
def conv2d_stats(
    input: Tensor,
    weight: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
    input_mean: Tensor | None = None,
    input_var: Tensor | None = None,
    input_weight: Tensor | None = None,
    input_bias: Tensor | None = None,
    input_eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = conv2d(a, weight), its per-channel batch mean and biased variance.

    a = input, or, when input_mean / input_var are given, a = relu(batch_norm(input)) with those batch
    statistics (the previous layer's BN + ReLU in training): Triton applies it to the input tiles as
    they load (prologue), so a is never written; other backends write it once for the convolution.
    The backward recomputes a instead of saving it. Triton takes the statistics of y in the
    convolution's epilogue; the cpu and cuda backends run resnet_fused::conv_genstats (groups 1; on CUDA
    one cuDNN graph where the graphs are on: the prologue and the statistics fused into the convolution);
    other calls run bn_stats after the convolution.
    """
    if backend in STAGE_BACKENDS and groups == 1:
        return torch.ops.resnet_fused.conv_genstats(input, weight, stride, padding, dilation, input_mean, input_var,
                                                    input_weight, input_bias, input_eps)
    k = kernels(backend)
    prologue = input_mean is not None
    if prologue:
        in_scale, in_shift = k.bn_scale_shift(input_mean, input_var, input_weight, input_bias, input_eps)
    if triton_conv_applies(backend, groups):
        in_bn = (in_scale, in_shift, True) if prologue else (None, None, False)
        return k.fused_conv(input, weight, stride, padding, dilation, *in_bn, None, None, None, "none", 0.0, True)
    a = k.bn_act_apply(input, in_scale, in_shift, None, "relu", 0.0) if prologue else input
    y = torch.nn.functional.conv2d(a, weight, None, stride, padding, dilation, groups)
    return (y, *k.bn_stats(y))


@conv2d_stats.register_fake
def _conv2d_stats_fake(input, weight, stride, padding, dilation, groups, backend, input_mean=None, input_var=None,
                       input_weight=None, input_bias=None, input_eps=1e-5):
    if triton_conv_applies(backend, groups):  # the implicit-GEMM conv writes NHWC
        out = input.new_empty(conv_output_shape(input.shape, weight.shape, stride, padding, dilation))
        out = out.contiguous(memory_format=torch.channels_last)
    else:  # aten's conv on the conv's input (the prologue's written as bn_act_apply does): its layout rule
        if input_mean is not None:
            input = torch.empty_like(input, memory_format=memory_format(input))
        out = torch.nn.functional.conv2d(input, weight, None, stride, padding, dilation, groups)
    return out, per_channel_empty(out), per_channel_empty(out)


def _conv2d_stats_setup(ctx, inputs, output):
    input, weight, stride, padding, dilation, groups, backend, in_mean, in_var, in_weight, in_bias, in_eps = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics
    ctx.conv = (stride, padding, dilation, groups)
    ctx.backend, ctx.in_eps = backend, in_eps
    ctx.in_bias_dtype = in_bias.dtype if in_bias is not None else None
    ctx.save_for_backward(input, weight, in_mean, in_var, in_weight, in_bias)


def _conv2d_stats_backward(ctx, grad_out, _grad_mean, _grad_var):
    # the statistics' dependence on y is the next BN backward's business (bn_act_train, or this op's
    # prologue backward in the next convolution)
    if grad_out is None:  # y took no gradient (set_materialize_grads(False))
        return (None,) * 12
    input, weight, in_mean, in_var, in_weight, in_bias = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    prologue = in_mean is not None
    # inputs left at their defaults are not in needs_input_grad: pad to the schema's 12
    needs_input, needs_weight, *_, needs_in_w, needs_in_b, _ = (*ctx.needs_input_grad, *[False] * 12)[:12]
    a = input
    if prologue:  # a = relu(input * scale + shift), recomputed: one elementwise pass instead of a saved tensor
        k = kernels(ctx.backend)
        in_scale, in_shift = k.bn_scale_shift(in_mean, in_var, in_weight, in_bias, ctx.in_eps)
        a = k.bn_act_apply(input, in_scale, in_shift, None, "relu", 0.0)
    needs_a = needs_input or (prologue and (needs_in_w or needs_in_b))
    grad_a, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [needs_a, needs_weight, False])
    grad_input = grad_in_weight = grad_in_bias = None
    if not prologue:
        grad_input = grad_a
    elif needs_a:  # through relu(batch_norm(input)) in training: the batch statistics depend on input
        grad_input, grad_in_weight, grad_in_bias, _ = bn_act_grads(
            ctx.backend, grad_a, input, a, in_mean, in_var, in_weight, ctx.in_eps, RELU, True,
            (needs_input, needs_in_w, needs_in_b, False), ctx.in_bias_dtype)
    return grad_input, grad_weight, None, None, None, None, None, None, None, grad_in_weight, grad_in_bias, None


conv2d_stats.register_autograd(_conv2d_stats_backward, setup_context=_conv2d_stats_setup)
lower_precision_fp("conv2d_stats", cast=(0, 1))  # conv2d's autocast rule: input and weight (not the input BN's statistics)


class DeferredBnReLU(NamedTuple):
    """relu(batch_norm(y)) of a BN in training whose batch statistics are known but whose output was
    never written: conv_bn_defer returns it next to y, and the next conv_bn_act / conv_bn_defer applies
    it to y as its tiles load (``input_bn=``)."""

    mean: Tensor  # (C,) batch mean of y (fp32; fp64 for fp64 y)
    var: Tensor  # (C,) biased batch variance of y
    weight: Tensor | None  # (C,) BN's affine weight and bias
    bias: Tensor | None
    eps: float

    def materialize(self, y: Tensor, *, backend: str | None = None) -> Tensor:
        """relu(batch_norm(y)) written out, differentiable (y must be the tensor these statistics describe)."""
        check_input_bn(self, y, "DeferredBnReLU.materialize")
        return materialize(y, self, backends.resolve(backend, y))


def check_input_bn(input_bn: DeferredBnReLU | None, input: Tensor, fn: str) -> None:
    if input_bn is None:
        return
    if not isinstance(input_bn, DeferredBnReLU):
        raise TypeError(f"resnet_fused.{fn}: `input_bn` must be the DeferredBnReLU that conv_bn_defer returned, got "
                        f"{type(input_bn).__name__}")
    for name in ("mean", "var", "weight", "bias"):
        check_channel_vector(getattr(input_bn, name), input.shape[1], input.device, fn, f"input_bn.{name}",
                             f"input {tuple(input.shape)}")


def prologue_fusable(input: Tensor, conv_bias: Tensor | None, process_group) -> bool:
    """conv2d_stats's prologue computes conv(relu(bn(input))) exactly here; elsewhere (a conv bias,
    synchronized statistics, autocast) the activation is written first and the ordinary path runs."""
    return conv_bias is None and process_group is None and not torch.is_autocast_enabled(input.device.type)


def materialize(input: Tensor, input_bn: DeferredBnReLU, backend: str) -> Tensor:
    """relu(batch_norm(input)) with input_bn's batch statistics, written (autograd as bn_act training)."""
    return bn_act_train(input, input_bn.weight, input_bn.bias, None, input_bn.eps, "relu", 0.0, backend, input_bn.mean,
                        input_bn.var)[0]


def conv_bn_defer(
    input: Tensor,
    conv_weight: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    input_bn: DeferredBnReLU | None = None,
    backend: str | None = None,
) -> tuple[Tensor, DeferredBnReLU]:
    """The first half of ``conv_bn_act`` in training, for a convolution followed by BN + ReLU:
    returns y = conv2d(input, conv_weight) (no bias) and the DeferredBnReLU holding y's batch
    statistics and BN's affine parameters; updates the running statistics as batch_norm would.
    The next convolution applies relu(batch_norm(y)) as its input tiles load
    (``conv_bn_act(y, ..., input_bn=deferred)``), so that activation is never written, and its
    backward recomputes it rather than saving it. ``input_bn``: the same for this convolution's input.

    With the Triton backend the statistics come from the convolution's epilogue and the deferred
    BN + ReLU from the next one's prologue; other backends take the same steps as separate passes.
    """
    fn = "conv_bn_defer"
    check_conv(input, conv_weight, groups, fn)
    check_running_args(running_mean, running_var, momentum, fn)
    check_channel_vectors(dict(running_mean=running_mean, running_var=running_var, bn_weight=bn_weight, bn_bias=bn_bias),
                          conv_weight.shape[0], input.device, fn, f"conv_weight {tuple(conv_weight.shape)}")
    check_input_bn(input_bn, input, fn)
    y, mean, var = conv_with_stats(input, conv_weight, stride, padding, dilation, groups, backends.resolve(backend, input),
                                   input_bn, fn)
    update_running_stats(running_mean, running_var, mean, var, y.numel() // max(y.shape[1], 1), momentum)
    return y, DeferredBnReLU(mean, var, bn_weight, bn_bias, eps)


def conv_with_stats(input: Tensor, conv_weight: Tensor, stride, padding, dilation, groups: int, impl: str,
                    input_bn: DeferredBnReLU | None, fn: str) -> tuple[Tensor, Tensor, Tensor]:
    """conv2d_stats on checked arguments and a concrete backend: (y, batch mean, biased batch var) of
    y = conv2d(input (relu(batch_norm(input)) with input_bn), conv_weight); the running statistics are
    the caller's to update (conv_bn_defer, conv_bn_act)."""
    if input_bn is not None and not prologue_fusable(input, None, None):
        input, input_bn = materialize(input, input_bn, impl), None
    y, mean, var = conv2d_stats(input, conv_weight, list(pair(stride)), list(pair(padding)), list(pair(dilation)), groups,
                                impl, *(input_bn or ()))
    check_batch(y, fn)
    return y, mean, var
