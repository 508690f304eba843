"""conv_bn_act (and conv_act) on every backend against eager conv -> batch_norm -> add -> relu and a
float64 reference: ResNet's kernel sizes, strides and paddings plus odd ones, training and eval,
forward, backward and running statistics; bad input."""

import pytest
import torch
import torch.nn.functional as F

from helpers import FORMATS, activation, assert_sum_cancels, assert_within_eager_error, backend_params, bn_act_backward_resolution, device_of, interpreted_triton, needs_extension
from resnet_fused import functional, reference
from resnet_fused.ops import onednn

# fp32 results are compared with eager fp32 (cuDNN) under the eager-error rule: both in IEEE fp32, TF32
# off (conftest.no_tf32); the Triton conv's TF32 path has its own bound in test_gpu_tf32.py
pytestmark = pytest.mark.usefixtures("no_tf32")

# (N, Cin, H, Cout, kernel, stride, padding, dilation)
GEOMETRIES = [
    (2, 8, 9, 16, 3, 1, 1, 1),   # BasicBlock 3x3
    (2, 16, 9, 8, 3, 2, 1, 1),   # stride-2 3x3
    (2, 8, 7, 12, 1, 1, 0, 1),   # bottleneck 1x1, H=W=7
    (2, 8, 8, 16, 1, 2, 0, 1),   # projection shortcut 1x1 stride 2
    (1, 3, 15, 8, 7, 2, 3, 1),   # stem 7x7 stride 2 pad 3, C=3, N=1
    (2, 5, 9, 6, 3, 1, 2, 2),    # dilation 2
]


@pytest.fixture(autouse=True)
def onednn_at_every_size(monkeypatch):
    """The CPU inference path under test is oneDNN's fused convolution, which production uses only
    above a size (its fixed cost per call); these tests' shapes are small."""
    monkeypatch.setattr(onednn, "MIN_OUTPUT", 0)


def eager(x, w, cb, rm, rv, bw, bb, stride, padding, dilation, training, residual, relu):
    return reference.conv_bn_act(x, w, cb, rm, rv, bw, bb, stride, padding, dilation, 1, training, 0.1, 1e-5, residual, relu)


def run(fn, tensors, geometry, training, relu, cast=None, grad=None, **kw):
    x, w, cb, bw, bb, rm, rv, r = (None if t is None else t.detach().clone().to(cast or t.dtype) for t in tensors)
    leaves = [t.requires_grad_() if t is not None and t.is_floating_point() else t for t in (x, w, cb, bw, bb, r)]
    x, w, cb, bw, bb, r = leaves
    stride, padding, dilation = geometry
    out = fn(x, w, cb, rm, rv, bw, bb, stride, padding, dilation, training, r, relu, **kw)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if t is not None] + [rm, rv]


def _bn_terms(tensors, geometry, relu, grad, training):
    """float64 (x_hat, invstd, g) of the BN: its normalized input (batch statistics in training, running ones
    in eval) and the gradient g reaching it through the ReLU mask."""
    x, w, cb, bw, bb, rm, rv, r = (None if t is None else t.detach().double() for t in tensors)
    stride, padding, dilation = geometry
    y = F.conv2d(x, w, cb, stride, padding, dilation)
    if training:
        mean, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
    else:
        mean, var = rm.view(1, -1, 1, 1), rv.view(1, -1, 1, 1)
    invstd = (var + 1e-5).rsqrt()
    x_hat = (y - mean) * invstd
    out = x_hat * bw.view(1, -1, 1, 1) + bb.view(1, -1, 1, 1) + (r if r is not None else 0)
    g = grad.double() * (out > 0) if relu else grad.double()
    return x_hat, invstd, g, bw


def bias_grad_terms(tensors, geometry, relu, grad):
    """sum over (N, H, W) of |term| for the conv bias gradient in training, per channel, in float64.

    That gradient is sum_i dy_i, dy = bn_weight * invstd * (g - mean(g) - x_hat * mean(g * x_hat)) (g the
    gradient reaching BN, through the ReLU mask), which sums to exactly 0. Computed, each dy_i carries the
    rounding of its terms: of |bn_weight * invstd| * (|g_i| + |mean(g)| + |x_hat_i * mean(g * x_hat)|)."""
    x_hat, invstd, g, bw = _bn_terms(tensors, geometry, relu, grad, training=True)
    mean_g, mean_gx = g.mean((0, 2, 3), keepdim=True), (g * x_hat).mean((0, 2, 3), keepdim=True)
    terms = (bw.view(1, -1, 1, 1) * invstd).abs() * (g.abs() + mean_g.abs() + (x_hat * mean_gx).abs())
    return terms.sum((0, 2, 3))


def bn_grad_resolution(tensors, geometry, relu, grad, training):
    """{name: resolution} of the BN weight and bias gradients, per-channel sums over (N, H, W) of g * x_hat
    and of g, whose terms cancel (helpers.bn_act_backward_resolution: 2 fp32 ulps x sum |term|; eager's own
    error there depends on how the machine's kernels and thread count order those sums: 1 thread vs 2 moved it 2x)."""
    x, w, cb, bw, bb, rm, rv, r = (None if t is None else t.detach().double() for t in tensors)
    y = F.conv2d(x, w, cb, *geometry)
    res = bn_act_backward_resolution(y, r, bw, bb, rm, rv, grad, relu, training)
    return {"grad bn weight": res["weight"], "grad bn bias": res["bias"]}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_conv_bn_act_matches_eager(backend, training, fmt):
    """fp32: every case within the eager-error rule (max norm). fp16 / bf16: errors summed in the 2-norm
    over all cases: there a ReLU mask flip at one near-zero pre-activation (eager and fused each have
    theirs) decides any single small case's ratio, while the sum measures the arithmetic."""
    device = device_of(backend)
    low_precision = {}  # (dtype, slot) -> [sum |fused - exact|^2, sum |eager - exact|^2]
    dtypes = [torch.float32, torch.float16] if backend == "triton" and interpreted_triton() else [torch.float32, torch.bfloat16]
    for N, Cin, H, Cout, k, s, p, d in GEOMETRIES:
        for dtype in dtypes:
            for with_residual, relu, with_bias in ((True, True, False), (False, True, True), (False, False, False)):
                x = activation((N, Cin, H, H), dtype, fmt, device)
                w = (torch.randn(Cout, Cin, k, k, device=device) / (Cin * k * k) ** 0.5).to(dtype)
                cb = torch.randn(Cout, device=device).to(dtype) if with_bias else None
                Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
                r = activation((N, Cout, Ho, Ho), dtype, fmt, device) if with_residual else None
                vecs = [torch.randn(Cout, device=device), torch.randn(Cout, device=device),
                        torch.randn(Cout, device=device) * 0.3, torch.rand(Cout, device=device) + 0.5]
                tensors = (x, w, cb, *vecs, r)
                grad = activation((N, Cout, Ho, Ho), dtype, fmt, device)
                what = f"{backend} {dtype} k{k} s{s} p{p} d{d} res={with_residual} relu={relu} bias={with_bias}"

                def fused(*a):
                    return functional.conv_bn_act(*a[:7], a[7], a[8], a[9], 1, a[10], 0.1, 1e-5, a[11], a[12], backend=backend)

                results = [run(f, tensors, (s, p, d), training, relu, cast=c, grad=grad)
                           for f, c in ((fused, None), (eager, None), (eager, torch.float64))]
                names = ["output"] + [f"grad {n}" for n, t in zip(("input", "weight", "conv bias", "bn weight", "bn bias",
                                                                   "residual"), (x, w, cb, 1, 1, r)) if t is not None]
                names += ["running_mean", "running_var", "inference output"]
                with torch.no_grad():  # the inference path: folded BN (CPU: oneDNN post-ops; Triton: the epilogue)
                    for res, f, c in zip(results, (fused, eager, eager), (None, None, torch.float64)):
                        x_, w_, cb_, bw_, bb_, rm_, rv_, r_ = (None if t is None else t.clone().to(c or t.dtype) for t in tensors)
                        res.append(f(x_, w_, cb_, rm_, rv_, bw_, bb_, s, p, d, training, r_, relu))
                resolution = bn_grad_resolution(tensors, (s, p, d), relu, grad, training) if dtype == torch.float32 else {}
                for name, a, e, x64 in zip(names, *results):
                    if training and name == "grad conv bias":  # exactly zero before a BN in training
                        terms = bias_grad_terms(tensors, (s, p, d), relu, grad)
                        assert_sum_cancels(a, terms, f"{what} {name}")
                        assert_sum_cancels(e, terms, f"{what} {name} (eager: the bound is a rounding bound)")
                    elif dtype == torch.float32:
                        # inference folds BN into the weights (w * s rounded once): its rounding differs from
                        # conv-then-BN by construction; measured up to ~2.6x eager's max error, so 3x there
                        assert_within_eager_error(a, e, x64, f"{what} {name}", factor=3.0 if name == "inference output" else 2.0,
                                                  resolution=resolution.get(name))
                    else:
                        acc = low_precision.setdefault((dtype, name), [0.0, 0.0])
                        acc[0] += (a.double() - x64).square().sum().item()
                        acc[1] += (e.double() - x64).square().sum().item()
    for (dtype, name), (fused_sq, eager_sq) in low_precision.items():
        assert fused_sq ** 0.5 <= 2 * eager_sq ** 0.5 + 1e-6, f"{backend} {dtype} {name}: {fused_sq ** 0.5:.3g} vs eager {eager_sq ** 0.5:.3g}"


def test_conv_bn_act_rejects_bad_input():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"`conv_weight` \(8, 3, 3, 3\) with groups=1 expects 3 input channels, `input` \(2, 4, 5, 5\) has 4"):
        functional.conv_bn_act(x, torch.randn(8, 3, 3, 3), None, torch.zeros(8), torch.ones(8))
    with pytest.raises(ValueError, match=r"`running_mean` of shape \(8,\), one per channel of conv_weight"):
        functional.conv_bn_act(x, torch.randn(8, 4, 3, 3), None, torch.zeros(4), torch.ones(8))
    with pytest.raises(ValueError, match=r"`residual` must match"):
        functional.conv_bn_act(x, torch.randn(8, 4, 3, 3), None, torch.zeros(8), torch.ones(8), padding=1,
                               residual=torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match=r"`conv_weight` is torch.float16"):
        functional.conv_bn_act(x, torch.randn(8, 4, 3, 3).half(), None, torch.zeros(8), torch.ones(8))


def reference_conv_act(x, w, b, stride, padding, dilation, residual, relu):
    """relu(conv2d(x, w, b) + residual) in float64."""
    y = F.conv2d(x.double(), w.double(), b.double(), stride, padding, dilation)
    y = y + residual.double() if residual is not None else y
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_act_prepacked_weight_equals_plain(geometry):
    """CPU inference with the weight reordered once for oneDNN gives the plain weight's result."""
    if not functional.onednn_inference(torch.randn(1, 1, 1, 1), torch.randn(1, 1, 1, 1), backend="auto"):
        pytest.skip("needs the cpu backend and oneDNN")
    N, Cin, H, Cout, k, s, p, d = geometry
    x = activation((N, Cin, H, H), torch.float32, torch.channels_last)
    w, b = torch.randn(Cout, Cin, k, k) / (Cin * k * k) ** 0.5, torch.randn(Cout)
    Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
    r = activation((N, Cout, Ho, Ho), torch.float32, torch.channels_last)
    packed = functional.prepack_conv_weight(w, s, p, d, 1, x.shape)
    for residual, relu in ((r, True), (None, True), (None, False)):
        with torch.no_grad():
            got = functional.conv_act(x, packed, b, s, p, d, 1, residual, relu)
            plain = functional.conv_act(x, w, b, s, p, d, 1, residual, relu)
            eager = F.conv2d(x, w, b, s, p, d)
            eager = eager + residual if residual is not None else eager
            eager = torch.relu(eager) if relu else eager
            exact = reference_conv_act(x, w, b, s, p, d, residual, relu)
        for name, a in (("prepacked", got), ("plain", plain)):
            assert_within_eager_error(a, eager, exact, f"{name} {geometry} residual={residual is not None} relu={relu}")
    with pytest.raises(ValueError, match=r"prepacked \(oneDNN\) weight runs only on the cpu backend, in a dtype oneDNN runs "
                                         r"here .*without gradients; got torch.float32 input on cpu, torch.float32 bias, "
                                         r"requiring grad: \['residual'\]"):
        functional.conv_act(x, packed, b, s, p, d, 1, r.clone().requires_grad_())
    with pytest.raises(ValueError, match=r"requiring grad: \['input'\]"):
        functional.conv_act(x.requires_grad_(), packed, b, s, p, d)


@needs_extension
def test_onednn_never_drops_gradients(monkeypatch):
    """oneDNN's fused call is not differentiable: any argument needing a gradient takes the aten path."""
    x, w = activation((2, 4, 6, 6), torch.float32, torch.channels_last), torch.randn(4, 4, 3, 3) / 6
    b, r = torch.randn(4), activation((2, 4, 6, 6), torch.float32, torch.channels_last)
    assert functional.onednn_inference(x, w, b, r) == torch.backends.mkldnn.is_available()
    for grad_of in ("bias", "residual"):
        bb, rr = b.clone().requires_grad_(grad_of == "bias"), r.clone().requires_grad_(grad_of == "residual")
        assert not functional.onednn_inference(x, w, bb, rr)
        out = functional.conv_act(x, w, bb, 1, 1, 1, 1, rr)
        out.sum().backward()
        assert (bb.grad if grad_of == "bias" else rr.grad) is not None, grad_of


@needs_extension
def test_prepacked_weight_runs_below_the_size_threshold(monkeypatch):
    """A weight someone prepacked is used at any size (the threshold decides only whether to prepack)."""
    monkeypatch.setattr(onednn, "MIN_OUTPUT", 1 << 13)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("needs oneDNN")
    x, w, b = activation((1, 8, 4, 4), torch.float32, torch.channels_last), torch.randn(8, 8, 3, 3) / 8, torch.randn(8)
    with torch.no_grad():
        got = functional.conv_act(x, functional.prepack_conv_weight(w, 1, 1, 1, 1, x.shape), b, 1, 1)
        assert_within_eager_error(got, torch.relu(F.conv2d(x, w, b, 1, 1)), reference_conv_act(x, w, b, 1, 1, 1, None, True),
                                  "prepacked below the threshold")


@needs_extension
def test_small_convs_skip_onednn(monkeypatch):
    """Below onednn.MIN_OUTPUT outputs the aten conv + fused add-ReLU runs (oneDNN's fused call has a
    fixed cost that dominates there); same values either way."""
    x, w, b = activation((1, 8, 4, 4), torch.float32, torch.channels_last), torch.randn(8, 8, 3, 3) / 8, torch.randn(8)
    r = activation((1, 8, 4, 4), torch.float32, torch.channels_last)
    with torch.no_grad():
        monkeypatch.setattr(onednn, "MIN_OUTPUT", 1 << 13)
        assert not functional.onednn_inference(x, w, b, r)
        small = functional.conv_act(x, w, b, 1, 1, 1, 1, r)
        monkeypatch.setattr(onednn, "MIN_OUTPUT", 0)
        assert functional.onednn_inference(x, w, b, r) == torch.backends.mkldnn.is_available()
        fused_onednn = functional.conv_act(x, w, b, 1, 1, 1, 1, r)
        exact = reference_conv_act(x, w, b, 1, 1, 1, r, True)
        assert_within_eager_error(small, torch.relu(F.conv2d(x, w, b, 1, 1) + r), exact, "aten conv + add_relu")
        assert_within_eager_error(fused_onednn, torch.relu(F.conv2d(x, w, b, 1, 1) + r), exact, "oneDNN")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_extension)])
def test_conv_act_bias_epilogue_keeps_float64(backend):
    """The bias (+ residual) + activation pass after a bias-free conv keeps an fp64 call in fp64: its coefficients
    are not rounded to fp32 (a large bias makes an fp32 rounding show at 1e-5)."""
    fmt = torch.contiguous_format
    x, w = activation((2, 8, 9, 9), torch.float64, fmt), torch.randn(8, 8, 3, 3, dtype=torch.float64)
    b, r = 1e3 * torch.randn(8, dtype=torch.float64), activation((2, 8, 9, 9), torch.float64, fmt)
    for residual in (None, r):
        with torch.no_grad():
            out = functional.conv_act(x, w, b, 1, 1, 1, 1, residual, "relu", backend=backend)
        y = F.conv2d(x, w, b, 1, 1)
        exact = torch.relu(y if residual is None else y + residual)
        torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-9)
