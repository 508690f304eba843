"""conv_bn_act: act(batch_norm(conv2d(input)) + residual), and conv_act, its eval form once BN is folded.

conv_bn_act checks its arguments and gathers them into a ConvSpec and a BnSpec; run_conv_bn_act runs the
path route() names for them (resnet_fused.nn asks route() too: the modules keep folded weights cached for
the "fold" path):

  "conv_stats"       training, Triton conv (statistics in its epilogue) or a deferred input BN + ReLU
                     (applied in the conv's prologue): conv2d_stats, then one bn_act_train pass
  "batch_stats"      training otherwise: the conv, then bn_act with batch statistics
  "triton_epilogue"  eval on Triton without gradients: one conv with BN, residual and ReLU in its epilogue
  "unfolded"         eval where a conv or BN parameter needs its gradient: the conv, then bn_act eval
                     (whose backward reduces grad_bias in fp32, as eager's does)
  "fold"             eval otherwise: BN folded into the conv's weight and bias, then conv_act
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused._layout import pair
from resnet_fused.activations import Activation, activation
from resnet_fused.ops import cudnn, onednn
from resnet_fused.ops._bn_math import fold_bn
from resnet_fused.ops._checks import check_channel_vectors, check_conv, check_residual_of_conv, check_running_args, residual_for
from resnet_fused.ops.add_relu import add_relu
from resnet_fused.ops.bn_act import STAGE_BACKENDS, bn_act, bn_act_train, momentum_args, update_running_stats
from resnet_fused.ops.conv_stats import DeferredBnReLU, check_input_bn, conv_with_stats, materialize, prologue_fusable
from resnet_fused.ops.kernels import bias_act, kernels, triton_conv_applies

ROUTES = ("conv_stats", "batch_stats", "triton_epilogue", "unfolded", "fold")


def route(input: Tensor, groups: int, use_batch_stats: bool, backend: str, *, conv_bias: Tensor | None = None,
          input_bn: DeferredBnReLU | None = None, process_group=None, params_need_grad: bool = False,
          any_needs_grad: bool = False) -> str:
    """The path (one of ROUTES, see the module docstring) of a conv_bn_act call on the concrete backend."""
    triton_conv = triton_conv_applies(backend, groups) and process_group is None and not torch.is_autocast_enabled(input.device.type)
    if use_batch_stats:
        fusable = prologue_fusable(input, conv_bias, process_group) and (input_bn is not None or triton_conv)
        return "conv_stats" if fusable else "batch_stats"
    if triton_conv and not any_needs_grad:
        return "triton_epilogue"
    return "unfolded" if params_need_grad else "fold"


def _requires_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class ConvSpec(NamedTuple):
    """A convolution's parameters: weight (Cout, Cin / groups, KH, KW), bias (Cout,) or None; stride, padding and
    dilation as pairs."""
    weight: Tensor
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


class BnSpec(NamedTuple):
    """What a BatchNorm normalizes with in one call: its (C,) vectors (each may be None), whether batch statistics
    normalize (and update the running ones, where given, with `momentum`), eps."""
    running_mean: Tensor | None
    running_var: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    use_batch_stats: bool
    momentum: float | Tensor
    eps: float


def conv_bn_act(
    input: Tensor,
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    act="relu",
    *,
    input_bn: DeferredBnReLU | None = None,
    backend: str | None = None,
    process_group=None,
) -> Tensor:
    """``act(batch_norm(conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups), ...) + residual)``.

    Equal in value and in its side effects on the running statistics to the eager composition, with
    autograd for every tensor argument. Eval: BN is folded into the convolution (one conv with bias,
    then one fused add + activation pass at most). Training: the convolution, then ``bn_act`` (statistics,
    one fused normalize + add + activation pass; fused two-pass backward). ``act`` and ``process_group``:
    as in bn_act.

    ``input_bn`` (from conv_bn_defer): the convolution's input is relu(batch_norm(input)) with those
    batch statistics, applied as the input loads (Triton prologue) and recomputed in the backward.
    """
    fn = "conv_bn_act"
    check_conv(input, conv_weight, groups, fn)
    check_channel_vectors(dict(running_mean=running_mean, running_var=running_var, bn_weight=bn_weight, bn_bias=bn_bias,
                               conv_bias=conv_bias), conv_weight.shape[0], input.device, fn, f"conv_weight {tuple(conv_weight.shape)}")
    check_input_bn(input_bn, input, fn)
    check_running_args(running_mean, running_var, momentum, fn)
    conv = ConvSpec(conv_weight, conv_bias, pair(stride), pair(padding), pair(dilation), groups)
    bn = BnSpec(running_mean, running_var, bn_weight, bn_bias, training or running_mean is None, momentum, eps)
    return run_conv_bn_act(input, conv, bn, residual, activation(act), backends.resolve(backend, input), input_bn=input_bn,
                           process_group=process_group)


def run_conv_bn_act(input: Tensor, conv: ConvSpec, bn: BnSpec, residual: Tensor | None, act: Activation, backend: str, *,
                    input_bn: DeferredBnReLU | None = None, process_group=None) -> Tensor:
    """conv_bn_act on checked conv and BN arguments and a concrete backend; the residual is checked here, against the
    convolution's output, before any running statistic moves."""
    fn = "conv_bn_act"
    path = route(input, conv.groups, bn.use_batch_stats, backend, conv_bias=conv.bias, input_bn=input_bn,
                 process_group=process_group, params_need_grad=_requires_grad(conv.weight, conv.bias, bn.weight, bn.bias),
                 any_needs_grad=_requires_grad(input, conv.weight, conv.bias, bn.weight, bn.bias, residual))
    staged = stage_applies(input, backend, process_group)
    if path in ("conv_stats", "triton_epilogue") or staged:
        check_residual_of_conv(residual, input, conv.weight, conv.stride, conv.padding, conv.dilation, fn)

    if path == "conv_stats":  # conv2d_stats, then one fused normalize + add + ReLU pass
        y, mean, var = conv_with_stats(input, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups, backend,
                                       input_bn, fn)
        update_running_stats(bn.running_mean, bn.running_var, mean, var, y.numel() // max(y.shape[1], 1), bn.momentum)
        return bn_act_train(y, bn.weight, bn.bias, residual, bn.eps, act.name, act.alpha, backend, mean, var)[0]
    if input_bn is not None:
        input = materialize(input, input_bn, backend)
    if path == "triton_epilogue":
        # bn(conv(x) + b_conv) = conv(x) * s + (bn_bias - (running_mean - b_conv) * s)
        mean = bn.running_mean if conv.bias is None else bn.running_mean.double() - conv.bias.double()
        k = kernels(backend)
        scale, shift = k.bn_scale_shift(mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        return k.fused_conv(input, conv.weight, list(conv.stride), list(conv.padding), list(conv.dilation),
                            None, None, False, scale, shift, residual, act.name, act.alpha, False)[0]
    if path == "fold":
        weight, bias = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        return conv_act(input, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, residual, act,
                        backend=backend)
    # "batch_stats" and "unfolded": the convolution, then the fused bn_act; on cpu / cuda one C++ op
    if staged:
        return conv_bn_act_stage(input, conv, bn, residual, act)
    y = torch.nn.functional.conv2d(input, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return bn_act(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.use_batch_stats, bn.momentum, bn.eps,
                  residual_for(residual, y, fn), act, backend=backend, process_group=process_group)


def stage_applies(input: Tensor, backend: str, process_group=None) -> bool:
    """Whether conv_bn_act's "batch_stats" / "unfolded" paths run as the C++ stage op: the cpu and cuda backends,
    statistics of this rank's batch, no autocast (whose residual cast conv_bn_act does in Python)."""
    return backend in STAGE_BACKENDS and process_group is None and not torch.is_autocast_enabled(input.device.type)


def conv_bn_act_stage(input: Tensor, conv: ConvSpec, bn: BnSpec, residual: Tensor | None, act: Activation) -> Tensor:
    """``resnet_fused::conv_bn_act_stage`` (csrc/conv_bn_act_stage.cpp): aten's convolution, then bn_act_stage, in one
    op call (its checks in C++)."""
    return torch.ops.resnet_fused.conv_bn_act_stage(
        input, conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, residual, conv.stride,
        conv.padding, conv.dilation, conv.groups, bn.use_batch_stats, *momentum_args(bn.momentum), bn.eps, act.name,
        act.alpha)


def conv_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    residual: Tensor | None = None,
    act="relu",
    *,
    backend: str | None = None,
) -> Tensor:
    """``act(conv2d(input, weight, bias, ...) + residual)``: the eval form of conv_bn_act once BN is
    folded into (weight, bias) (see fold_bn); the conv's bias, the residual add and the activation ride
    on one pass after the convolution (``act`` as in bn_act). ``weight`` may be prepacked by
    prepack_conv_weight (CPU inference)."""
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    act = activation(act)
    if weight.layout == torch._mkldnn:
        if not onednn.applies(input, weight, bias, residual, backend):
            needs_grad = [n for n, t in (("input", input), ("bias", bias), ("residual", residual)) if t is not None and t.requires_grad]
            raise ValueError(f"resnet_fused.conv_act: a prepacked (oneDNN) weight runs only on the cpu backend, in a dtype oneDNN "
                             f"runs here (onednn.runs: fp32, bf16 with its bf16 ISA), weight and bias in the input's dtype, "
                             f"without gradients; got {input.dtype} input on {input.device}, "
                             f"{None if bias is None else bias.dtype} bias, requiring grad: {needs_grad or 'none'}")
        return onednn.conv_act(input, weight, bias, stride, padding, dilation, groups, residual, act)
    if onednn.onednn_inference(input, weight, bias, residual, backend):
        return onednn.conv_act(input, weight, bias, stride, padding, dilation, groups, residual, act)
    if cudnn.applies(input, weight, bias, residual, backend):
        return cudnn.conv_act(input, weight, bias, stride, padding, dilation, groups, residual, act)
    if bias is not None and (residual is not None or not act.is_identity) and not _requires_grad(input, weight, bias, residual):
        # the bias, residual and activation in one pass after a conv without bias, as conv_act_stage: aten's CPU conv
        # with a bias (NCHW, AVX2, small outputs) was measured at 2.3x the error of the conv, then the bias
        y = torch.nn.functional.conv2d(input, weight, None, stride, padding, dilation, groups)
        return bias_act(y, bias, residual_for(residual, y, "conv_act"), act, backends.resolve(backend, input))
    y = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    residual = residual_for(residual, y, "conv_act")
    if residual is not None and act.name == "relu":
        return add_relu(y, residual, backend=backend)
    return act(y + residual if residual is not None else y)
