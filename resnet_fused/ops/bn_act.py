"""bn_act: act(batch_norm(input) + residual), training and eval, as two autograd ops
(``resnet_fused::bn_act_train``, ``resnet_fused::bn_act_eval``) and the public function.

On the cpu and cuda backends bn_act is one C++ op, ``resnet_fused::bn_act_stage`` (csrc/bn_act_stage.cpp: its
autograd, checks and running-statistics update in C++); the Python ops here serve the torch and Triton backends.
Each takes the activation as (name, alpha) and the concrete backend as its last arguments, and runs
that backend's kernel ops: forward = statistics (training), one per-channel scale/shift, one fused
normalize + add + activation pass; backward = one reduction pass and one elementwise pass, after one
act_backward pass for an activation other than ReLU (_bn_math.bn_act_grads).
"""

from __future__ import annotations

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused._layout import memory_format, per_channel_empty
from resnet_fused.activations import Activation, activation
from resnet_fused.ops._bn_math import bn_act_grads, save_for_bn_act_grads
from resnet_fused.ops._checks import check_activation, check_batch, check_channel_vectors, check_like, check_running_args
from resnet_fused.ops.kernels import kernels
from resnet_fused.ops.sync_bn import SyncBnAct


@torch.library.custom_op("resnet_fused::bn_act_train", mutates_args=())
def bn_act_train(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    act: str,
    alpha: float,
    backend: str,
    batch_mean: Tensor | None = None,
    batch_var: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """act(batch_norm(input) with batch statistics + residual) -> (out, batch mean, biased batch var).

    batch_mean / batch_var: the batch statistics of `input` when a producer already took them (the
    fused convolution's epilogue); computed here otherwise. Either way they are functions of `input`
    and the backward treats them so.
    """
    k = kernels(backend)
    if batch_mean is None:
        mean, var = k.bn_stats(input)
    else:
        mean, var = batch_mean.clone(), batch_var.clone()  # an op's outputs may not alias its inputs
    scale, shift = k.bn_scale_shift(mean, var, weight, bias, eps)
    return k.bn_act_apply(input, scale, shift, residual, act, alpha), mean, var


@bn_act_train.register_fake
def _bn_act_train_fake(input, weight, bias, residual, eps, act, alpha, backend, batch_mean=None, batch_var=None):
    out = torch.empty_like(input, memory_format=memory_format(input))
    return out, per_channel_empty(input), per_channel_empty(input)


@torch.library.custom_op("resnet_fused::bn_act_eval", mutates_args=())
def bn_act_eval(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    eps: float,
    act: str,
    alpha: float,
    backend: str,
) -> Tensor:
    """act(batch_norm(input) with running statistics + residual)"""
    k = kernels(backend)
    scale, shift = k.bn_scale_shift(running_mean, running_var, weight, bias, eps)
    return k.bn_act_apply(input, scale, shift, residual, act, alpha)


@bn_act_eval.register_fake
def _bn_act_eval_fake(input, running_mean, running_var, weight, bias, residual, eps, act, alpha, backend):
    return torch.empty_like(input, memory_format=memory_format(input))


def _bn_act_train_setup(ctx, inputs, output):
    input, weight, bias, residual, eps, act, alpha, backend, _, _ = inputs
    out, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for mean and var (two launches each step)
    ctx.eps, ctx.backend = eps, backend
    save_for_bn_act_grads(ctx, Activation(act, alpha), input, weight, bias, residual, out, mean, var)


def _bn_act_train_backward(ctx, grad_out, _grad_mean, _grad_var):
    if grad_out is None:  # out took no gradient (set_materialize_grads(False))
        return (None,) * 10
    x, weight, out, mean, var, bias, residual = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[:4])  # input, weight, bias, residual
    grad_input, grad_weight, grad_bias, grad_residual = bn_act_grads(
        ctx.backend, grad_out, x, out, mean, var, weight, ctx.eps, ctx.act, True, needs, ctx.bias_dtype, bias=bias,
        residual=residual)
    # input, weight, bias, residual, eps, act, alpha, backend, batch_mean, batch_var
    return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None, None


def _bn_act_eval_setup(ctx, inputs, output):
    input, running_mean, running_var, weight, bias, residual, eps, act, alpha, backend = inputs
    ctx.eps, ctx.backend = eps, backend
    save_for_bn_act_grads(ctx, Activation(act, alpha), input, weight, bias, residual, output, running_mean, running_var)


def _bn_act_eval_backward(ctx, grad_out):
    x, weight, out, running_mean, running_var, bias, residual = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad[i] for i in (0, 3, 4, 5))  # input, weight, bias, residual
    grad_input, grad_weight, grad_bias, grad_residual = bn_act_grads(
        ctx.backend, grad_out, x, out, running_mean, running_var, weight, ctx.eps, ctx.act, False, needs, ctx.bias_dtype,
        bias=bias, residual=residual)
    # input, running_mean, running_var, weight, bias, residual, eps, act, alpha, backend
    return grad_input, None, None, grad_weight, grad_bias, grad_residual, None, None, None, None


STAGE_BACKENDS = ("cpu", "cuda")  # the backends whose fused stages are C++ ops (csrc/*_stage.cpp)


def momentum_args(momentum: float | Tensor) -> tuple[float, Tensor | None]:
    """The stage ops' (momentum, momentum_tensor): a float, or nn.BatchNorm2d's 0-dim 1 / num_batches_tracked."""
    return (0.0, momentum) if isinstance(momentum, Tensor) else (momentum, None)


def bn_act_stage(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                 running_var: Tensor | None, residual: Tensor | None, training: bool, momentum: float | Tensor, eps: float,
                 act: Activation) -> Tensor:
    """``resnet_fused::bn_act_stage`` (csrc/bn_act_stage.cpp): bn_act on the cpu and cuda backends in one op call."""
    return torch.ops.resnet_fused.bn_act_stage(input, weight, bias, running_mean, running_var, residual, training,
                                               *momentum_args(momentum), eps, act.name, act.alpha)


def update_running_stats(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                         count: int | Tensor, momentum) -> None:
    """running = (1 - momentum) running + momentum batch, with the unbiased variance of the `count`
    values per channel, as F.batch_norm does; momentum: a float, or a 0-dim tensor (nn.BatchNorm2d's
    1 / num_batches_tracked); count: an int, or a 0-dim tensor (all ranks' count, never read on the host)."""
    if running_mean is None or (isinstance(count, int) and count == 0):
        return
    with torch.no_grad():  # one lerp per buffer: running + momentum (batch - running)
        w = momentum.to(running_mean.dtype) if isinstance(momentum, Tensor) else momentum
        running_mean.lerp_(mean.to(running_mean.dtype), w)
        running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), w)


bn_act_train.register_autograd(_bn_act_train_backward, setup_context=_bn_act_train_setup)
bn_act_eval.register_autograd(_bn_act_eval_backward, setup_context=_bn_act_eval_setup)


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
    act="relu",
    *,
    backend: str | None = None,
    process_group=None,
) -> Tensor:
    """``act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``.

    Same arguments, values and side effects as ``torch.nn.functional.batch_norm``: in training the
    batch statistics normalize the input and ``running_mean`` / ``running_var`` (if given) are updated
    in place with ``momentum`` (unbiased variance); in eval the running statistics normalize. For
    nn.BatchNorm2d's ``momentum=None`` (cumulative average), pass ``1 / num_batches_tracked`` (a float
    or a 0-dim tensor), as nn.BatchNorm2d does. ``residual`` (input's shape) is added after the
    normalization, then the activation ``act``: a name of resnet_fused.activations.ACTIVATIONS ("relu",
    "silu", "leaky_relu", ...), an activation module (``nn.LeakyReLU(0.2)``), None for none, or a bool
    (the former ``relu`` flag: True is ReLU). Statistics are computed in fp32 (two-level, numerically
    stable). ``process_group`` (training, torch.distributed initialized): batch statistics over every
    rank's batch, with nn.SyncBatchNorm's semantics.
    """
    fn = "bn_act"
    check_activation(input, fn, "input")
    check_channel_vectors(dict(running_mean=running_mean, running_var=running_var, weight=weight, bias=bias),
                          input.shape[1], input.device, fn, f"input {tuple(input.shape)}")
    if residual is not None:
        check_like(residual, input, fn, "residual")
    check_running_args(running_mean, running_var, momentum, fn)
    act = activation(act)
    impl = backends.resolve(backend, input)

    if not training:
        if running_mean is None:
            raise ValueError(f"resnet_fused.{fn}: running_mean and running_var must be given in evaluation mode")
        if impl in STAGE_BACKENDS:
            return bn_act_stage(input, weight, bias, running_mean, running_var, residual, False, momentum, eps, act)
        return bn_act_eval(input, running_mean, running_var, weight, bias, residual, eps, act.name, act.alpha, impl)

    if process_group is not None and torch.distributed.is_initialized() and torch.distributed.get_world_size(process_group) > 1:
        # as nn.SyncBatchNorm: no host-side check of the global count (it would sync every step)
        out, mean, var, count = SyncBnAct.apply(input, weight, bias, residual, eps, act, impl, process_group)
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
        return out
    check_batch(input, fn)
    if impl in STAGE_BACKENDS:  # one C++ op: checks, autograd and the running-statistics update inside
        return bn_act_stage(input, weight, bias, running_mean, running_var, residual, True, momentum, eps, act)
    out, mean, var = bn_act_train(input, weight, bias, residual, eps, act.name, act.alpha, impl)
    update_running_stats(running_mean, running_var, mean, var, input.numel() // max(input.shape[1], 1), momentum)
    return out
