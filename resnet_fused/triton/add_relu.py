"""relu(input + residual) as one Triton pass over memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._layout import memory_format as _memory_format
from ._launch import launcher

_BLOCK = 2048  # elements per program


@triton.jit
def _add_relu_kernel(x_ptr, r_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    # x, r and out share one dense layout, so the op is elementwise on the flat buffers:
    # out[i] = relu(x[i] + r[i]), computed in fp32; relu as torch.relu (NaN stays NaN).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask).to(tl.float32)
    y = x + r
    y = tl.where(y < 0, 0.0, y)  # not tl.maximum(y, 0), which maps NaN to 0
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@launcher("resnet_fused::triton_add_relu_forward", like=("residual",))
def add_relu(input: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """relu(input + residual), in input's dtype and memory format."""
    fmt = _memory_format(input)
    x = input.contiguous(memory_format=fmt)
    r = residual.contiguous(memory_format=fmt)  # same flat order as x
    out = torch.empty_like(x, memory_format=fmt)
    if x.numel() > 0:
        _add_relu_kernel[(triton.cdiv(x.numel(), _BLOCK),)](x, r, out, x.numel(), BLOCK=_BLOCK)
    return out
