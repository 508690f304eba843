"""Triton kernels vs resnet_fused.reference, on tiny shapes (runs under TRITON_INTERPRET=1 on CPU)."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from resnet_fused import reference as ref  # noqa: E402
from resnet_fused.triton import bn_act  # noqa: E402
from resnet_fused.triton.add_relu import add_relu  # noqa: E402

DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.usefixtures("poisoned")  # conftest: new allocations are NaN-filled
CL, NCHW = torch.channels_last, torch.contiguous_format

# non-power-of-two C, N=1 / C=3 / 7x7, H=W=1 (both layouts at once), H != W
SHAPES = [(2, 5, 3, 3), (1, 3, 7, 7), (3, 6, 1, 1), (2, 8, 5, 4)]
FORMATS = [NCHW, CL]
DTYPES = [torch.float32, torch.float16]
# Elementwise outputs: fp32 math and one rounding on both sides, so at most ~1 ulp apart.
ELEMT_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}
# Reductions: fp32 outputs of exact-in-fp32 inputs vs. an fp64 reference.
SUM_TOL = dict(rtol=1e-5, atol=1e-4)

cases = pytest.mark.parametrize(
    "shape,fmt,dtype",
    [(s, f, d) for s in SHAPES for f in FORMATS for d in DTYPES],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).split(".")[-1],
)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _act(gen, shape, dtype, fmt, scale=1.0, offset=0.0):
    """Random activation, N(offset, scale^2), laid out in fmt."""
    x = torch.randn(shape, generator=gen) * scale + offset
    return x.to(DEVICE, dtype).contiguous(memory_format=fmt)


def _vec(gen, C):
    return torch.randn(C, generator=gen).to(DEVICE)


def _check(actual, expected, tol):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert ref._memory_format(actual) == ref._memory_format(expected)
    torch.testing.assert_close(actual, expected, **tol)


@cases
def test_add_relu(gen, shape, fmt, dtype):
    x, r = _act(gen, shape, dtype, fmt), _act(gen, shape, dtype, fmt)
    _check(add_relu(x, r), ref.add_relu(x, r), ELEMT_TOL[dtype])


@cases
def test_bn_stats(gen, shape, fmt, dtype):
    x = _act(gen, shape, dtype, fmt, scale=2.0, offset=3.0)
    for a, e in zip(bn_act.bn_stats(x), ref.bn_stats(x)):
        _check(a, e, SUM_TOL)


@cases
@pytest.mark.parametrize("residual,relu", [(False, False), (False, True), (True, False), (True, True)])
def test_bn_act_apply(gen, shape, fmt, dtype, residual, relu):
    x, scale, shift = _act(gen, shape, dtype, fmt), _vec(gen, shape[1]), _vec(gen, shape[1])
    res = _act(gen, shape, dtype, fmt) if residual else None
    _check(bn_act.bn_act_apply(x, scale, shift, res, relu), ref.bn_act_apply(x, scale, shift, res, relu), ELEMT_TOL[dtype])


@cases
@pytest.mark.parametrize("relu", [False, True])
def test_bn_act_backward_reduce(gen, shape, fmt, dtype, relu):
    g, x = _act(gen, shape, dtype, fmt), _act(gen, shape, dtype, fmt, scale=2.0, offset=3.0)
    mean = ref.bn_stats(x)[0]
    y = _act(gen, shape, dtype, fmt) if relu else None  # relu mask: y > 0
    for a, e in zip(bn_act.bn_act_backward_reduce(g, x, mean, y), ref.bn_act_backward_reduce(g, x, mean, y)):
        _check(a, e, SUM_TOL)


@cases
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("need_grad_residual", [False, True])
def test_bn_act_backward_elemt(gen, shape, fmt, dtype, relu, training, need_grad_residual):
    C = shape[1]
    g = _act(gen, shape, dtype, fmt)
    y = _act(gen, shape, dtype, fmt) if relu else None
    x, mean, x_scale, shift = (
        (_act(gen, shape, dtype, fmt), _vec(gen, C), _vec(gen, C), _vec(gen, C)) if training else (None, None, None, None)
    )
    args = (g, y, x, mean, _vec(gen, C), x_scale, shift, need_grad_residual)
    gi, gr = bn_act.bn_act_backward_elemt(*args)
    gi_ref, gr_ref = ref.bn_act_backward_elemt(*args)
    _check(gi, gi_ref, ELEMT_TOL[dtype])
    if need_grad_residual:
        _check(gr, gr_ref, ELEMT_TOL[dtype])
    else:
        assert gr.numel() == 0 and gr.dtype == dtype


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_and_strided_layouts(gen, fmt):
    """Other operands in the other format, or not dense at all: results follow the layout rules."""
    shape, C = (2, 5, 4, 3), 5
    other = CL if fmt == NCHW else NCHW
    x = _act(gen, shape, torch.float32, fmt, scale=2.0, offset=1.0)
    g, y, r = (_act(gen, shape, torch.float32, other) for _ in range(3))
    strided = _act(gen, (2, 5, 8, 3), torch.float32, fmt)[:, :, ::2]  # neither format: laid out as NCHW
    scale, shift = _vec(gen, C), _vec(gen, C)
    _check(add_relu(x, r), ref.add_relu(x, r), ELEMT_TOL[torch.float32])
    _check(add_relu(strided, r), ref.add_relu(strided, r), ELEMT_TOL[torch.float32])
    _check(bn_act.bn_act_apply(x, scale, shift, r, True), ref.bn_act_apply(x, scale, shift, r, True), ELEMT_TOL[torch.float32])
    for a, e in zip(bn_act.bn_stats(strided), ref.bn_stats(strided)):
        _check(a, e, SUM_TOL)
    for a, e in zip(bn_act.bn_act_backward_reduce(g, x, scale, y), ref.bn_act_backward_reduce(g, x, scale, y)):
        _check(a, e, SUM_TOL)
    args = (g, y, x, shift, scale, shift, scale, True)
    for a, e in zip(bn_act.bn_act_backward_elemt(*args), ref.bn_act_backward_elemt(*args)):
        _check(a, e, ELEMT_TOL[torch.float32])


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_tiles(gen, fmt, monkeypatch):
    """Tiny tiles: many tiles per reduction program, several chunks, several combine steps,
    plane blocks that straddle two images, ragged edges everywhere."""
    monkeypatch.setattr(bn_act, "_TILE", 16)
    monkeypatch.setattr(bn_act, "_MAX_BLOCK_C", 4)
    monkeypatch.setattr(bn_act, "_MAX_BLOCK_HW", 8)
    monkeypatch.setattr(bn_act, "_REDUCE_PROGRAMS", 16)
    monkeypatch.setattr(bn_act, "_COMBINE_BLOCK_R", 2)
    shape, C = (3, 5, 6, 7), 5
    x = _act(gen, shape, torch.float32, fmt, scale=2.0, offset=3.0)
    g, y = _act(gen, shape, torch.float32, fmt), _act(gen, shape, torch.float32, fmt)
    scale, shift = _vec(gen, C), _vec(gen, C)
    plan = bn_act._plan(x, fmt)
    chunk_s, num_chunks = plan.reduce_chunks()
    assert num_chunks > 1 and chunk_s > plan.block_s and plan.P // C * num_chunks > 2  # paths exercised
    for a, e in zip(bn_act.bn_stats(x), ref.bn_stats(x)):
        _check(a, e, SUM_TOL)
    for a, e in zip(bn_act.bn_act_backward_reduce(g, x, scale, y), ref.bn_act_backward_reduce(g, x, scale, y)):
        _check(a, e, SUM_TOL)
    _check(bn_act.bn_act_apply(x, scale, shift, g, True), ref.bn_act_apply(x, scale, shift, g, True), ELEMT_TOL[torch.float32])
    args = (g, y, x, shift, scale, shift, scale, True)
    for a, e in zip(bn_act.bn_act_backward_elemt(*args), ref.bn_act_backward_elemt(*args)):
        _check(a, e, ELEMT_TOL[torch.float32])


@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_stats_large_mean(gen, fmt, monkeypatch):
    """|mean| >> std: a one-pass E[x^2] - E[x]^2 in fp32 would lose the variance entirely."""
    monkeypatch.setattr(bn_act, "_TILE", 64)
    monkeypatch.setattr(bn_act, "_REDUCE_PROGRAMS", 8)
    x = _act(gen, (4, 3, 16, 16), torch.float32, fmt, scale=1.0, offset=1000.0)
    mean, var = bn_act.bn_stats(x)
    mean_ref, var_ref = ref.bn_stats(x)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=0)  # one-pass fp32: ~7e-2


def test_empty():
    x = torch.empty((0, 4, 3, 3), device=DEVICE)
    for t in (*bn_act.bn_stats(x), *bn_act.bn_act_backward_reduce(x, x, torch.zeros(4, device=DEVICE), x)):
        assert t.shape == (4,) and t.dtype == torch.float32 and not t.any()
    assert bn_act.bn_act_apply(x, torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE), None, True).shape == x.shape
    assert add_relu(x, x).shape == x.shape
    gi, gr = bn_act.bn_act_backward_elemt(x, x, None, None, torch.ones(4, device=DEVICE), None, None, True)
    assert gi.shape == x.shape and gr.shape == x.shape
