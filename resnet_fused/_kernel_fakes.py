"""Fake (meta) kernels of the kernel ops: output shapes, dtypes and layouts only.

The C++ library points at this module (``m.set_python_module`` in csrc/ops.cpp) and
resnet_fused.backends imports it right after loading the schemas, so the fakes exist wherever the
ops do. The Triton twins of these ops (resnet_fused/ops/triton.py) register the same functions.
"""

from __future__ import annotations

import torch

from resnet_fused._layout import memory_format, per_channel_empty


def add_relu_forward(input, residual):
    return torch.empty_like(input, memory_format=memory_format(input))


def bn_stats(input):
    return per_channel_empty(input), per_channel_empty(input)


def bn_act_apply(input, scale, shift, residual, act, alpha):
    return torch.empty_like(input, memory_format=memory_format(input))


def act_backward(grad_out, input, scale, shift, residual, act, alpha):
    return torch.empty_like(grad_out, memory_format=memory_format(input))


def bn_act_backward_reduce(grad_out, input, mean, output):
    return per_channel_empty(input), per_channel_empty(input)


def bn_act_backward_elemt(grad_out, output, input, mean, dy_scale, x_scale, shift, need_grad_residual):
    fmt = memory_format(input if input is not None else grad_out)
    grad_input = torch.empty_like(grad_out, memory_format=fmt)
    grad_residual = torch.empty_like(grad_out, memory_format=fmt) if need_grad_residual else grad_out.new_empty(0)
    return grad_input, grad_residual


def bn_scale_shift(mean, var, weight, bias, eps):
    return tuple(mean.new_empty(mean.shape, dtype=torch.float32) for _ in range(2))


def bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps, count, training):
    return tuple(sum_dy.new_empty(sum_dy.shape, dtype=torch.float32) for _ in range(4))


# the kernel ops by name: what every backend implements (C++ CPU / CUDA, Triton, reference)
FAKES = {f.__name__: f for f in (add_relu_forward, bn_stats, bn_act_apply, act_backward, bn_act_backward_reduce,
                                 bn_act_backward_elemt, bn_scale_shift, bn_backward_coeffs)}


# the stages' own ops: autograd ops, their backward and the running-statistics update (csrc/bn_act_stage.cpp; bn_act_stage
# and conv_bn_act_stage are composites of these and aten)
def bn_act_batch(input, weight, bias, residual, eps, act, alpha, batch_mean=None, batch_var=None, running_mean=None,
                 running_var=None, momentum=None, momentum_tensor=None, num_batches_tracked=None):  # (the update in place)
    return torch.empty_like(input, memory_format=memory_format(input)), per_channel_empty(input), per_channel_empty(input)


def bn_act_running(input, running_mean, running_var, weight, bias, residual, eps, act, alpha):
    return torch.empty_like(input, memory_format=memory_format(input))


def bn_act_backward(grad_out, input, mean, var, weight, output, eps, training, need_grad_input, need_grad_params,
                    need_grad_residual):
    fmt = memory_format(input)
    grad_input = torch.empty_like(grad_out, memory_format=fmt) if need_grad_input else grad_out.new_empty(0)
    params = training or need_grad_params
    grad_weight, grad_bias = (per_channel_empty(input) if params else grad_out.new_empty(0) for _ in range(2))
    grad_residual = torch.empty_like(grad_out, memory_format=fmt) if need_grad_residual else grad_out.new_empty(0)
    return grad_input, grad_weight, grad_bias, grad_residual


def bn_update_running(running_mean, running_var, mean, var, count, momentum, momentum_tensor, num_batches_tracked):
    return None  # in place


def conv_genstats(input, weight, stride, padding, dilation, input_mean=None, input_var=None, input_weight=None,
                  input_bias=None, input_eps=1e-5):
    # aten's convolution layout rule on the conv's input: the input BN + ReLU writes it as bn_act_apply does (input's
    # layout, a non-dense input made dense); the cuDNN graph runs where input and weight are channels_last, and writes y
    # channels_last, as aten's conv does there
    if input_mean is not None:
        input = torch.empty_like(input, memory_format=memory_format(input))
    y = torch.nn.functional.conv2d(input, weight, None, stride, padding, dilation)
    return y, per_channel_empty(y), per_channel_empty(y)


STAGE_FAKES = {f.__name__: f for f in (bn_act_batch, bn_act_running, bn_act_backward, bn_update_running, conv_genstats)}


def register() -> None:
    """Register the fakes of the C++ ops (called once, after resnet_fused._C loaded)."""
    for name, fake in {**FAKES, **STAGE_FAKES}.items():
        torch.library.register_fake(f"resnet_fused::{name}")(fake)
