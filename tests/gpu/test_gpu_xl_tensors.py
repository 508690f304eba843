"""Inputs with more than 2^31 elements (fp16, (4, 64, 4097, 2048): 2^31 + 2^19 elements, 4.3 GB a tensor):
bn_act eval (with residual), bn_act training (forward, batch statistics, backward) and add_relu on both
GPU backends, in both memory formats where the layout matters. Every element offset past 2^31 - 1 must
be computed in 64 bits (DESIGN.md); an int32 offset would wrap and read or write the wrong place.

The results are checked in chunks of (1, C, 1024, W) (134M elements, about 1 GB in float64), so the test's
own memory stays bounded (the largest case holds four 4.3 GB tensors, about 17 GB, plus ~6 GB of chunk
temporaries; it needs a GPU with at least 40 GB). Sample n is offset by 4n, so data read from the wrong
sample moves the statistics and the values visibly; `poisoned` makes any output element left unwritten
NaN. Forward values: the eager-error rule (max norm) per chunk, eager being the same function in fp16
(F.batch_norm with the same statistics, then + residual, ReLU). Backward: float64 with the fused output's
ReLU mask (a flipped mask is a coin toss at |z| ~ 1e-7, not an indexing error), elementwise within
2^-10 |exact| + 1e-5: the kernels round one fp32 result to fp16 (2^-11 relative) and the fp32 per-channel
sums perturb it by < 1e-6 here.

("cuda", "cuda") and ("cuda", "triton") are skipped visibly without a GPU; the CPU variants run the same
chunked logic on a small shape (offsets there are small: they check the test, not 64-bit indexing).
"""

import gc
import traceback

import pytest
import torch
import torch.nn.functional as F

from helpers import CL, NCHW, assert_within_eager_error, device_backend_params
from resnet_fused import backends, functional

OPS = torch.ops.resnet_fused
XL = (4, 64, 4097, 2048)  # 2_148_007_936 elements = 2^31 + 2^19
SMALL = (4, 8, 21, 16)  # the CPU variants
EPS = 1e-5


def _gpu_memory_gb() -> float:
    return torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0.0


pytestmark = [
    pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built (op schemas)"),
    pytest.mark.skipif(torch.cuda.is_available() and _gpu_memory_gb() < 40,
                       reason=f"needs a GPU with >= 40 GB for 2^31-element fp16 tensors, this one has {_gpu_memory_gb():.0f}"),
]
PARAMS = device_backend_params(cpu_variants=("cpu", "triton"))


@pytest.fixture(autouse=True)
def release_memory():
    """Return the test's tensors to the device between tests (a later case must fit)."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _free_on_failure(fn, *args):
    """fn(*args); on failure re-raise as a message only, so that no traceback frame keeps 4 GB tensors alive."""
    try:
        fn(*args)
    except Exception as e:
        msg = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-4))
        traceback.clear_frames(e.__traceback__)
        del e
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise AssertionError(msg) from None


def _shape(device):
    return XL if device == "cuda" else SMALL


def _chunks(shape):
    """Index tuples of (1, C, rows, W) chunks covering the tensor (every element once)."""
    rows = 1024 if shape == XL else 8
    for n in range(shape[0]):
        for h0 in range(0, shape[2], rows):
            yield (slice(n, n + 1), slice(None), slice(h0, min(h0 + rows, shape[2])))


def _activation(shape, fmt, device):
    """N(4n, 1) in sample n, fp16, laid out in fmt, drawn on the device (no host copy of 4 GB)."""
    x = torch.empty(shape, dtype=torch.float16, device=device, memory_format=fmt).normal_()
    for n in range(shape[0]):
        x[n].add_(4.0 * n)
    return x


def _vec(t):
    return t.double().view(1, -1, 1, 1)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_add_relu_xl(device, backend, poisoned):
    def body():
        shape = _shape(device)
        x, r = _activation(shape, NCHW, device), _activation(shape, NCHW, device).neg_()
        assert x.numel() >= 2**31 or device == "cpu"
        out = functional.add_relu(x, r, backend=backend)
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
        for idx in _chunks(shape):
            xc, rc = x[idx], r[idx]
            exact = torch.relu(xc.double() + rc.double())
            assert_within_eager_error(out[idx], torch.relu(xc + rc), exact, f"add_relu {backend} chunk {idx}")

    _free_on_failure(body)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_bn_act_eval_xl(device, backend, fmt, poisoned):
    def body():
        shape = _shape(device)
        C = shape[1]
        x, r = _activation(shape, fmt, device), _activation(shape, fmt, device).neg_()
        rm = 6.0 + torch.randn(C, device=device) * 0.3  # near the data's mean (6) and variance (21)
        rv = 21.0 * (torch.rand(C, device=device) + 0.5)
        w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device) * 0.3
        out = functional.bn_act(x, rm, rv, w, b, False, 0.1, EPS, residual=r, act="relu", backend=backend)
        assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous(memory_format=fmt)
        scale = _vec(w) / torch.sqrt(_vec(rv) + EPS)
        for idx in _chunks(shape):
            xc, rc = x[idx], r[idx]
            exact = torch.relu((xc.double() - _vec(rm)) * scale + _vec(b) + rc.double())
            eager = torch.relu(F.batch_norm(xc, rm, rv, w, b, False, 0.0, EPS) + rc)
            assert_within_eager_error(out[idx], eager, exact, f"bn_act eval {backend} {fmt} chunk {idx}")

    _free_on_failure(body)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("device,backend", PARAMS)
def test_bn_act_train_xl(device, backend, fmt, poisoned):
    def body():
        shape = _shape(device)
        C = shape[1]
        count = shape[0] * shape[2] * shape[3]
        x = _activation(shape, fmt, device).requires_grad_()
        w = (torch.rand(C, device=device) + 0.5).requires_grad_()
        b = (torch.randn(C, device=device) * 0.3).requires_grad_()
        out, mean, var = OPS.bn_act_train(x, w, b, None, EPS, "relu", 0.0, backend)
        assert out.shape == x.shape and out.is_contiguous(memory_format=fmt)

        # batch statistics in float64, chunk by chunk (sum, sum of squares: |x| <= ~20, no cancellation issue)
        s1 = torch.zeros(C, dtype=torch.float64, device=device)
        s2 = torch.zeros_like(s1)
        for idx in _chunks(shape):
            xc = x.detach()[idx].double()
            s1 += xc.sum((0, 2, 3))
            s2 += xc.square().sum((0, 2, 3))
        mean64 = s1 / count
        var64 = s2 / count - mean64.square()
        std64 = var64.sqrt()
        assert ((mean.double() - mean64).abs() <= 1e-4 * std64).all(), \
            f"batch mean: worst error {((mean.double() - mean64).abs() / std64).max().item():.3g} std"
        assert ((var.double() - var64).abs() <= 1e-4 * var64).all(), \
            f"batch var: worst relative error {((var.double() - var64).abs() / var64).max().item():.3g}"

        invstd = 1 / torch.sqrt(var64 + EPS)
        a = w.detach().double() * invstd  # d out / d (x - mean) before the ReLU
        for idx in _chunks(shape):  # forward: eager = the same normalization in fp16 with the exact statistics
            xc = x.detach()[idx]
            exact = torch.relu((xc.double() - _vec(mean64)) * _vec(a) + _vec(b.detach()))
            eager = torch.relu(F.batch_norm(xc, mean64.float(), var64.float(), w.detach(), b.detach(), False, 0.0, EPS))
            assert_within_eager_error(out.detach()[idx], eager, exact, f"bn_act train {backend} {fmt} chunk {idx}")

        g = torch.empty(shape, dtype=torch.float16, device=device, memory_format=fmt).normal_()
        out.backward(g)  # `out` stays: its ReLU mask is the reference's
        sum_dy = torch.zeros(C, dtype=torch.float64, device=device)
        sum_dy_xmu, abs_dy, abs_dy_xmu = torch.zeros_like(sum_dy), torch.zeros_like(sum_dy), torch.zeros_like(sum_dy)
        for idx in _chunks(shape):
            dy = torch.where(out.detach()[idx] > 0, g[idx].double(), 0.0)
            xmu = x.detach()[idx].double() - _vec(mean64)
            sum_dy += dy.sum((0, 2, 3))
            sum_dy_xmu += (dy * xmu).sum((0, 2, 3))
            abs_dy += dy.abs().sum((0, 2, 3))
            abs_dy_xmu += (dy * xmu).abs().sum((0, 2, 3))
        grad_w, grad_b = sum_dy_xmu * invstd, sum_dy
        assert ((w.grad.double() - grad_w).abs() <= 1e-4 * abs_dy_xmu * invstd).all(), "grad weight"
        assert ((b.grad.double() - grad_b).abs() <= 1e-4 * abs_dy).all(), "grad bias"
        assert x.grad.is_contiguous(memory_format=fmt) and x.grad.dtype == x.dtype
        k_xmu = -a * invstd.square() * sum_dy_xmu / count
        k_0 = -a * sum_dy / count
        for idx in _chunks(shape):
            dy = torch.where(out.detach()[idx] > 0, g[idx].double(), 0.0)
            exact = dy * _vec(a) + (x.detach()[idx].double() - _vec(mean64)) * _vec(k_xmu) + _vec(k_0)
            err = (x.grad[idx].double() - exact).abs()
            tol = 2.0 ** -10 * exact.abs() + 1e-5
            bad = (err > tol).sum().item()
            assert bad == 0, (f"grad input {backend} {fmt} chunk {idx}: {bad} elements off, worst error "
                              f"{err.max().item():.3g}; NaN: {torch.isnan(x.grad[idx]).sum().item()}")

    _free_on_failure(body)
