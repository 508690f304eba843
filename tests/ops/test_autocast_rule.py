"""conv2d's autocast rule on the fused conv ops (resnet_fused/ops/_autocast.py): under torch.autocast their
convolutions run in the autocast dtype, as the eager conv they replace, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from helpers import CL, NCHW, activation, assert_within_eager_error, needs_extension

OPS = torch.ops.resnet_fused


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_extension), "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_conv2d_stats_under_autocast(backend, dtype, fmt):
    """resnet_fused::conv2d_stats called directly on fp32 operands under CPU autocast: y in the autocast dtype
    (statistics fp32), and its backward runs (without the rule the op ran below autocast on fp32 operands
    while its conv autocast inside, and oneDNN's backward rejected the mixed dtypes); y and the gradients
    within the eager-error rule, eager being F.conv2d under the same autocast."""
    x = activation((3, 6, 9, 7), torch.float32, fmt).requires_grad_()
    w = (torch.randn(10, 6, 3, 3) / 54 ** 0.5).contiguous(memory_format=fmt).requires_grad_()
    g = activation((3, 10, 5, 4), torch.float32, fmt)
    with torch.autocast("cpu", dtype=dtype):
        y, mean, var = OPS.conv2d_stats(x, w, [2, 2], [1, 1], [1, 1], 1, backend)
        eager = F.conv2d(x, w, None, 2, 1)
    assert y.dtype == eager.dtype == dtype and mean.dtype == var.dtype == torch.float32
    grads = torch.autograd.grad(y, (x, w), g.to(dtype))
    eager_grads = torch.autograd.grad(eager, (x, w), g.to(dtype))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    exact = F.conv2d(x64, w64, None, 2, 1)
    exact_grads = torch.autograd.grad(exact, (x64, w64), g.to(dtype).double())
    for what, f, e, x_ in zip(("y", "grad input", "grad weight"), (y, *grads), (eager, *eager_grads), (exact, *exact_grads)):
        assert f.dtype == e.dtype, what
        assert_within_eager_error(f, e, x_, f"{backend} {dtype}: {what}", norm="fro")
    assert_within_eager_error(mean, eager.float().mean((0, 2, 3)), eager.double().mean((0, 2, 3)), "batch mean")
