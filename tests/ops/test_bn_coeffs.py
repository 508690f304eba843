"""The per-channel coefficient ops bn_scale_shift and bn_backward_coeffs on every backend, against the
float64 math of resnet_fused.reference and the fp32 math eager's batch norm does (fused error <= ~2x
eager's), including mixed input dtypes, absent weight / bias, empty and multi-block C, huge counts."""

import pytest
import torch

from helpers import assert_within_eager_error, backend_params, device_of
from resnet_fused import reference
from resnet_fused.ops.kernels import kernels

# C: one channel, odd, past one Triton block (128) and one CUDA block (256); 0: empty
CHANNELS = [1, 5, 300, 0]
# (mean/sum dtype, var dtype, weight/bias dtype): fp32 statistics, fp64 sums (the torch backend's), fp16/bf16 params
DTYPES = [
    (torch.float32, torch.float32, torch.float32),
    (torch.float64, torch.float32, torch.float16),
    (torch.float32, torch.float64, torch.bfloat16),
]
DTYPE_IDS = ["fp32", "fp64-fp32-fp16", "fp32-fp64-bf16"]


def _vec(C, dtype, device, gen, positive=False, scale=1.0):
    v = torch.randn(C, generator=gen, dtype=torch.float64) * scale
    return (v.abs() + 1e-3 if positive else v).to(device=device, dtype=dtype)


def _coeff_ops(backend):
    # the kernel ops of a backend; for "torch", the specification they all implement (fp32 out): the
    # torch backend's own bn_scale_shift / bn_backward_coeffs keep fp64 for fp64 statistics (its fp64 path)
    return reference if backend == "torch" else kernels(backend)


def _check(actual, exact, eager, what):
    """fp32, C elements, within 2x the fp32 eager math's error vs the fp64 values (plus an ulp)."""
    assert actual.dtype == torch.float32 and actual.shape == exact.shape, (what, actual.dtype, actual.shape)
    assert_within_eager_error(actual.cpu(), eager.cpu(), exact.cpu(), what)


@pytest.mark.parametrize("backend", backend_params(include_triton=True))
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_bn_scale_shift(backend, C, dtypes, affine, eps):
    gen = torch.Generator().manual_seed(C)
    device = device_of(backend)
    st, vt, pt = dtypes
    mean = _vec(C, st, device, gen, scale=3.0)
    var = _vec(C, vt, device, gen, positive=True)
    weight, bias = (_vec(C, pt, device, gen), _vec(C, pt, device, gen)) if affine else (None, None)
    scale, shift = _coeff_ops(backend).bn_scale_shift(mean, var, weight, bias, eps)
    exact = reference.scale_shift_fp64(mean, var, weight, bias, eps)
    # eager: batch_norm's fp32 math on fp32 copies of the inputs
    invstd = torch.rsqrt(var.float() + eps)
    e_scale = invstd * weight.float() if affine else invstd
    e_shift = bias.float() - mean.float() * e_scale if affine else -mean.float() * e_scale
    _check(scale, exact[0], e_scale, f"{backend} scale")
    _check(shift, exact[1], e_shift, f"{backend} shift")
    assert scale.device.type == device and shift.device.type == device


@pytest.mark.parametrize("backend", backend_params(include_triton=True))
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("count", [7.0, 2.0**31 + 9.0])  # the second: not an fp32 value
def test_bn_backward_coeffs(backend, C, dtypes, affine, training, count):
    gen = torch.Generator().manual_seed(C + 1)
    device = device_of(backend)
    st, vt, pt = dtypes
    sum_dy = _vec(C, st, device, gen, scale=count**0.5)
    sum_dy_xmu = _vec(C, st, device, gen, scale=count**0.5)
    var = _vec(C, vt, device, gen, positive=True)
    weight = _vec(C, pt, device, gen) if affine else None
    eps = 1e-5
    out = _coeff_ops(backend).bn_backward_coeffs(sum_dy, sum_dy_xmu, var, weight, eps, count, training)
    exact = reference.backward_coeffs_fp64(sum_dy, sum_dy_xmu, var, weight, eps, count, training)
    invstd = torch.rsqrt(var.float() + eps)
    a = invstd * weight.float() if affine else invstd
    if training:
        b = -a * invstd.square() * sum_dy_xmu.float() / count
        c = -a * sum_dy.float() / count
    else:
        b = c = torch.zeros_like(a)
    eager = (a, b, c, sum_dy_xmu.float() * invstd)
    assert len(out) == 4
    for name, o, x, e in zip(("a", "b", "c", "grad_weight"), out, exact, eager):
        _check(o, x, e, f"{backend} {name}")
        assert o.device.type == device
    if not training:
        assert not out[1].any() and not out[2].any()


@pytest.mark.parametrize("backend", backend_params(include_triton=True))
def test_strided_inputs(backend):
    """Non-contiguous (C,) views read right (the kernels take dense vectors: the launchers copy)."""
    device = device_of(backend)
    gen = torch.Generator().manual_seed(3)
    m, v, w, b = (_vec(10, torch.float32, device, gen, positive=i == 1)[::2] for i in range(4))
    k = _coeff_ops(backend)
    for got, want in zip(k.bn_scale_shift(m, v, w, b, 1e-5), reference.bn_scale_shift(m, v, w, b, 1e-5)):
        torch.testing.assert_close(got, want, rtol=3e-7, atol=1e-12)
    for got, want in zip(k.bn_backward_coeffs(m, w, v, b, 1e-5, 3.0, True),
                         reference.bn_backward_coeffs(m, w, v, b, 1e-5, 3.0, True)):
        torch.testing.assert_close(got, want, rtol=3e-7, atol=1e-12)
