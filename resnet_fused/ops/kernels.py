"""The kernel ops of each concrete backend, by name: what bn_act, add_relu and the conv paths launch."""

from __future__ import annotations

import functools
import types

import torch

from torch import Tensor

from resnet_fused import reference
from resnet_fused._kernel_fakes import FAKES
from resnet_fused.activations import Activation

KERNELS = tuple(FAKES)  # add_relu_forward, bn_stats, bn_act_apply, bn_act_backward_{reduce,elemt}, bn_scale_shift, bn_backward_coeffs


@functools.cache
def kernels(backend: str) -> types.SimpleNamespace:
    """The kernel-level functions of a concrete backend ("cpu", "cuda", "triton", "torch"), by the names in KERNELS."""
    if backend in ("cpu", "cuda"):  # the C++ ops (csrc/ops.cpp), dispatched on the tensors' device
        return types.SimpleNamespace(**{k: getattr(torch.ops.resnet_fused, k) for k in KERNELS})
    if backend == "triton":
        from resnet_fused.ops import triton  # registers the resnet_fused::triton_* ops

        # and the implicit-GEMM conv with its BN prologue / epilogue
        return types.SimpleNamespace(fused_conv=triton.fused_conv, **{k: getattr(triton, k) for k in KERNELS})
    if backend == "torch":  # the specification itself, which also runs the fp64 path (gradcheck)
        spec = {k: getattr(reference, k) for k in KERNELS[1:]}
        return types.SimpleNamespace(**{**spec, "add_relu_forward": reference.add_relu, "bn_scale_shift": _scale_shift_fp64_kept,
                                        "bn_backward_coeffs": _backward_coeffs_fp64_kept})
    raise ValueError(f"resnet_fused: {backend!r} is not a concrete backend; resolve it first")


def bias_act(y: Tensor, bias: Tensor | None, residual: Tensor | None, act: Activation, backend: str) -> Tensor:
    """act(y + bias (+ residual)) in one bn_act_apply pass of the backend (scale 1): the epilogue of a convolution run
    without its bias. Coefficients in fp32, as the kernels take them; in fp64 for an fp64 y (the torch backend's
    fp64 path keeps its precision)."""
    dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    shift = bias.to(dtype) if bias is not None else _constant(0.0, y.shape[1], dtype, y.device)
    return kernels(backend).bn_act_apply(y, _constant(1.0, y.shape[1], dtype, y.device), shift, residual, act.name,
                                         act.alpha)


@functools.cache
def _constant(value: float, channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # a per-channel coefficient vector, made once and kept for good; nothing writes to it. One first made inside a
    # CUDA graph capture holds its values once that graph has replayed (its fill is captured, not run): a capture's
    # warm-up calls, as CUDA graphs want, make it first
    return torch.full((channels,), value, dtype=dtype, device=device)


def _scale_shift_fp64_kept(mean, var, weight, bias, eps):
    # as reference.bn_scale_shift, but fp64 statistics (the fp64 path) keep fp64 coefficients
    if mean.dtype == torch.float64:
        return reference.scale_shift_fp64(mean, var, weight, bias, eps)
    return reference.bn_scale_shift(mean, var, weight, bias, eps)


def _backward_coeffs_fp64_kept(sum_dy, sum_dy_xmu, var, weight, eps, count, training):
    # as reference.bn_backward_coeffs, but fp64 sums (the fp64 path) keep fp64 coefficients
    if sum_dy.dtype == torch.float64:
        return reference.backward_coeffs_fp64(sum_dy, sum_dy_xmu, var, weight, eps, count, training)
    return reference.bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps, count, training)


def triton_conv_applies(backend: str, groups: int) -> bool:
    """Whether the Triton implicit-GEMM convolution (conv + BN epilogue / prologue) runs this conv."""
    return backend == "triton" and groups == 1
