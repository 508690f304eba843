"""Property-based tests: random shapes, dtypes, layouts and flags on the CPU and Triton paths."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from helpers import CL, NCHW, assert_within_eager_error, backend_params, device_of, interpreted_triton
from resnet_fused import functional, reference

shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 7), st.integers(1, 7)).filter(
    lambda s: s[0] * s[2] * s[3] > 1  # training needs more than one value per channel
)


def _leaves(shape, dtype, fmt, device, seed):
    g = torch.Generator().manual_seed(seed)

    def act(scale=1.0, offset=0.0):
        return (torch.randn(shape, generator=g) * scale + offset).to(device, dtype).contiguous(memory_format=fmt)

    C = shape[1]
    return dict(
        x=act(2.0, 0.5), residual=act(), grad=act(),
        weight=torch.randn(C, generator=g).to(device), bias=torch.randn(C, generator=g).to(device),
        running_mean=torch.randn(C, generator=g).to(device), running_var=(torch.rand(C, generator=g) + 0.5).to(device),
    )


def _forward_backward(fn, t, training, with_residual, relu, cast=None, **kw):
    def leaf(v):
        return v.detach().clone().to(cast or v.dtype).requires_grad_()

    x, w, b = leaf(t["x"]), leaf(t["weight"]), leaf(t["bias"])
    r = leaf(t["residual"]) if with_residual else None
    rm, rv = (t[k].clone().to(cast or t[k].dtype) for k in ("running_mean", "running_var"))
    out = fn(x, rm, rv, w, b, training, 0.1, 1e-5, r, relu, **kw)
    out.backward(t["grad"].to(cast or t["grad"].dtype))
    grads = [x.grad, w.grad, b.grad] + ([r.grad] if r is not None else [])
    return [out.detach(), *grads, rm, rv]


def _backends():
    """Every backend, cuda skipped visibly (tests/gpu/test_cuda.py covers it), the others where they run."""
    params = backend_params(include_triton=True)
    return [pytest.param(*p.values, marks=[*p.marks, pytest.mark.skip(reason="cuda: covered by tests/gpu/test_cuda.py")])
            if p.values[0] == "cuda" else p for p in params]


@pytest.mark.parametrize("backend", _backends())
@settings(deadline=None, max_examples=40, derandomize=True)
@given(
    shape=shapes,
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    fmt=st.sampled_from([NCHW, CL]),
    training=st.booleans(),
    with_residual=st.booleans(),
    relu=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bn_act_property(backend, shape, dtype, fmt, training, with_residual, relu, seed):
    # numpy (the interpreter) has no bfloat16: hypothesis draws another example instead of passing this one
    assume(not (backend == "triton" and interpreted_triton() and dtype == torch.bfloat16))
    t = _leaves(shape, dtype, fmt, device_of(backend), seed)
    fused = _forward_backward(functional.bn_act, t, training, with_residual, relu, backend=backend)
    eager = _forward_backward(reference.bn_act, t, training, with_residual, relu)
    exact = _forward_backward(reference.bn_act, t, training, with_residual, relu, cast=torch.float64)
    assert fused[0].is_contiguous(memory_format=fmt)
    # [2], [3]: grad weight and grad bias, per-channel sums of N*H*W terms (g * x_hat, g) that cancel: their
    # resolution is a couple of fp32 ulps of sum |term|; eager's own error there is a few rounding errors
    g, x = t["grad"].double(), t["x"].double()
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = t["running_mean"].double(), t["running_var"].double()
    x_hat = (x - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + 1e-5).sqrt()
    eps32 = torch.finfo(torch.float32).eps
    resolution = {2: 2 * eps32 * (g * x_hat).abs().sum((0, 2, 3)), 3: 2 * eps32 * g.abs().sum((0, 2, 3))}
    for i, (f, e, x) in enumerate(zip(fused, eager, exact)):
        assert_within_eager_error(f, e, x, f"{backend} {shape} {dtype} {fmt} train={training} res={with_residual} relu={relu} [{i}]",
                                  resolution=resolution.get(i))
