"""NaN and +-Inf go through the C++ kernel ops exactly as through eager PyTorch.

Forward: relu(NaN) = NaN, relu(+Inf) = +Inf, relu(-Inf) = 0 (torch.relu). Backward: aten's
threshold_backward rule, dy = 0 where output <= 0 and grad elsewhere, so a NaN output passes the
gradient and a masked-off NaN / Inf gradient becomes 0. Each op is compared with resnet_fused.reference
(whose ReLU mask is checked against eager threshold_backward here too) on inputs where every channel
holds NaN, +Inf and -Inf in vector lanes and in scalar tails.
"""

import pytest
import torch

from helpers import CL, DTYPES, NCHW, assert_matches_spec
from resnet_fused import backends, reference

OPS = torch.ops.resnet_fused
NAN, INF = float("nan"), float("inf")
# (2, 11, 3, 5): a CPU vector of channels (channels_last) or pixels (NCHW) plus a scalar tail;
# (2, 16, 4, 4): the CUDA kernels' 16-byte vectors in both layouts
SHAPES = [(2, 11, 3, 5), (2, 16, 4, 4)]
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built")),
    pytest.param("cuda", marks=pytest.mark.skipif(not (backends.extension_has_cuda() and torch.cuda.is_available()),
                                                  reason="needs a CUDA GPU and the extension built with CUDA")),
]


def _act(shape, dtype, fmt, device, specials=(), offset=0):
    """N(0, 1) values with `specials` written every 7th element (NCHW order) from `offset`, cycling."""
    x = torch.randn(shape)
    flat = x.view(-1)
    for k, value in enumerate(specials):
        flat[offset + 2 * k :: 7] = value
    return x.to(dtype).to(device).contiguous(memory_format=fmt)


def _channel(C, device, low=0.5, high=2.0, sign=True):
    v = torch.empty(C).uniform_(low, high)
    if sign:
        v = v * torch.where(torch.rand(C) < 0.5, -1.0, 1.0)
    return v.to(device)


def assert_same(actual, expected, what, ulps=4):
    """Same NaN, +Inf and -Inf positions; finite values within `ulps` ulps of the dtype at the largest
    expected magnitude (the kernels may fuse a multiply-add that the reference rounds twice)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    a, e = actual.double().cpu(), expected.double().cpu()
    for name, where in (("NaN", torch.isnan), ("+Inf", lambda t: t == INF), ("-Inf", lambda t: t == -INF)):
        bad = (where(a) != where(e)).nonzero()
        if bad.numel():
            first = tuple(bad[0])
            raise AssertionError(f"{what}: {name} differs at {bad[:5].tolist()}: got {a[first]}, expected {e[first]}")
    finite = torch.isfinite(e)
    tol = ulps * torch.finfo(actual.dtype).eps * max(1.0, e[finite].abs().max().item() if finite.any() else 0.0)
    torch.testing.assert_close(a[finite], e[finite], rtol=0, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_relu_forward(device, fmt, dtype, shape):
    x = _act(shape, dtype, fmt, device, (NAN, INF, -INF))
    r = _act(shape, dtype, fmt, device, (-INF, NAN, INF), offset=1)  # NaN + Inf, Inf - Inf, ... as well
    assert_same(OPS.add_relu_forward(x, r), reference.add_relu(x, r), "add_relu_forward")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_act_apply(device, fmt, dtype, shape, with_residual, relu):
    x = _act(shape, dtype, fmt, device, (NAN, INF, -INF))
    residual = _act(shape, dtype, fmt, device, (INF, NAN), offset=3) if with_residual else None
    scale, shift = _channel(shape[1], device), _channel(shape[1], device, -1.0, 1.0)
    act = "relu" if relu else "none"
    out = OPS.bn_act_apply(x, scale, shift, residual, act, 0.0)
    assert_same(out, reference.bn_act_apply(x, scale, shift, residual, act, 0.0), "bn_act_apply")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_stats_nan(device, fmt, dtype, shape):
    """A NaN anywhere in a channel makes its mean and variance NaN; the other channels are exact."""
    x = _act(shape, dtype, fmt, device)
    x[:, ::3, 1, 2] = NAN  # every third channel
    mean, var = OPS.bn_stats(x)
    ref_mean, ref_var = reference.bn_stats(x)
    assert_same(mean, ref_mean, "bn_stats mean", ulps=16)  # fp32 statistics of up to 40 values
    assert_same(var, ref_var, "bn_stats var", ulps=16)


def _backward_inputs(shape, dtype, fmt, device):
    """(grad, output): output holds NaN, +-Inf, zeros and negatives; grad is NaN or Inf only where the
    output masks it off (output <= 0), so the expected sums stay finite and test the mask exactly."""
    output = _act(shape, dtype, fmt, device, (NAN, INF, -INF, 0.0))
    grad = _act(shape, dtype, fmt, device)
    masked = (output <= 0) & (torch.rand(shape, device=device) < 0.5)
    grad = torch.where(masked, torch.tensor(NAN, dtype=dtype, device=device), grad)
    grad = torch.where((output == -INF), torch.tensor(INF, dtype=dtype, device=device), grad)
    return grad.contiguous(memory_format=fmt), output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_act_backward_reduce(device, fmt, dtype, shape):
    grad, output = _backward_inputs(shape, dtype, fmt, device)
    x = _act(shape, dtype, fmt, device)
    mean = _channel(shape[1], device, -0.5, 0.5)
    sums = OPS.bn_act_backward_reduce(grad, x, mean, output)
    expected = reference.bn_act_backward_reduce(grad, x, mean, output)
    # the sizes the sums round at: sum |dy| and sum |dy (x - mean)|, dy = grad where output > 0 (float64)
    dy = torch.where(output.double() <= 0, 0.0, grad.double()) if output is not None else grad.double()
    terms = (dy.abs().sum((0, 2, 3)), (dy * (x.double() - mean.double().view(1, -1, 1, 1))).abs().sum((0, 2, 3)))
    for got, want, size, name in zip(sums, expected, terms, ("sum_dy", "sum_dy_xmu")):
        assert got.isfinite().all(), f"{name}: a masked-off NaN / Inf gradient leaked into the sum"
        # fp32 sums in a different order than the fp64 reference: a few ulps of sum |term|
        assert_matches_spec(got.cpu(), want.cpu(), name, ulps=16, magnitude=size.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bn_act_backward_elemt(device, fmt, dtype, shape, training):
    grad, output = _backward_inputs(shape, dtype, fmt, device)
    C = shape[1]
    dy_scale = _channel(C, device)
    if training:
        x, mean = _act(shape, dtype, fmt, device), _channel(C, device, -0.5, 0.5)
        x_scale, shift = _channel(C, device), _channel(C, device, -1.0, 1.0)
    else:
        x = mean = x_scale = shift = None
    grad_input, grad_residual = OPS.bn_act_backward_elemt(grad, output, x, mean, dy_scale, x_scale, shift, True)
    ref_input, ref_residual = reference.bn_act_backward_elemt(grad, output, x, mean, dy_scale, x_scale, shift, True)
    # eager's ReLU gradient: threshold_backward(grad, output, 0) = output <= 0 ? 0 : grad
    eager_dy = torch.ops.aten.threshold_backward(grad, output, 0)
    assert_same(ref_residual, eager_dy, "reference's ReLU mask vs eager", ulps=0)
    assert_same(grad_residual, ref_residual, "grad_residual")
    assert_same(grad_input, ref_input, "grad_input")
