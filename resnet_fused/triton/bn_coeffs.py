"""The per-channel coefficient ops in Triton: (C,) vectors in, fp32 (C,) vectors out, math in fp64
(IEEE sqrt and division), as the C++ kernels and resnet_fused.reference compute them:

    bn_scale_shift:      scale = w / sqrt(var + eps), shift = b - mean * scale
    bn_backward_coeffs:  a = w invstd; training: b = -a invstd^2 sum_dy_xmu / count, c = -a sum_dy / count
                         (eval: b = c = 0); grad_w = sum_dy_xmu invstd
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .._layout import dense as _dense
from ._launch import vector_launcher

_COEFF_BLOCK = 128  # channels per program


@triton.jit
def _f64(hi, lo):
    # a host fp64 scalar passed as two fp32 arguments (Triton types Python floats as fp32), rejoined
    return tl.cast(hi, tl.float64) + tl.cast(lo, tl.float64)


@triton.jit
def _invstd_and_scale(var_ptr, w_ptr, c, m, eps):
    # per channel, in fp64 (IEEE sqrt and division): invstd = 1 / sqrt(var + eps), and w * invstd (w_ptr None: 1)
    invstd = 1.0 / tl.sqrt(tl.load(var_ptr + c, mask=m, other=1.0).to(tl.float64) + eps)
    scale = invstd
    if w_ptr is not None:
        scale = invstd * tl.load(w_ptr + c, mask=m, other=1.0).to(tl.float64)
    return invstd, scale


@triton.jit
def _bn_scale_shift_kernel(
    mean_ptr, var_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr,  # w_ptr / b_ptr: None = 1 / 0
    C, eps_hi, eps_lo,
    BLOCK: tl.constexpr,
):
    # per channel, in fp64 (IEEE sqrt and division): scale = w / sqrt(var + eps), shift = b - mean * scale; stored as fp32
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    _, scale = _invstd_and_scale(var_ptr, w_ptr, c, m, _f64(eps_hi, eps_lo))
    ms = tl.load(mean_ptr + c, mask=m, other=0.0).to(tl.float64) * scale
    shift = -ms
    if b_ptr is not None:
        shift = tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float64) - ms
    tl.store(scale_ptr + c, scale.to(tl.float32), mask=m)
    tl.store(shift_ptr + c, shift.to(tl.float32), mask=m)


@triton.jit
def _bn_backward_coeffs_kernel(
    sum_dy_ptr, sum_dy_xmu_ptr, var_ptr, w_ptr,  # w_ptr: None = 1
    a_ptr, b_ptr, c_ptr, grad_w_ptr,
    C, eps_hi, eps_lo, count_hi, count_lo,
    TRAINING: tl.constexpr, BLOCK: tl.constexpr,
):
    # per channel, in fp64: a = w invstd; training: b = -a invstd^2 sum_dy_xmu / count, c = -a sum_dy / count;
    # eval: b = c = 0; grad_w = sum_dy_xmu invstd; stored as fp32
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < C
    invstd, a = _invstd_and_scale(var_ptr, w_ptr, i, m, _f64(eps_hi, eps_lo))
    sxmu = tl.load(sum_dy_xmu_ptr + i, mask=m, other=0.0).to(tl.float64)
    tl.store(a_ptr + i, a.to(tl.float32), mask=m)
    if TRAINING:
        count = _f64(count_hi, count_lo)
        b = -a * (invstd * invstd) * sxmu / count  # fp64 division: IEEE round to nearest
        c = -a * tl.load(sum_dy_ptr + i, mask=m, other=0.0).to(tl.float64) / count
        tl.store(b_ptr + i, b.to(tl.float32), mask=m)
        tl.store(c_ptr + i, c.to(tl.float32), mask=m)
    else:
        zero = tl.zeros([BLOCK], dtype=tl.float32)
        tl.store(b_ptr + i, zero, mask=m)
        tl.store(c_ptr + i, zero, mask=m)
    tl.store(grad_w_ptr + i, (sxmu * invstd).to(tl.float32), mask=m)


def _split_f64(x: float) -> tuple[float, float]:
    """x as hi + lo, both fp32 values (their fp64 sum is x to 48 bits; exact for integers below 2^48)."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, struct.unpack("f", struct.pack("f", x - hi))[0]


@vector_launcher("resnet_fused::triton_bn_scale_shift")
def bn_scale_shift(
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """scale = weight / sqrt(var + eps), shift = bias - mean * scale per channel; fp64 math, fp32 (C,) outputs."""
    C = mean.numel()
    scale = torch.empty(C, dtype=torch.float32, device=mean.device)
    shift = torch.empty_like(scale)
    if C:
        _bn_scale_shift_kernel[(triton.cdiv(C, _COEFF_BLOCK),)](
            _dense(mean), _dense(var), _dense(weight), _dense(bias), scale, shift, C, *_split_f64(eps), BLOCK=_COEFF_BLOCK
        )
    return scale, shift


@vector_launcher("resnet_fused::triton_bn_backward_coeffs")
def bn_backward_coeffs(
    sum_dy: torch.Tensor,
    sum_dy_xmu: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float,
    count: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, c, grad_weight) of the batch-norm backward (see reference.bn_backward_coeffs); fp64 math, fp32 (C,) outputs."""
    C = sum_dy.numel()
    a, b, c, grad_weight = (torch.empty(C, dtype=torch.float32, device=sum_dy.device) for _ in range(4))
    if C:
        _bn_backward_coeffs_kernel[(triton.cdiv(C, _COEFF_BLOCK),)](
            _dense(sum_dy), _dense(sum_dy_xmu), _dense(var), _dense(weight), a, b, c, grad_weight,
            C, *_split_f64(eps), *_split_f64(count), TRAINING=training, BLOCK=_COEFF_BLOCK,
        )
    return a, b, c, grad_weight
