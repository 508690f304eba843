"""Triton fused convolution (resnet_fused.triton.conv) vs float64 PyTorch, on tiny shapes.

Runs under TRITON_INTERPRET=1 on CPU (one fixed 32x16x16 tile, fp32 in IEEE), or on a GPU.
"""

import os

import pytest
import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from helpers import assert_within_eager_error  # noqa: E402

from resnet_fused.triton import conv  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.usefixtures("poisoned")  # conftest: new allocations are NaN-filled
CL, NCHW = torch.channels_last, torch.contiguous_format

# name: (N, Cin, Cout, H, W, kernel, stride, padding, dilation). Cin < 16 takes the gathered K path
# (3, 5), Cin >= 16 the blocked one (16; 24 has a ragged ci block); Cout 17: ragged Cout tile.
GEOMETRIES = {
    "1x1s1": (2, 16, 17, 5, 6, 1, 1, 0, 1),
    "1x1s2": (2, 5, 8, 7, 7, 1, 2, 0, 1),
    "3x3s1p1": (2, 16, 8, 7, 8, 3, 1, 1, 1),
    "3x3s2p1": (1, 24, 17, 8, 8, 3, 2, 1, 1),
    "7x7s2p3": (2, 3, 8, 8, 7, 7, 2, 3, 1),
    "3x3d2p2": (1, 5, 4, 7, 5, 3, 1, 2, 2),
}
# name: (prologue: "relu" | "affine" | None, out scale/shift, residual, relu, stats)
FUSIONS = {
    "plain": (None, False, False, False, False),
    "prologue_relu+stats": ("relu", False, False, False, True),
    "epilogue+stats": (None, True, False, True, True),
    "all": ("affine", True, True, True, True),
}
# fp32 runs in IEEE fp32 in the interpreter; on a GPU in TF32 (~1e-3 relative, as cuDNN's default).
FP32_REL_TOL = 1e-4 if INTERPRET else 5e-3


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _rand(gen, shape, dtype=torch.float32, fmt=NCHW, scale=1.0, offset=0.0):
    x = torch.randn(shape, generator=gen) * scale + offset  # never zero, never constant
    return x.to(DEVICE, dtype).contiguous(memory_format=fmt)


def _args(gen, geo, fusion, dtype, fmt):
    N, Cin, Cout, H, W, k, s, p, d = geo
    prologue, affine, residual, relu, stats = fusion
    x = _rand(gen, (N, Cin, H, W), dtype, fmt)
    w = _rand(gen, (Cout, Cin, k, k), dtype, fmt, scale=0.5)
    Ho, Wo = (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1
    return dict(
        input=x, weight=w, stride=(s, s), padding=(p, p), dilation=(d, d),
        # shift > 0 mostly: act(0 * scale + shift) != 0, so a transformed padding would show
        in_scale=_rand(gen, (Cin,)) if prologue else None,
        in_shift=_rand(gen, (Cin,), offset=1.0) if prologue else None,
        in_relu=prologue == "relu",
        out_scale=_rand(gen, (Cout,)) if affine else None,
        out_shift=_rand(gen, (Cout,)) if affine else None,
        residual=_rand(gen, (N, Cout, Ho, Wo), dtype, CL if fmt == NCHW else NCHW) if residual else None,
        relu=relu, stats=stats,
    )


def _vec(v):
    return v.view(1, -1, 1, 1)


def _reference(a, compute_dtype):
    """(out, acc): the op with the convolution in compute_dtype (float64: exact; x's dtype: eager).

    The prologue is fp32 math rounded to x's dtype, as in the kernel, where x' is the MMA operand;
    F.conv2d then pads x' with zeros. The epilogue runs in fp32 (float64 for the exact result).
    """
    x = a["input"].float()
    if a["in_scale"] is not None:
        x = x * _vec(a["in_scale"])
    if a["in_shift"] is not None:
        x = x + _vec(a["in_shift"])
    if a["in_relu"]:
        x = torch.relu(x)
    x = x.to(a["input"].dtype)
    acc = F.conv2d(x.to(compute_dtype), a["weight"].to(compute_dtype), None, a["stride"], a["padding"], a["dilation"])
    epi = torch.float64 if compute_dtype == torch.float64 else torch.float32
    y = acc.to(epi)
    if a["out_scale"] is not None:
        y = y * _vec(a["out_scale"].to(epi)) + _vec(a["out_shift"].to(epi))
    if a["residual"] is not None:
        y = y + a["residual"].to(epi)
    if a["relu"]:
        y = torch.relu(y)
    return y, acc


def _check(a):
    out, mean, var = conv.conv_bn_act(**a)
    exact, acc = _reference(a, torch.float64)
    assert out.shape == exact.shape and out.dtype == a["input"].dtype and out.is_contiguous(memory_format=CL)
    assert not torch.isnan(out).any(), "an output element was left unwritten"
    if out.dtype == torch.float32:
        tol = FP32_REL_TOL * max(exact.abs().max().item(), 1.0)
        torch.testing.assert_close(out.double(), exact, rtol=FP32_REL_TOL, atol=tol)
    else:  # fp16 / bf16: at most ~2x eager's error (+ one ulp), eager = F.conv2d in that dtype
        eager = _reference(a, a["input"].dtype)[0].to(out.dtype)
        assert_within_eager_error(out, eager, exact, "out")
    if a["stats"]:
        exact_mean, exact_var = acc.mean((0, 2, 3)), acc.var((0, 2, 3), unbiased=False)
        rel = FP32_REL_TOL if out.dtype == torch.float32 else 1e-4  # fp16/bf16 products are exact in fp32
        assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == exact_mean.shape
        torch.testing.assert_close(mean.double(), exact_mean, rtol=rel, atol=rel * exact_var.max().sqrt().item())
        torch.testing.assert_close(var.double(), exact_var, rtol=rel, atol=rel * exact_var.max().item())
    else:
        assert mean.shape == var.shape == (0,) and mean.dtype == var.dtype == torch.float32
    return out


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fusion", FUSIONS.values(), ids=FUSIONS.keys())
@pytest.mark.parametrize("geo", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv(gen, geo, fusion, dtype, fmt):
    _check(_args(gen, geo, fusion, dtype, fmt))


@pytest.mark.parametrize("in_relu", [False, True])
def test_padding_stays_zero(gen, in_relu):
    """The prologue must skip padding: transforming it (act(0 * scale + shift)) is a wrong answer."""
    a = _args(gen, GEOMETRIES["3x3s1p1"], (None, False, False, False, False), torch.float32, CL)
    Cin = a["input"].shape[1]
    a.update(in_scale=_rand(gen, (Cin,)), in_shift=_rand(gen, (Cin,), scale=0.1, offset=2.0), in_relu=in_relu)
    out = _check(a)
    # the wrong answer: pad first, then transform the padding too
    x = F.pad(a["input"].float(), (1, 1, 1, 1)) * _vec(a["in_scale"]) + _vec(a["in_shift"])
    wrong = F.conv2d(torch.relu(x) if in_relu else x, a["weight"].float())
    assert (out - wrong).abs().max() > 1.0  # the test can tell the two apart


@pytest.mark.parametrize("tile", [(16, 32, 32), (64, 64, 32)], ids=["16x32x32", "64x64x32"])
def test_other_tiles(gen, tile, monkeypatch):
    """Other tile shapes: several stats row tiles per config, gathered K blocks spanning taps."""
    monkeypatch.setattr(conv._conv, "configs", [conv._config(*tile, 4, 2)])
    for name in ("3x3s2p1", "7x7s2p3", "3x3d2p2"):
        _check(_args(gen, GEOMETRIES[name], FUSIONS["all"], torch.float32, CL))


def test_stats_large_mean(gen, monkeypatch):
    """|mean| >> std of the conv output: per-tile centred M2 + Chan keeps the variance exact-ish."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # GPU: IEEE fp32, TF32 would quantize x
    a = _args(gen, (2, 16, 8, 8, 8, 1, 1, 0, 1), FUSIONS["epilogue+stats"], torch.float32, CL)
    a["input"] = _rand(gen, (2, 16, 8, 8), fmt=CL, scale=0.1, offset=100.0)
    a["weight"] = _rand(gen, (8, 16, 1, 1), offset=1.0)
    _, mean, var = conv.conv_bn_act(**a)
    _, acc = _reference(a, torch.float64)
    assert (acc.mean((0, 2, 3)).abs() > 100 * acc.std((0, 2, 3))).all()  # the regime under test
    torch.testing.assert_close(mean.double(), acc.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), acc.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("stats", [False, True])
def test_empty(stats):
    x, w = torch.empty((0, 3, 8, 8), device=DEVICE), torch.ones((4, 3, 3, 3), device=DEVICE)
    out, mean, var = conv.conv_bn_act(x, w, (2, 2), (1, 1), (1, 1), None, None, False, None, None, None, True, stats)
    assert out.shape == (0, 4, 4, 4) and out.is_contiguous(memory_format=CL)
    for t in (mean, var):
        assert t.dtype == torch.float32 and t.shape == ((4,) if stats else (0,)) and not t.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the interpreter: GPU only")
@pytest.mark.parametrize("geo", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv_bf16(gen, geo):
    _check(_args(gen, geo, FUSIONS["all"], torch.bfloat16, CL))
