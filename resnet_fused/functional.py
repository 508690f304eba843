"""The public functions, the torch ops behind them, their fake kernels and their autograd formulas.

Two levels of ops live in the ``resnet_fused`` namespace:

* kernel ops (schemas in csrc/ops.cpp, C++ CPU and CUDA kernels; Triton and plain-PyTorch twins in
  resnet_fused/triton and resnet_fused/reference.py): ``add_relu_forward``, ``bn_stats``,
  ``bn_act_apply``, ``bn_act_backward_reduce``, ``bn_act_backward_elemt``, and the per-channel
  coefficient ops ``bn_scale_shift``, ``bn_backward_coeffs`` (one launch for what was a dozen tiny
  (C,) ops each). Their fakes are here.
* autograd ops (``torch.library.custom_op``, defined here): ``add_relu``, ``bn_act_train``,
  ``bn_act_eval``. Each takes the concrete backend as its last argument, runs that backend's
  kernel ops, and has one backward that runs two passes: one reduction, one elementwise.

The public functions validate arguments, pick the backend, call an autograd op, and (training) update
the running statistics in place exactly as ``torch.nn.functional.batch_norm`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused import reference as _reference
from resnet_fused.reference import _memory_format, _stat_dtype  # the layout and statistics dtype rules, defined once

__all__ = ["DeferredBnReLU", "add_relu", "bn_act", "conv_act", "conv_bn_act", "conv_bn_defer", "fold_bn", "onednn_inference",
           "prepack_conv_weight"]


def _per_channel_empty(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[1], dtype=_stat_dtype(x))


# ---- fake kernels of the kernel ops (shapes, dtypes and layouts only) ----


def _add_relu_forward_fake(input, residual):
    return torch.empty_like(input, memory_format=_memory_format(input))


def _bn_stats_fake(input):
    return _per_channel_empty(input), _per_channel_empty(input)


def _bn_act_apply_fake(input, scale, shift, residual, relu):
    return torch.empty_like(input, memory_format=_memory_format(input))


def _bn_act_backward_reduce_fake(grad_out, input, mean, output):
    return _per_channel_empty(input), _per_channel_empty(input)


def _bn_act_backward_elemt_fake(grad_out, output, input, mean, dy_scale, x_scale, shift, need_grad_residual):
    fmt = _memory_format(input if input is not None else grad_out)
    grad_input = torch.empty_like(grad_out, memory_format=fmt)
    grad_residual = torch.empty_like(grad_out, memory_format=fmt) if need_grad_residual else grad_out.new_empty(0)
    return grad_input, grad_residual


def _bn_scale_shift_fake(mean, var, weight, bias, eps):
    return mean.new_empty(mean.shape, dtype=torch.float32), mean.new_empty(mean.shape, dtype=torch.float32)


def _bn_backward_coeffs_fake(sum_dy, sum_dy_xmu, var, weight, eps, count, training):
    return tuple(sum_dy.new_empty(sum_dy.shape, dtype=torch.float32) for _ in range(4))


_KERNEL_FAKES = {
    "add_relu_forward": _add_relu_forward_fake,
    "bn_stats": _bn_stats_fake,
    "bn_act_apply": _bn_act_apply_fake,
    "bn_act_backward_reduce": _bn_act_backward_reduce_fake,
    "bn_act_backward_elemt": _bn_act_backward_elemt_fake,
    "bn_scale_shift": _bn_scale_shift_fake,
    "bn_backward_coeffs": _bn_backward_coeffs_fake,
}
assert set(_KERNEL_FAKES) == set(backends.KERNELS)

if backends.has_extension():  # the C++ kernel ops (CPU, CUDA)
    for _name, _fake in _KERNEL_FAKES.items():
        torch.library.register_fake(f"resnet_fused::{_name}")(_fake)

def _conv_output_shape(input, weight, stride, padding, dilation) -> tuple[int, int, int, int]:
    # Ho = (H + 2 p - d (K - 1) - 1) // s + 1
    hw = [(input.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1 for i in range(2)]
    return (input.shape[0], weight.shape[0], *hw)


def _triton_conv_bn_act_fake(input, weight, stride, padding, dilation, in_scale, in_shift, in_relu, out_scale, out_shift,
                             residual, relu, stats):
    out = input.new_empty(_conv_output_shape(input, weight, stride, padding, dilation)).contiguous(memory_format=torch.channels_last)
    n = weight.shape[0] if stats else 0
    return out, input.new_empty(n, dtype=torch.float32), input.new_empty(n, dtype=torch.float32)


_TRITON_CONV_SCHEMA = (
    "(Tensor input, Tensor weight, int[2] stride, int[2] padding, int[2] dilation, Tensor? in_scale, Tensor? in_shift, "
    "bool in_relu, Tensor? out_scale, Tensor? out_shift, Tensor? residual, bool relu, bool stats) -> (Tensor, Tensor, Tensor)"
)

if backends.has_triton():  # the Triton launchers become ops too, so that tracing (compile, opcheck) sees fakes
    # registered for every device: each launcher rejects, naming its op, tensors on a device it cannot run on
    # here (it takes CUDA; CPU only under TRITON_INTERPRET=1), and launches on its tensors' CUDA device
    for _name, _launcher in backends.triton_launchers().items():
        torch.library.custom_op(f"resnet_fused::triton_{_name}", _launcher, mutates_args=()).register_fake(_KERNEL_FAKES[_name])
    from resnet_fused.triton import conv as _triton_conv

    # act(conv2d(in_act(input * in_scale + in_shift), weight) * out_scale + out_shift (+ residual)) -> (out, mean, var)
    torch.library.custom_op("resnet_fused::triton_conv_bn_act", _triton_conv.conv_bn_act, mutates_args=(),
                            schema=_TRITON_CONV_SCHEMA).register_fake(_triton_conv_bn_act_fake)


# ---- add_relu ----


@torch.library.custom_op("resnet_fused::add_relu", mutates_args=())
def _add_relu(input: Tensor, residual: Tensor, backend: str) -> Tensor:
    """relu(input + residual)"""
    return backends.kernels(backend).add_relu_forward(input, residual)


@_add_relu.register_fake
def _(input, residual, backend):
    return torch.empty_like(input, memory_format=_memory_format(input))


def _add_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad_out):
    (out,) = ctx.saved_tensors
    # d relu(z)/dz = 0 where out <= 0, else 1 (a NaN output passes its gradient, as threshold_backward does)
    grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
    return grad, grad, None


_add_relu.register_autograd(_add_relu_backward, setup_context=_add_relu_setup)


# ---- bn_act: batch norm (+ residual) (+ ReLU), training and eval ----


def _scale_shift(
    mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None, dtype: torch.dtype, backend: str
) -> tuple[Tensor, Tensor]:
    # batch_norm(x) = (x - mean) * invstd * weight + bias = x * scale + shift; (C,) math in fp64.
    # fp32 (every kernel backend): one bn_scale_shift launch; fp64 (gradcheck, the torch backend): the same math here
    if dtype == torch.float32:
        return backends.kernels(backend).bn_scale_shift(mean, var, weight, bias, eps)
    scale, shift = _reference._scale_shift_fp64(mean, var, weight, bias, eps)
    return scale.to(dtype), shift.to(dtype)


@torch.library.custom_op("resnet_fused::bn_act_train", mutates_args=())
def _bn_act_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    relu: bool,
    backend: str,
    batch_mean: Tensor | None = None,
    batch_var: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """act(batch_norm(input) with batch statistics + residual) -> (out, batch mean, biased batch var).

    batch_mean / batch_var: the batch statistics of `input` when a producer already took them (the
    fused convolution's epilogue); computed here otherwise. Either way they are functions of `input`
    and the backward treats them so.
    """
    k = backends.kernels(backend)
    if batch_mean is None:
        mean, var = k.bn_stats(input)
    else:
        mean, var = batch_mean.clone(), batch_var.clone()  # an op's outputs may not alias its inputs
    scale, shift = _scale_shift(mean, var, eps, weight, bias, mean.dtype, backend)
    return k.bn_act_apply(input, scale, shift, residual, relu), mean, var


@_bn_act_train.register_fake
def _(input, weight, bias, residual, eps, relu, backend, batch_mean=None, batch_var=None):
    out = torch.empty_like(input, memory_format=_memory_format(input))
    return out, _per_channel_empty(input), _per_channel_empty(input)


@torch.library.custom_op("resnet_fused::bn_act_eval", mutates_args=())
def _bn_act_eval(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    relu: bool,
    backend: str,
) -> Tensor:
    """act(batch_norm(input) with running statistics + residual)"""
    scale, shift = _scale_shift(running_mean, running_var, eps, weight, bias, _stat_dtype(input), backend)
    return backends.kernels(backend).bn_act_apply(input, scale, shift, residual, relu)


@_bn_act_eval.register_fake
def _(input, running_mean, running_var, weight, bias, residual, eps, relu, backend):
    return torch.empty_like(input, memory_format=_memory_format(input))


def _bn_act_train_setup(ctx, inputs, output):
    input, weight, bias, residual, eps, relu, backend, _, _ = inputs
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and var (two launches each step)
    ctx.eps, ctx.relu, ctx.backend = eps, relu, backend
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(input, weight, out if relu else None, mean, var)


def _bn_act_eval_setup(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, residual, eps, relu, backend = inputs
    ctx.eps, ctx.relu, ctx.backend = eps, relu, backend
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(input, weight, output if relu else None, running_mean, running_var)


def _bn_act_grads(
    backend: str, grad_out: Tensor, x: Tensor, out: Tensor | None, mean: Tensor, var: Tensor, weight: Tensor | None,
    eps: float, relu: bool, training: bool, needs: tuple[bool, bool, bool, bool], bias_dtype: torch.dtype | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(grad_input, grad_weight, grad_bias, grad_residual) of out = act(x * scale + shift + residual),
    scale and shift from (batch or running) statistics `mean`, `var`; `needs` says which are wanted.

    One reduction pass gives sum dy and sum dy (x - mean) per channel, dy = grad_out where out > 0 or NaN, else 0;
    one elementwise pass writes grad_input (and grad_residual = dy when a ReLU masks it):
      training: dx = w invstd (dy - sum dy / M - (x - mean) invstd^2 sum dy (x - mean) / M)
                   = dy * a + (x - mean) * b + c
      eval:     dx = dy * w invstd
      grad_weight = invstd sum dy (x - mean),  grad_bias = sum dy
    """
    needs_x, needs_w, needs_b, needs_r = needs
    k = backends.kernels(backend)
    acc = _stat_dtype(x)
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))  # one layout for both passes

    # per-channel (C,) coefficients: fp64 math, handed to the kernels in acc (fp32; fp64 on the torch backend)
    a = b = c = grad_weight = sum_dy = None
    if (training and needs_x) or needs_w or needs_b:
        sum_dy, sum_dy_xmu = k.bn_act_backward_reduce(grad_out, x, mean.to(acc), out)
        count = x.numel() // x.shape[1]
        if acc == torch.float32:  # one launch
            a, b, c, grad_weight = k.bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps, count, training)
        else:
            a, b, c, grad_weight = (t.to(acc) for t in _reference._backward_coeffs_fp64(
                sum_dy, sum_dy_xmu, var, weight, eps, count, training))
    elif needs_x:  # eval, only grad_input = dy * a: a = weight * invstd is bn_scale_shift's scale
        a = _scale_shift(mean, var, eps, weight, None, acc, backend)[0]

    grad_input = grad_residual = None
    need_masked_residual = needs_r and relu
    if needs_x:
        if training:
            grad_input, masked = k.bn_act_backward_elemt(grad_out, out, x, mean.to(acc), a, b, c, need_masked_residual)
        else:
            grad_input, masked = k.bn_act_backward_elemt(grad_out, out, None, None, a, None, None, need_masked_residual)
        if need_masked_residual:
            grad_residual = masked
    elif need_masked_residual:
        grad_residual = torch.ops.aten.threshold_backward(grad_out, out, 0)
    if needs_r and not relu:
        grad_residual = grad_out

    grad_weight = grad_weight.to(weight.dtype) if needs_w else None
    grad_bias = sum_dy.to(bias_dtype) if needs_b else None
    return grad_input, grad_weight, grad_bias, grad_residual


def _bn_act_backward(ctx, grad_out: Tensor | None, training: bool):
    if grad_out is None:  # out took no gradient (set_materialize_grads(False) in training)
        return (None,) * 9
    x, weight, out, mean, var = ctx.saved_tensors
    # training inputs: (input, weight, bias, residual, ...); eval: (input, running_mean, running_var, weight, bias, residual, ...)
    needs = tuple(ctx.needs_input_grad[i] for i in ((0, 1, 2, 3) if training else (0, 3, 4, 5)))
    grad_input, grad_weight, grad_bias, grad_residual = _bn_act_grads(
        ctx.backend, grad_out, x, out, mean, var, weight, ctx.eps, ctx.relu, training, needs, ctx.bias_dtype)
    if training:  # input, weight, bias, residual, eps, relu, backend, batch_mean, batch_var
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None
    # input, running_mean, running_var, weight, bias, residual, eps, relu, backend
    return grad_input, None, None, grad_weight, grad_bias, grad_residual, None, None, None


_bn_act_train.register_autograd(lambda ctx, g, _m, _v: _bn_act_backward(ctx, g, True), setup_context=_bn_act_train_setup)
_bn_act_eval.register_autograd(lambda ctx, g: _bn_act_backward(ctx, g, False), setup_context=_bn_act_eval_setup)


# ---- the public functions ----


def _check_activation(x: Tensor, fn: str, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"resnet_fused.{fn}: `{name}` must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"resnet_fused.{fn}: expected `{name}` to be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"resnet_fused.{fn}: expected `{name}` to be floating point, got {x.dtype}")


def _check_like(t: Tensor, ref: Tensor, fn: str, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"resnet_fused.{fn}: `{name}` must be a Tensor, got {type(t).__name__}")
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"resnet_fused.{fn}: `{name}` must match `input`: got {tuple(t.shape)} {t.dtype} on {t.device}, "
            f"input is {tuple(ref.shape)} {ref.dtype} on {ref.device}"
        )


def _check_channel_vector(v: Tensor | None, channels: int, device: torch.device, fn: str, name: str, of: str) -> None:
    """v is None or a float (channels,) vector on `device`; `of` names what has the channels."""
    if v is None:
        return
    if not isinstance(v, Tensor):
        raise TypeError(f"resnet_fused.{fn}: `{name}` must be a Tensor or None, got {type(v).__name__}")
    if v.dim() != 1 or v.numel() != channels:
        raise ValueError(f"resnet_fused.{fn}: expected `{name}` of shape ({channels},), one per channel of {of}, got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"resnet_fused.{fn}: expected `{name}` to be floating point, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"resnet_fused.{fn}: `{name}` is on {v.device} but `input` is on {device}")


def add_relu(input: Tensor, residual: Tensor, *, backend: str | None = None) -> Tensor:
    """relu(input + residual) in one pass; differentiable in both arguments."""
    _check_activation(input, "add_relu", "input")
    _check_like(residual, input, "add_relu", "residual")
    return _add_relu(input, residual, backends.resolve(backend, input))


def bn_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Tensor | None = None,
    relu: bool = True,
    *,
    backend: str | None = None,
    process_group=None,
) -> Tensor:
    """``act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``.

    Same arguments, values and side effects as ``torch.nn.functional.batch_norm``: in training the
    batch statistics normalize the input and ``running_mean`` / ``running_var`` (if given) are updated
    in place with ``momentum`` (unbiased variance); in eval the running statistics normalize. For
    nn.BatchNorm2d's ``momentum=None`` (cumulative average), pass ``1 / num_batches_tracked`` (a float
    or a 0-dim tensor), as nn.BatchNorm2d does. ``residual`` (input's shape) is added after the normalization, then ReLU if
    ``relu``. Statistics are computed in fp32 (two-level, numerically stable). ``process_group``
    (training, torch.distributed initialized): batch statistics over every rank's batch, with
    nn.SyncBatchNorm's semantics.
    """
    fn = "bn_act"
    _check_activation(input, fn, "input")
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_channel_vector(v, input.shape[1], input.device, fn, name, f"input {tuple(input.shape)}")
    if residual is not None:
        _check_like(residual, input, fn, "residual")
    _check_running_args(running_mean, running_var, momentum, fn)
    name = backends.resolve(backend, input)

    if not training:
        if running_mean is None:
            raise ValueError(f"resnet_fused.{fn}: running_mean and running_var must be given in evaluation mode")
        return _bn_act_eval(input, running_mean, running_var, weight, bias, residual, eps, relu, name)

    if process_group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(process_group) > 1:
        from resnet_fused.distributed import SyncBnAct

        # as nn.SyncBatchNorm: no host-side check of the global count (it would sync every step)
        out, mean, var, count = SyncBnAct.apply(input, weight, bias, residual, eps, relu, name, process_group)
        _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return out
    _check_batch(input, fn)
    out, mean, var = _bn_act_train(input, weight, bias, residual, eps, relu, name)
    _update_running_stats(running_mean, running_var, mean, var, input.numel() // max(input.shape[1], 1), momentum)
    return out


def _check_running_args(running_mean: Tensor | None, running_var: Tensor | None, momentum, fn: str) -> None:
    if momentum is None:
        raise TypeError(f"resnet_fused.{fn}: momentum=None is nn.BatchNorm2d's cumulative average: pass 1 / num_batches_tracked")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"resnet_fused.{fn}: give both running_mean and running_var, or neither")


def _check_batch(input: Tensor, fn: str) -> None:
    if input.numel() == input.shape[1] and input.numel() > 0:  # one value per channel
        raise ValueError(f"resnet_fused.{fn}: expected more than 1 value per channel when training, got input size {tuple(input.shape)}")


def _update_running_stats(running_mean, running_var, mean, var, count: int | Tensor, momentum) -> None:
    """running = (1 - momentum) running + momentum batch, with the unbiased variance of the `count`
    values per channel, as F.batch_norm does; momentum: a float, or a 0-dim tensor (nn.BatchNorm2d's
    1 / num_batches_tracked); count: an int, or a 0-dim tensor (all ranks' count, never read on the host)."""
    if running_mean is None or (isinstance(count, int) and count == 0):
        return
    with torch.no_grad():  # one lerp per buffer: running + momentum (batch - running)
        w = momentum.to(running_mean.dtype) if isinstance(momentum, Tensor) else momentum
        running_mean.lerp_(mean.to(running_mean.dtype), w)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), w)


# ---- conv + bn_act ----


@torch.library.custom_op("resnet_fused::conv2d_stats", mutates_args=())
def _conv2d_stats(
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
    convolution's epilogue; other backends run bn_stats after it.
    """
    prologue = input_mean is not None
    if prologue:
        in_scale, in_shift = _scale_shift(input_mean, input_var, input_eps, input_weight, input_bias, input_mean.dtype,
                                          backend)
    if backend == "triton" and groups == 1:
        scale_shift = (in_scale, in_shift, True) if prologue else (None, None, False)
        return torch.ops.resnet_fused.triton_conv_bn_act(input, weight, stride, padding, dilation, *scale_shift,
                                                         None, None, None, False, True)
    k = backends.kernels(backend)
    a = k.bn_act_apply(input, in_scale, in_shift, None, True) if prologue else input
    y = torch.nn.functional.conv2d(a, weight, None, stride, padding, dilation, groups)
    return (y, *k.bn_stats(y))


@_conv2d_stats.register_fake
def _(input, weight, stride, padding, dilation, groups, backend, input_mean=None, input_var=None, input_weight=None,
      input_bias=None, input_eps=1e-5):
    if backend == "triton" and groups == 1:  # the implicit-GEMM conv writes NHWC
        out = input.new_empty(_conv_output_shape(input, weight, stride, padding, dilation))
        out = out.contiguous(memory_format=torch.channels_last)
    else:  # aten's conv on the (prologue's, same-layout) input: its own layout rule (input's or weight's)
        out = torch.nn.functional.conv2d(input, weight, None, stride, padding, dilation, groups)
    return out, _per_channel_empty(out), _per_channel_empty(out)


def _conv2d_stats_setup(ctx, inputs, output):
    input, weight, stride, padding, dilation, groups, backend, in_mean, in_var, in_weight, in_bias, in_eps = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics
    ctx.conv = (stride, padding, dilation, groups)
    ctx.backend, ctx.in_eps = backend, in_eps
    ctx.in_bias_dtype = in_bias.dtype if in_bias is not None else None
    ctx.save_for_backward(input, weight, in_mean, in_var, in_weight, in_bias)


def _conv2d_stats_backward(ctx, grad_out, _mean, _var):
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
        in_scale, in_shift = _scale_shift(in_mean, in_var, ctx.in_eps, in_weight, in_bias, in_mean.dtype, ctx.backend)
        a = backends.kernels(ctx.backend).bn_act_apply(input, in_scale, in_shift, None, True)
    needs_a = needs_input or (prologue and (needs_in_w or needs_in_b))
    grad_a, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad_out, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [needs_a, needs_weight, False])
    grad_input = grad_in_weight = grad_in_bias = None
    if not prologue:
        grad_input = grad_a
    elif needs_a:  # through relu(batch_norm(input)) in training: the batch statistics depend on input
        grad_input, grad_in_weight, grad_in_bias, _ = _bn_act_grads(
            ctx.backend, grad_a, input, a, in_mean, in_var, in_weight, ctx.in_eps, True, True,
            (needs_input, needs_in_w, needs_in_b, False), ctx.in_bias_dtype)
    return grad_input, grad_weight, None, None, None, None, None, None, None, grad_in_weight, grad_in_bias, None


_conv2d_stats.register_autograd(_conv2d_stats_backward, setup_context=_conv2d_stats_setup)


def fold_bn(
    conv_weight: Tensor,
    conv_bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Weights and bias of one convolution equal to batch_norm(conv2d(x)) with running statistics:
    w' = w * s[co], b' = (b - running_mean) * s + bn_bias, s = bn_weight / sqrt(running_var + eps).
    Math in fp64, rounded once to the conv weight's dtype. Differentiable."""
    acc = torch.float64  # (C,) and weight-sized math, once per cache refresh: round once, at the end
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) * scale
    if conv_bias is not None:
        shift = shift + conv_bias.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    weight = conv_weight.to(acc) * scale.view(-1, 1, 1, 1)
    return weight.to(conv_weight.dtype), shift.to(conv_weight.dtype)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


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
        _check_input_bn(self, y, "DeferredBnReLU.materialize")
        return _materialize(y, self, backends.resolve(backend, y))


def _check_conv(input: Tensor, conv_weight: Tensor, groups: int, fn: str) -> None:
    _check_activation(input, fn, "input")
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4:
        raise ValueError(f"resnet_fused.{fn}: expected `conv_weight` of shape (Cout, Cin / groups, KH, KW), got "
                         f"{tuple(conv_weight.shape) if isinstance(conv_weight, Tensor) else type(conv_weight).__name__}")
    if conv_weight.shape[1] * groups != input.shape[1]:
        raise ValueError(f"resnet_fused.{fn}: `conv_weight` {tuple(conv_weight.shape)} with groups={groups} expects "
                         f"{conv_weight.shape[1] * groups} input channels, `input` {tuple(input.shape)} has {input.shape[1]}")
    if conv_weight.device != input.device or (conv_weight.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type)):
        raise ValueError(f"resnet_fused.{fn}: `conv_weight` is {conv_weight.dtype} on {conv_weight.device}, "
                         f"`input` is {input.dtype} on {input.device}")


def _check_input_bn(input_bn: DeferredBnReLU | None, input: Tensor, fn: str) -> None:
    if input_bn is None:
        return
    if not isinstance(input_bn, DeferredBnReLU):
        raise TypeError(f"resnet_fused.{fn}: `input_bn` must be the DeferredBnReLU that conv_bn_defer returned, got "
                        f"{type(input_bn).__name__}")
    for name in ("mean", "var", "weight", "bias"):
        _check_channel_vector(getattr(input_bn, name), input.shape[1], input.device, fn, f"input_bn.{name}",
                              f"input {tuple(input.shape)}")


def _prologue_fusable(input: Tensor, conv_bias: Tensor | None, process_group) -> bool:
    """conv2d_stats's prologue computes conv(relu(bn(input))) exactly here; elsewhere (a conv bias,
    synchronized statistics, autocast) the activation is written first and the ordinary path runs."""
    return conv_bias is None and process_group is None and not torch.is_autocast_enabled(input.device.type)


def _materialize(input: Tensor, input_bn: DeferredBnReLU, backend: str) -> Tensor:
    """relu(batch_norm(input)) with input_bn's batch statistics, written (autograd as bn_act training)."""
    return _bn_act_train(input, input_bn.weight, input_bn.bias, None, input_bn.eps, True, backend, input_bn.mean,
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
    _check_conv(input, conv_weight, groups, fn)
    _check_running_args(running_mean, running_var, momentum, fn)
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        _check_channel_vector(v, conv_weight.shape[0], input.device, fn, name, f"conv_weight {tuple(conv_weight.shape)}")
    _check_input_bn(input_bn, input, fn)
    name = backends.resolve(backend, input)
    if input_bn is not None and not _prologue_fusable(input, None, None):
        input, input_bn = _materialize(input, input_bn, name), None
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if torch.is_autocast_enabled(input.device.type):  # the op runs outside autocast: cast as F.conv2d would
        dtype = torch.get_autocast_dtype(input.device.type)
        input, conv_weight = input.to(dtype), conv_weight.to(dtype)
    y, mean, var = _conv2d_stats(input, conv_weight, list(stride), list(padding), list(dilation), groups, name,
                                 *(input_bn or ()))
    _check_batch(y, fn)
    _update_running_stats(running_mean, running_var, mean, var, y.numel() // max(y.shape[1], 1), momentum)
    return y, DeferredBnReLU(mean, var, bn_weight, bn_bias, eps)


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
    relu: bool = True,
    *,
    input_bn: DeferredBnReLU | None = None,
    backend: str | None = None,
    process_group=None,
) -> Tensor:
    """``act(batch_norm(conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups), ...) + residual)``.

    Equal in value and in its side effects on the running statistics to the eager composition, with
    autograd for every tensor argument. Eval: BN is folded into the convolution (one conv with bias,
    then one fused add + ReLU pass at most). Training: the convolution, then ``bn_act`` (statistics,
    one fused normalize + add + ReLU pass; fused two-pass backward). ``process_group``: as in bn_act.

    ``input_bn`` (from conv_bn_defer): the convolution's input is relu(batch_norm(input)) with those
    batch statistics, applied as the input loads (Triton prologue) and recomputed in the backward.
    """
    fn = "conv_bn_act"
    _check_conv(input, conv_weight, groups, fn)
    for name, v in (("running_mean", running_mean), ("running_var", running_var), ("bn_weight", bn_weight),
                    ("bn_bias", bn_bias), ("conv_bias", conv_bias)):
        _check_channel_vector(v, conv_weight.shape[0], input.device, fn, name, f"conv_weight {tuple(conv_weight.shape)}")
    _check_input_bn(input_bn, input, fn)
    autocast = torch.is_autocast_enabled(input.device.type)  # then F.conv2d picks the dtype, as in eager
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    name = backends.resolve(backend, input)
    use_batch_stats = training or running_mean is None
    triton_conv = name == "triton" and groups == 1 and process_group is None and not autocast  # the implicit-GEMM conv
    if use_batch_stats and _prologue_fusable(input, conv_bias, process_group) and (input_bn is not None or triton_conv):
        # conv2d_stats (Triton: the statistics in the epilogue, input_bn in the prologue), then one fused
        # normalize + add + ReLU pass; the residual is checked first, before any running statistic moves
        _check_residual_of_conv(residual, input, conv_weight, stride, padding, dilation, fn)
        y, bn = conv_bn_defer(input, conv_weight, running_mean, running_var, bn_weight, bn_bias, stride, padding,
                              dilation, groups, momentum, eps, input_bn=input_bn, backend=name)
        return _bn_act_train(y, bn_weight, bn_bias, residual, eps, relu, name, bn.mean, bn.var)[0]
    if input_bn is not None:
        input = _materialize(input, input_bn, name)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, conv_weight, conv_bias, bn_weight, bn_bias, residual))
    if triton_conv and not use_batch_stats and not needs_grad:  # BN, residual and ReLU in the epilogue
        # bn(conv(x) + b_conv) = conv(x) * s + (bn_bias - (running_mean - b_conv) * s)
        scale, shift = _scale_shift(running_mean - (conv_bias if conv_bias is not None else 0), running_var, eps,
                                    bn_weight, bn_bias, _stat_dtype(input), name)
        _check_residual_of_conv(residual, input, conv_weight, stride, padding, dilation, fn)
        return torch.ops.resnet_fused.triton_conv_bn_act(input, conv_weight, list(stride), list(padding), list(dilation),
                                                         None, None, False, scale, shift, residual, relu, False)[0]

    if use_batch_stats:
        y = torch.nn.functional.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
        return bn_act(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps,
                      _residual_for(residual, y, fn), relu, backend=name, process_group=process_group)

    if needs_grad:
        # eval with gradients (frozen statistics): conv, then the fused bn_act whose backward reduces in
        # fp32/fp64 like eager's; folding would route grad_bias through conv's bias gradient instead
        y = torch.nn.functional.conv2d(input, conv_weight, conv_bias, stride, padding, dilation, groups)
        return bn_act(y, running_mean, running_var, bn_weight, bn_bias, False, momentum, eps,
                      _residual_for(residual, y, fn), relu, backend=name)
    weight, bias = fold_bn(conv_weight, conv_bias, running_mean, running_var, bn_weight, bn_bias, eps)
    return conv_act(input, weight, bias, stride, padding, dilation, groups, residual, relu, backend=name)


def _check_residual_of_conv(residual: Tensor | None, input: Tensor, weight: Tensor, stride, padding, dilation, fn: str) -> None:
    """residual (if any) must match the convolution's output, which is not computed yet."""
    if residual is not None:
        _check_like(residual, input.new_empty(_conv_output_shape(input, weight, stride, padding, dilation)), fn, "residual")


def _residual_for(residual: Tensor | None, y: Tensor, fn: str) -> Tensor | None:
    """The residual to add to y: under autocast y may come out in the autocast dtype while the
    residual does not; it is then cast to y's dtype, as ``y += residual`` would. Else it must match y."""
    if residual is not None and residual.dtype != y.dtype and torch.is_autocast_enabled(y.device.type):
        residual = residual.to(y.dtype)
    if residual is not None:
        _check_like(residual, y, fn, "residual")
    return residual


def conv_act(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    residual: Tensor | None = None,
    relu: bool = True,
    *,
    backend: str | None = None,
) -> Tensor:
    """``act(conv2d(input, weight, bias, ...) + residual)``: the eval form of conv_bn_act once BN is
    folded into (weight, bias) (see fold_bn); the conv's bias, the residual add and the ReLU ride on
    one pass after the convolution. ``weight`` may be prepacked by prepack_conv_weight (CPU inference)."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    if weight.layout == torch._mkldnn:
        if not _onednn_applies(input, weight, bias, residual, backend):
            needs_grad = [n for n, t in (("input", input), ("bias", bias), ("residual", residual)) if t is not None and t.requires_grad]
            raise ValueError(f"resnet_fused.conv_act: a prepacked (oneDNN) weight runs only on the cpu backend, fp32, without "
                             f"gradients; got {input.dtype} input on {input.device}, requiring grad: {needs_grad or 'none'}")
        return _conv_act_onednn(input, weight, bias, stride, padding, dilation, groups, residual, relu)
    if onednn_inference(input, weight, bias, residual, backend):
        return _conv_act_onednn(input, weight, bias, stride, padding, dilation, groups, residual, relu)
    if _cudnn_fused_applies(input, weight, bias, residual, relu, backend):
        if residual is not None:
            _check_residual_of_conv(residual, input, weight, stride, padding, dilation, "conv_act")
        return _cudnn_conv_act(input, weight, bias, residual, list(stride), list(padding), list(dilation), groups)
    y = torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    residual = _residual_for(residual, y, "conv_act")
    if residual is not None:
        return add_relu(y, residual, backend=backend) if relu else y + residual
    return torch.relu(y) if relu else y


# relu(conv(input, weight) + bias (+ residual)) in one cuDNN call: cudnnConvolutionBiasActivationForward
# semantics (aten's cudnn_convolution_relu / cudnn_convolution_add_relu), so the conv output is written
# once instead of being re-read by a bias, add and ReLU pass. CUDA inference only: aten gives these ops
# neither autograd nor a fake kernel, hence this wrapper op with a fake and no autograd.
@torch.library.custom_op("resnet_fused::cudnn_conv_act", mutates_args=(), device_types="cuda")
def _cudnn_conv_act(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, stride: list[int],
                    padding: list[int], dilation: list[int], groups: int) -> Tensor:
    if residual is None:
        return torch.cudnn_convolution_relu(input, weight, bias, stride, padding, dilation, groups)
    return torch.cudnn_convolution_add_relu(input, weight, residual, 1.0, bias, stride, padding, dilation, groups)


@_cudnn_conv_act.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, groups):
    out = input.new_empty(_conv_output_shape(input, weight, stride, padding, dilation))
    # cuDNN's rule (cudnn_conv_suggest_memory_format): channels_last if the input or the weight is
    channels_last = any(torch._prims_common.suggest_memory_format(t) == torch.channels_last for t in (input, weight))
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _cudnn_fused_applies(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, relu: bool,
                         backend: str | None) -> bool:
    """Whether conv_act runs cuDNN's fused conv + bias (+ add) + ReLU: the `cuda` backend's inference
    with a ReLU, one floating dtype throughout, cuDNN enabled, and no gradient needed."""
    return (relu and input.is_cuda and input.dim() == 4 and torch.backends.cudnn.enabled
            and backends.variant().cudnn_fused is not False
            and backends.resolve(backend, input) == "cuda"
            and input.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and all(t is None or (t.dtype == input.dtype and t.device == input.device) for t in (weight, bias, residual))
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual))))


def prepack_conv_weight(weight: Tensor, stride, padding, dilation, groups: int, input_shape) -> Tensor:
    """``weight`` reordered once into oneDNN's blocked layout for inputs of ``input_shape`` (what
    Inductor's CPU freezing does): conv_act then skips the per-call reorder, which costs most where
    weights are large and activations small (ResNet's last stages). CPU, fp32; for conv_act only."""
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.detach().to_mkldnn(), list(padding), list(stride),
                                                     list(dilation), groups, list(input_shape))


# oneDNN's fused convolution has a fixed cost per call of ~40 us (2 AVX2 cores, prepacked weight: 56 us
# at 1x8x4x4 -> 8 channels 3x3, against 14 us for aten conv + relu; about even at 1x64x14x14 with a
# ReLU, and ahead there with a residual). Below this many outputs (at stride 1) aten's conv runs.
_ONEDNN_MIN_OUTPUT = 1 << 13


def onednn_inference(input: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None,
                     backend: str | None = None) -> bool:
    """Whether conv_act runs oneDNN's convolution with post-ops here (and so can use a prepacked weight).
    CPU inference: oneDNN's convolution takes the bias, the residual add and the ReLU as post-ops
    (what Inductor's CPU backend emits), so the conv output is written once; used where it can run
    (_onednn_applies) and pays (at least _ONEDNN_MIN_OUTPUT outputs)."""
    if torch.compiler.is_compiling():  # Inductor lowers the plain conv + epilogue to oneDNN itself
        return False
    forced = backends.variant().onednn
    large = input.numel() // max(input.shape[1], 1) * weight.shape[0] >= _ONEDNN_MIN_OUTPUT
    return (large if forced is None else forced) and _onednn_applies(input, weight, bias, residual, backend)


def _onednn_applies(input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, backend: str | None) -> bool:
    """oneDNN's fused convolution computes conv_act here: CPU, fp32, and no gradient needed (it is not
    differentiable)."""
    return (
        input.device.type == "cpu"
        and backends.resolve(backend, input) == "cpu"
        and torch.backends.mkldnn.is_available()
        and input.dtype == torch.float32  # oneDNN's bf16 path needs AVX512-BF16 / AVX-NE-CONVERT
        and weight.dtype == input.dtype
        and (residual is None or residual.dtype == input.dtype)
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, residual)))
    )


def _conv_act_onednn(input, weight, bias, stride, padding, dilation, groups, residual, relu) -> Tensor:
    ops, unary = torch.ops.mkldnn._convolution_pointwise, "relu" if relu else "none"
    if residual is None:
        return ops(input, weight, bias, padding, stride, dilation, groups, unary, [], "")
    _check_residual_of_conv(residual, input, weight, stride, padding, dilation, "conv_act")
    return ops.binary(input, residual, weight, bias, padding, stride, dilation, groups, "add", 1.0, unary if relu else None, [], "")

