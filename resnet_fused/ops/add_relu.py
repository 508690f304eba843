"""add_relu: relu(input + residual) in one pass, differentiable in both arguments."""

from __future__ import annotations

import torch
from torch import Tensor

from resnet_fused import backends
from resnet_fused._layout import memory_format
from resnet_fused.ops._checks import check_activation, check_like
from resnet_fused.ops.kernels import kernels


@torch.library.custom_op("resnet_fused::add_relu", mutates_args=())
def _add_relu(input: Tensor, residual: Tensor, backend: str) -> Tensor:
    """relu(input + residual)"""
    return kernels(backend).add_relu_forward(input, residual)


@_add_relu.register_fake
def _add_relu_fake(input, residual, backend):
    return torch.empty_like(input, memory_format=memory_format(input))


def _add_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad_out):
    (out,) = ctx.saved_tensors
    # d relu(z)/dz = 0 where out <= 0, else 1 (a NaN output passes its gradient, as threshold_backward does)
    grad = torch.ops.aten.threshold_backward(grad_out, out, 0)
    return grad, grad, None


_add_relu.register_autograd(_add_relu_backward, setup_context=_add_relu_setup)


def add_relu(input: Tensor, residual: Tensor, *, backend: str | None = None) -> Tensor:
    """relu(input + residual) in one pass; differentiable in both arguments."""
    check_activation(input, "add_relu", "input")
    check_like(residual, input, "add_relu", "residual")
    return _add_relu(input, residual, backends.resolve(backend, input))
