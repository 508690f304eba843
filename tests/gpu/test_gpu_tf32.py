"""The Triton conv's TF32 path (fp32 inputs on a GPU with torch.backends.cudnn.allow_tf32, the default)
against float64, with a tolerance derived from TF32's precision; and its IEEE path (allow_tf32 off).

The bound. TF32 keeps 10 of fp32's 23 explicit mantissa bits; the MMA reads each fp32 operand with
relative error |d| < u = 2^-10 (truncated: d in (-u, 0], mean -u/2; rounded to nearest: |d| <= u/2),
multiplies exactly and accumulates in fp32. A product a*b is then off by a relative (d_a + d_b): mean -u,
RMS u * sqrt(7/6) when truncated (u / sqrt(6) when rounded). Summed over K = KH*KW*Cin products, the
error and the value grow alike: coherently (the mean part is exactly -u * y) and as a random walk where
the products' signs vary (the rest, next to y's own random walk), so the relative 2-norm error of the
conv output, ||y_tf32 - y|| / ||y||, is about u * sqrt(7/6) ~ 1.06e-3 whatever K; fp32 accumulation adds
only ~sqrt(K) * 2^-24. (A sqrt(K) factor belongs to bounds relative to sum |a*b|, not to ||y||.) The
tests allow TF32_REL = 2.5 u ~ 2.4e-3 (margin for a finite tensor; rounding MMAs land far below), per
tensor and per channel, and propagate it:
  statistics: |mean' - mean| <= TF32_REL * rms(y), |var' - var| <= 2 TF32_REL * std(y) * rms(y) per channel
  (Cauchy-Schwarz on mean(e) and 2 mean((y - mean) e)); eval epilogue act(y * s + t + r): ReLU is
  1-Lipschitz, so ||out' - out|| <= TF32_REL ||s y||; training bn: the error of (y - mean) / sigma plus
  that of the statistics, per channel <= 2 TF32_REL |w| ||y|| / sigma.
With allow_tf32 off the same conv is IEEE fp32: relative error below 1e-5 (TF32's would be ~1e-3), which
checks that the switch reaches the Triton conv (conftest.no_tf32, used by the fp32 comparisons).

("cuda", "triton") is skipped visibly without a GPU. ("cpu", "triton") runs the same logic under the
interpreter, which has no TF32 (fp32 dots in IEEE there): it checks the test, not TF32.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import CL, activation, device_backend_params, rel_err
from resnet_fused import backends, functional

pytestmark = [pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built (op schemas)"),
              pytest.mark.usefixtures("one_conv_config")]
OPS = torch.ops.resnet_fused
U = 2.0 ** -10
TF32_REL = 2.5 * U
IEEE_REL = 1e-5
TRITON = [p for p in device_backend_params(cpu_variants=("triton",)) if p.values[1] == "triton"]

# (N, Cin, H, Cout, kernel, stride, padding): the 7x7 stem on C=3 (K = 147, Triton's gathered-K path),
# a 3x3 (K = 576), a 1x1 expansion (K = 256), a stride-2 3x3 on odd sizes (K = 432)
GEOMETRIES = [(2, 3, 32, 16, 7, 2, 3), (2, 64, 16, 48, 3, 1, 1), (4, 256, 7, 72, 1, 1, 0), (3, 48, 15, 40, 3, 2, 1)]
IDS = ["stem7x7", "3x3", "1x1", "3x3s2"]


@pytest.fixture
def tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _per_channel(t):  # (N, C, H, W) -> (C, N*H*W), float64
    return t.double().transpose(0, 1).reshape(t.shape[1], -1)


def _case(geometry, device, prologue):
    N, Cin, H, Cout, k, s, p = geometry
    N = N if device == "cuda" else 1  # the interpreter is slow
    x = activation((N, Cin, H, H), torch.float32, CL, device, offset=0.3)
    w = torch.randn(Cout, Cin, k, k, device=device) / (Cin * k * k) ** 0.5
    bn_in = None
    if prologue:  # the deferred BN + ReLU of the previous layer, applied as the tiles load
        bn_in = (torch.randn(Cin, device=device) * 0.3, torch.rand(Cin, device=device) + 0.5,
                 torch.rand(Cin, device=device) + 0.5, torch.randn(Cin, device=device) * 0.3, 1e-5)
    return x, w, [s, s], [p, p], bn_in


def _exact_input(x, bn_in):
    """The conv's input in float64: x, or relu(batch_norm(x)) with the prologue's statistics."""
    if bn_in is None:
        return x.double()
    mean, var, weight, bias, eps = (t.double() if isinstance(t, torch.Tensor) else t for t in bn_in)
    scale = weight / torch.sqrt(var + eps)
    return torch.relu(x.double() * scale.view(1, -1, 1, 1) + (bias - mean * scale).view(1, -1, 1, 1))


@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("device,backend", TRITON)
def test_tf32_conv_and_statistics_within_bound(device, backend, geometry, prologue, tf32):
    """conv2d_stats (Triton: the statistics from the accumulator in the epilogue) with TF32 on, then off."""
    x, w, stride, padding, bn_in = _case(geometry, device, prologue)
    y64 = F.conv2d(_exact_input(x, bn_in), w.double(), None, stride, padding)
    yc = _per_channel(y64)
    rms, std = yc.square().mean(1).sqrt(), yc.std(1, unbiased=False)
    args = (x, w, stride, padding, [1, 1], 1, backend) + (tuple(bn_in) if bn_in else ())
    y, mean, var = OPS.conv2d_stats(*args)
    assert y.device.type == device and y.dtype == torch.float32 and not torch.isnan(y).any()
    err = rel_err(y, y64)
    assert err <= TF32_REL, f"TF32 conv: relative error {err:.3g} > {TF32_REL:.3g}"
    per_channel = (_per_channel(y) - yc).norm(dim=1) / yc.norm(dim=1)
    assert (per_channel <= TF32_REL).all(), f"TF32 conv, worst channel: {per_channel.max().item():.3g}"
    d_mean = (mean.double() - yc.mean(1)).abs()
    d_var = (var.double() - yc.var(1, unbiased=False)).abs()
    assert (d_mean <= TF32_REL * rms + 1e-6 * rms).all(), f"batch mean: {(d_mean / rms).max().item():.3g} x rms"
    assert (d_var <= 2 * TF32_REL * std * rms + 1e-6 * rms.square()).all(), \
        f"batch var: {(d_var / (std * rms)).max().item():.3g} x std * rms"

    torch.backends.cudnn.allow_tf32 = False  # the same call in IEEE fp32 (the fixture restores the setting)
    y_ieee = OPS.conv2d_stats(*args)[0]
    err_ieee = rel_err(y_ieee, y64)
    assert err_ieee <= IEEE_REL, f"allow_tf32=False: relative error {err_ieee:.3g} (TF32 would give ~{U:.1g})"


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
@pytest.mark.parametrize("device,backend", TRITON)
def test_tf32_fused_conv_bn_act_within_bound(device, backend, geometry, tf32):
    """conv_bn_act with TF32: eval (BN folded into the epilogue with the residual and ReLU) and training
    (statistics from the epilogue, one fused normalize + add + ReLU pass), forward, against float64."""
    x, w, stride, padding, _ = _case(geometry, device, False)
    Cout = w.shape[0]
    y64 = F.conv2d(x.double(), w.double(), None, stride, padding)
    r = activation(y64.shape, torch.float32, CL, device)
    bw, bb = torch.rand(Cout, device=device) + 0.5, torch.randn(Cout, device=device) * 0.3
    rm, rv = torch.randn(Cout, device=device) * 0.3, torch.rand(Cout, device=device) + 0.5
    eps = 1e-5

    def vec(t):
        return t.double().view(1, -1, 1, 1)

    with torch.no_grad():  # eval: act(y * s + t + r)
        out = functional.conv_bn_act(x, w, None, rm, rv, bw, bb, stride, padding, 1, 1, False, 0.1, eps, r,
                                     backend=backend)
    s = vec(bw) / torch.sqrt(vec(rv) + eps)
    exact = torch.relu(y64 * s + (vec(bb) - vec(rm) * s) + r.double())
    bound = TF32_REL * (y64 * s).norm().item() + 2 ** -23 * exact.norm().item()
    err = (out.double() - exact).norm().item()
    assert out.is_contiguous(memory_format=CL) and not torch.isnan(out).any()
    assert err <= bound, f"eval epilogue: error {err:.3g} > {bound:.3g}"

    m, v = rm.clone(), rv.clone()
    with torch.no_grad():  # training: batch statistics
        out = functional.conv_bn_act(x, w, None, m, v, bw, bb, stride, padding, 1, 1, True, 0.1, eps, r,
                                     backend=backend)
    yc = _per_channel(y64)
    mean, var = yc.mean(1), yc.var(1, unbiased=False)
    sigma = torch.sqrt(var + eps)
    exact = torch.relu((y64 - mean.view(1, -1, 1, 1)) * (vec(bw) / sigma.view(1, -1, 1, 1)) + vec(bb) + r.double())
    bound = (2 * TF32_REL * bw.double().abs() * yc.norm(dim=1) / sigma).norm().item() + 2 ** -23 * exact.norm().item()
    err = (out.double() - exact).norm().item()
    assert not torch.isnan(out).any()
    assert err <= bound, f"training: error {err:.3g} > {bound:.3g}"
    count = yc.shape[1]
    torch.testing.assert_close(m.double(), 0.9 * rm.double() + 0.1 * mean, rtol=0,
                               atol=0.1 * TF32_REL * (yc.square().mean(1).sqrt().max().item() + 1) + 1e-6)
    torch.testing.assert_close(v.double(), 0.9 * rv.double() + 0.1 * var * count / (count - 1), rtol=0,
                               atol=0.2 * TF32_REL * (yc.square().mean(1).max().item() + 1) + 1e-6)
