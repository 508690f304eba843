"""Triton kernels vs resnet_fused.reference, on tiny shapes (runs under TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from helpers import INTERPRET, TRITON_DEVICE, assert_matches_spec, assert_within_eager_error, layout_of

if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from resnet_fused import reference as ref  # noqa: E402
from resnet_fused.activations import ACTIVATIONS, Activation  # noqa: E402
from resnet_fused.triton import _launch, bn_act, bn_coeffs, welford  # noqa: E402
from resnet_fused.triton.add_relu import add_relu  # noqa: E402

DEVICE = TRITON_DEVICE
pytestmark = [
    pytest.mark.usefixtures("poisoned"),  # conftest: new allocations are NaN-filled
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),  # the interpreter's numpy, on NaN and Inf
]
CL, NCHW = torch.channels_last, torch.contiguous_format

# non-power-of-two C, N=1 / C=3 / 7x7, H=W=1 (both layouts at once), H != W
SHAPES = [(2, 5, 3, 3), (1, 3, 7, 7), (3, 6, 1, 1), (2, 8, 5, 4)]
FORMATS = [NCHW, CL]
DTYPES = [torch.float32, torch.float16]
# Tolerances (helpers.assert_matches_spec): elementwise outputs run the specification's fp32 formula and
# round once, so they sit a few ulps of the operands' size apart (4); sums and statistics differ by the
# order of their fp32 additions, a few ulps of sum |term| per channel (16, over at most a few hundred terms).
SUM_ULPS = 16.0
SPECIAL = (float("nan"), float("inf"), -float("inf"), -0.0, 0.0)

cases = pytest.mark.parametrize(
    "shape,fmt,dtype",
    [(s, f, d) for s in SHAPES for f in FORMATS for d in DTYPES],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v).split(".")[-1],
)
specials = pytest.mark.parametrize("special", [False, True], ids=["finite", "nonfinite"])


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _act(gen, shape, dtype, fmt, scale=1.0, offset=0.0, special=False):
    """Random activation, N(offset, scale^2), laid out in fmt. special: the elements of even channels
    whose NCHW index is a multiple of 3 are NaN, +Inf, -Inf, -0.0, 0.0 in turn; odd channels stay finite."""
    x = torch.randn(shape, generator=gen) * scale + offset
    if special:
        at = (torch.arange(x.numel()).view(shape) % 3 == 0) & (torch.arange(shape[1]).view(1, -1, 1, 1) % 2 == 0)
        x[at] = torch.tensor(SPECIAL)[torch.arange(int(at.sum())) % len(SPECIAL)]
    return x.to(DEVICE, dtype).contiguous(memory_format=fmt)


def _vec(gen, C):
    return torch.randn(C, generator=gen).to(DEVICE)


def _check(actual, expected, magnitude=None, ulps=4.0):
    """Same dtype, shape and layout; NaN where expected is NaN, the same infinities, the rest within
    `ulps` of the operands' size (a NaN the kernel left in an unwritten, poisoned element fails wherever
    the reference is not NaN)."""
    assert_matches_spec(actual, expected, "triton vs resnet_fused.reference", ulps, magnitude)


def _sum_terms(g, x, mean, y):
    """Per channel, float64: sum |dy| and sum |dy (x - mean)|, the sizes bn_act_backward_reduce's sums
    round at (dy = g, 0 where y <= 0)."""
    dy = g.double() if y is None else torch.where(y.double() <= 0, 0.0, g.double())
    xmu = x.double() - mean.double().view(1, -1, 1, 1)
    return dy.abs().sum((0, 2, 3)), (dy * xmu).abs().sum((0, 2, 3))


def _stat_terms(x):
    """Per channel, float64: mean |x| (the mean's size) and the variance (a sum of squares: its own size)."""
    xd = x.double()
    return xd.abs().mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)


def _check_stats(actual, expected, magnitude):
    """Statistics: where the reference is finite, within SUM_ULPS of their size; elsewhere not finite
    either. An infinite reference mean may be NaN here: the fp32 merges compute inf - inf, as eager's
    Welford does."""
    finite = expected.isfinite()
    assert torch.equal(actual.isfinite(), finite), (actual, expected)
    _check(actual[finite], expected[finite], magnitude[finite], SUM_ULPS)


@cases
@specials
def test_add_relu(gen, shape, fmt, dtype, special):
    x, r = _act(gen, shape, dtype, fmt, special=special), _act(gen, shape, dtype, fmt, special=special)
    _check(add_relu(x, r), ref.add_relu(x, r))


@cases
@specials
def test_bn_stats(gen, shape, fmt, dtype, special):
    x = _act(gen, shape, dtype, fmt, scale=2.0, offset=3.0, special=special)
    for a, e, m in zip(bn_act.bn_stats(x), ref.bn_stats(x), _stat_terms(x)):
        _check_stats(a, e, m)


@cases
@specials
@pytest.mark.parametrize("residual,act", [(False, "none"), (False, "relu"), (True, "none"), (True, "relu")])
def test_bn_act_apply(gen, shape, fmt, dtype, special, residual, act):
    x, scale, shift = _act(gen, shape, dtype, fmt, special=special), _vec(gen, shape[1]), _vec(gen, shape[1])
    res = _act(gen, shape, dtype, fmt, special=special) if residual else None
    _check(bn_act.bn_act_apply(x, scale, shift, res, act, 0.0), ref.bn_act_apply(x, scale, shift, res, act, 0.0))


@cases
@specials
@pytest.mark.parametrize("relu", [False, True])
def test_bn_act_backward_reduce(gen, shape, fmt, dtype, special, relu):
    g, x = _act(gen, shape, dtype, fmt, special=special), _act(gen, shape, dtype, fmt, scale=2.0, offset=3.0, special=special)
    mean = ref.bn_stats(x.nan_to_num(0.0, 0.0, 0.0))[0]
    y = _act(gen, shape, dtype, fmt, special=special) if relu else None  # relu mask: 0 where y <= 0
    terms = _sum_terms(g, x, mean, y)
    for a, e, m in zip(bn_act.bn_act_backward_reduce(g, x, mean, y), ref.bn_act_backward_reduce(g, x, mean, y), terms):
        _check(a, e, m, SUM_ULPS)  # sums: NaN and infinities do not depend on the order of summation


@cases
@specials
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("need_grad_residual", [False, True])
def test_bn_act_backward_elemt(gen, shape, fmt, dtype, special, relu, training, need_grad_residual):
    C = shape[1]
    g = _act(gen, shape, dtype, fmt, special=special)
    y = _act(gen, shape, dtype, fmt, special=special) if relu else None
    x, mean, x_scale, shift = (
        (_act(gen, shape, dtype, fmt, special=special), _vec(gen, C), _vec(gen, C), _vec(gen, C))
        if training else (None, None, None, None)
    )
    args = (g, y, x, mean, _vec(gen, C), x_scale, shift, need_grad_residual)
    gi, gr = bn_act.bn_act_backward_elemt(*args)
    gi_ref, gr_ref = ref.bn_act_backward_elemt(*args)
    _check(gi, gi_ref)
    if need_grad_residual:
        _check(gr, gr_ref)
    else:
        assert gr.numel() == 0 and gr.dtype == dtype


# every activation; LeakyReLU with a slope other than its default
ACTS = [(name, 0.2 if name == "leaky_relu" else 0.0) for name in ACTIVATIONS]
acts = pytest.mark.parametrize("act,alpha", ACTS, ids=[name for name, _ in ACTS])


def _act_operands(gen, shape, dtype, fmt, special):
    """(g, x, scale, shift, res): x * scale + shift + res spread over about [-10, 10], so that every branch
    (ReLU6's 6, Hardswish's +-3) is taken; scale of either sign, |scale| in [0.5, 1.5]; g in the other format."""
    C, other = shape[1], CL if fmt == NCHW else NCHW
    sign = torch.where(torch.rand(C, generator=gen) < 0.5, -1.0, 1.0)
    scale = (sign * (0.5 + torch.rand(C, generator=gen))).to(DEVICE)
    x, res = _act(gen, shape, dtype, fmt, scale=3.0, special=special), _act(gen, shape, dtype, fmt, special=special)
    return _act(gen, shape, dtype, other), x, scale, _vec(gen, C), res


def _eager_pre_activation(x, scale, shift, res):
    # z as eager PyTorch forms it in x's dtype: batch norm (fp32 inside, rounded to x's dtype), + residual in x's dtype
    z = (x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)
    return z if res is None else z + res


def _check_exact(fused, eager, exact, what):
    """Against float64: NaN exactly where it has NaN, the same infinities, the finite rest at most ~2x
    eager's error (helpers.assert_within_eager_error)."""
    assert torch.equal(fused.isnan(), exact.isnan()), f"{what}: NaN where float64 has none, or the reverse"
    inf = exact.isinf()
    assert torch.equal(fused.isinf(), inf) and torch.equal(fused[inf].double(), exact[inf]), f"{what}: infinities differ"
    finite = exact.isfinite()
    assert_within_eager_error(fused[finite], eager[finite], exact[finite], what)


def _grad_at_nan_z(g, act, alpha):
    """g * d act / dz at a NaN z, as resnet_fused/activations.py defines it (aten's vectorized CPU kernels:
    ReLU6, Hardsigmoid 0, LeakyReLU alpha, ReLU 1, the others NaN). Not from aten itself: its scalar loop
    (a vector's tail, operands of mixed layouts) gives other values there (ReLU6: 1, Hardswish: 1 in fp16)."""
    factor = {"none": 1.0, "relu": 1.0, "relu6": 0.0, "leaky_relu": alpha, "hardsigmoid": 0.0}.get(act, float("nan"))
    return (g.float() * factor).to(g.dtype)


@acts
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@specials
def test_activations(gen, act, alpha, residual, fmt, dtype, special):
    """bn_act_apply and act_backward with every activation against the reference on float64 operands;
    eager: z formed in the dtype (batch norm, then + residual), then torch's activation or aten's
    backward in the dtype. N = 1, C = 3, 7x7 (ragged tiles in both layouts). nonfinite: NaN in gives NaN
    out (input and residual), infinities land where torch's formulas put them; at a NaN z the gradient
    is _grad_at_nan_z's."""
    g, x, scale, shift, res = _act_operands(gen, (1, 3, 7, 7), dtype, fmt, special)
    res = res if residual else None
    spec = Activation(act, alpha)
    z64 = (x.double(), scale.double(), shift.double(), None if res is None else res.double())
    z = _eager_pre_activation(x, scale, shift, res)
    out = bn_act.bn_act_apply(x, scale, shift, res, act, alpha)
    assert layout_of(out) == layout_of(x), f"bn_act_apply {act}: layout {layout_of(out)}"
    _check_exact(out, spec(z), ref.bn_act_apply(*z64, act, alpha), f"bn_act_apply {act}")
    grad = bn_act.act_backward(g, x, scale, shift, res, act, alpha)
    assert layout_of(grad) == layout_of(x), f"act_backward {act}: layout {layout_of(grad)}"
    nan_z = ref.bn_act_apply(*z64, "none", 0.0).isnan()
    torch.testing.assert_close(grad[nan_z], _grad_at_nan_z(g, act, alpha)[nan_z], rtol=0, atol=0, equal_nan=True)
    _check_exact(grad[~nan_z], spec.backward(g, z)[~nan_z], ref.act_backward(g.double(), *z64, act, alpha)[~nan_z],
                 f"act_backward {act}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_derivative_at_the_kinks(dtype):
    """act_backward exactly at z = -3, 0, 3, 6 (ReLU's and LeakyReLU's 0, ReLU6's 0 and 6, Hardswish's and
    Hardsigmoid's -3 and 3): the one-sided values of resnet_fused/activations.py's table; grad_out = 2."""
    z = torch.tensor([-3.0, 0.0, 3.0, 6.0]).view(1, 4, 1, 1).to(DEVICE, dtype)
    g, ones = torch.full_like(z, 2.0), torch.ones(4, device=DEVICE)
    expected = {"relu": [0, 0, 2, 2], "leaky_relu": [0.4, 0.4, 2, 2], "relu6": [0, 0, 2, 0], "hardswish": [0, 1, 2, 2],
                "hardsigmoid": [0, 1 / 3, 0, 0]}
    for act, values in expected.items():
        got = bn_act.act_backward(g, z, ones, ones * 0, None, act, 0.2)
        torch.testing.assert_close(got, torch.tensor(values).view_as(z).to(DEVICE, dtype), msg=lambda m, act=act: f"{act}: {m}")

def _check_stats_and_backward(stats_input, g, x, y, scale, shift):
    """bn_stats(stats_input), then bn_act_backward_reduce and bn_act_backward_elemt on (g, x, y) with
    scale standing in for the mean, against the reference (sums at the size of their terms)."""
    for a, e, t in zip(bn_act.bn_stats(stats_input), ref.bn_stats(stats_input), _stat_terms(stats_input)):
        _check(a, e, t, SUM_ULPS)
    for a, e, t in zip(bn_act.bn_act_backward_reduce(g, x, scale, y), ref.bn_act_backward_reduce(g, x, scale, y),
                       _sum_terms(g, x, scale, y)):
        _check(a, e, t, SUM_ULPS)
    args = (g, y, x, shift, scale, shift, scale, True)
    for a, e in zip(bn_act.bn_act_backward_elemt(*args), ref.bn_act_backward_elemt(*args)):
        _check(a, e)


@pytest.mark.parametrize("fmt", FORMATS)
def test_mixed_and_strided_layouts(gen, fmt):
    """Other operands in the other format, or not dense at all: results follow the layout rules."""
    shape, C = (2, 5, 4, 3), 5
    other = CL if fmt == NCHW else NCHW
    x = _act(gen, shape, torch.float32, fmt, scale=2.0, offset=1.0)
    g, y, r = (_act(gen, shape, torch.float32, other) for _ in range(3))
    strided = _act(gen, (2, 5, 8, 3), torch.float32, fmt)[:, :, ::2]  # neither format: laid out as NCHW
    scale, shift = _vec(gen, C), _vec(gen, C)
    _check(add_relu(x, r), ref.add_relu(x, r))
    _check(add_relu(strided, r), ref.add_relu(strided, r))
    _check(bn_act.bn_act_apply(x, scale, shift, r, "relu", 0.0), ref.bn_act_apply(x, scale, shift, r, "relu", 0.0))
    _check(bn_act.act_backward(g, strided, scale, shift, r, "silu", 0.0), ref.act_backward(g, strided, scale, shift, r, "silu", 0.0))
    _check_stats_and_backward(strided, g, x, y, scale, shift)


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_tiles(gen, fmt, monkeypatch):
    """Tiny tiles: many tiles per reduction program, several chunks, several combine steps,
    plane blocks that straddle two images, ragged edges everywhere."""
    monkeypatch.setattr(bn_act, "_TILE", 16)
    monkeypatch.setattr(bn_act, "_MAX_BLOCK_C", 4)
    monkeypatch.setattr(bn_act, "_MAX_BLOCK_HW", 8)
    monkeypatch.setattr(bn_act, "_REDUCE_PROGRAMS", 16)
    monkeypatch.setattr(welford, "MERGE_BLOCK_R", 2)
    shape, C = (3, 5, 6, 7), 5
    x = _act(gen, shape, torch.float32, fmt, scale=2.0, offset=3.0)
    g, y = _act(gen, shape, torch.float32, fmt), _act(gen, shape, torch.float32, fmt)
    scale, shift = _vec(gen, C), _vec(gen, C)
    plan = bn_act._plan(x, fmt)
    chunk_s, num_chunks = plan.reduce_chunks()
    assert num_chunks > 1 and chunk_s > plan.block_s and plan.P // C * num_chunks > 2  # paths exercised
    _check_stats_and_backward(x, g, x, y, scale, shift)
    _check(bn_act.bn_act_apply(x, scale, shift, g, "relu", 0.0), ref.bn_act_apply(x, scale, shift, g, "relu", 0.0))
    _check(bn_act.act_backward(g, x, scale, shift, y, "gelu", 0.0), ref.act_backward(g, x, scale, shift, y, "gelu", 0.0))


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
    ones = torch.ones(4, device=DEVICE)
    assert bn_act.bn_act_apply(x, ones, ones, None, "relu", 0.0).shape == x.shape
    assert bn_act.act_backward(x, x, ones, ones, x, "silu", 0.0).shape == x.shape
    assert add_relu(x, x).shape == x.shape
    gi, gr = bn_act.bn_act_backward_elemt(x, x, None, None, torch.ones(4, device=DEVICE), None, None, True)
    assert gi.shape == x.shape and gr.shape == x.shape


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_relu_matches_eager(fmt, dtype):
    """ReLU as torch.relu (relu(NaN) = NaN, relu(-Inf) = 0) and its gradient as threshold_backward
    (0 where out <= 0, so a NaN out passes its gradient), against eager directly, not the reference.
    (-0.0 comes out as -0.0, as torch.relu gives on CPU; equal to 0 either way.)"""
    x = torch.tensor([*SPECIAL, -1.0, 1.0, 2.0]).view(1, 8, 1, 1).repeat(2, 1, 3, 2).to(DEVICE, dtype)
    x = x.contiguous(memory_format=fmt)
    zero, ones = torch.zeros_like(x), torch.ones(8, device=DEVICE)
    g = torch.full_like(x, 3.0)
    g[1] = float("nan")  # a NaN gradient is zeroed where out <= 0 and passed elsewhere
    eager_grad = torch.ops.aten.threshold_backward(g, torch.relu(x), 0)
    _check(add_relu(x, zero), torch.relu(x))
    _check(bn_act.bn_act_apply(x, ones, ones * 0, None, "relu", 0.0), torch.relu(x))
    gi, gr = bn_act.bn_act_backward_elemt(g, x, None, None, ones, None, None, True)
    _check(gi, eager_grad)
    _check(gr, eager_grad)
    _check(bn_act.act_backward(g, x, ones, ones * 0, None, "relu", 0.0), eager_grad)  # from z = x: the same mask
    sum_dy, _ = bn_act.bn_act_backward_reduce(g, x, ones * 0, x)
    _check(sum_dy, eager_grad.double().sum((0, 2, 3)).float(), eager_grad.double().abs().sum((0, 2, 3)), SUM_ULPS)


def _x(*shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape or (2, 4, 3, 3)).to(device, dtype)


def _c(C=4, dtype=torch.float32, device=DEVICE):
    return torch.ones(C, dtype=dtype, device=device)


OPS = torch.ops.resnet_fused


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: OPS.triton_bn_stats(_x(4, 3)), r"triton_bn_stats: expected `input` to be a 4-D \(N, C, H, W\).*got shape \[4, 3\]"),
        (lambda: OPS.triton_bn_stats(_x(dtype=torch.float64)), r"float32, float16 or bfloat16 tensor, got .* torch.float64"),
        (lambda: OPS.triton_add_relu_forward(_x(), _x(2, 4, 3, 2)),
         r"triton_add_relu_forward: `residual` is torch.float32 of shape \[2, 4, 3, 2\] but `input` is .* \[2, 4, 3, 3\]"),
        (lambda: OPS.triton_bn_act_apply(_x(), _c(3), _c(), None, "relu", 0.0), r"`scale` to be float32 of shape \[4\].*got .* shape \[3\]"),
        (lambda: OPS.triton_bn_act_apply(_x(), _c(), _c(dtype=torch.float16), None, "relu", 0.0), r"`shift` to be float32.*got torch.float16"),
        (lambda: OPS.triton_bn_act_apply(_x(), _c(), _c(), _x(dtype=torch.bfloat16), "relu", 0.0), r"`residual` is torch.bfloat16"),
        (lambda: bn_act.bn_act_apply(_x(), _c(), _c(device="meta"), None, "relu", 0.0),  # the op would dispatch to its fake
         r"triton_bn_act_apply: expected all tensors on one device, got .*`shift` on meta"),
        (lambda: OPS.triton_bn_act_apply(_x(), _c(), _c(), None, "swish", 0.0),
         r"triton_bn_act_apply: unknown activation 'swish'; known: none, relu, relu6, leaky_relu, silu, gelu, gelu_tanh, "
         r"hardswish, hardsigmoid"),
        (lambda: OPS.triton_act_backward(_x(dtype=torch.float16), _x(), _c(), _c(), None, "silu", 0.0),
         r"triton_act_backward: `input` is torch.float32 of shape \[2, 4, 3, 3\] but `grad_out` is torch.float16"),
        (lambda: OPS.triton_act_backward(_x(), _x(), _c(), _c(5), None, "silu", 0.0), r"`shift` to be float32 of shape \[4\]"),
        (lambda: OPS.triton_act_backward(_x(), _x(), _c(), _c(), _x(2, 4, 3, 2), "silu", 0.0), r"`residual` is .* \[2, 4, 3, 2\]"),
        (lambda: OPS.triton_act_backward(_x(), _x(), _c(), _c(), None, "tanh", 0.0), r"triton_act_backward: unknown activation 'tanh'"),
        (lambda: OPS.triton_bn_act_backward_reduce(_x(), _x(), _c(), _x(1, 4, 3, 3)), r"`output` is .* of shape \[1, 4, 3, 3\]"),
        (lambda: OPS.triton_bn_act_backward_elemt(_x(), None, _x(), None, _c(), None, None, False),
         r"triton_bn_act_backward_elemt: `input`, `mean`, `x_scale`, `shift` are given together or not at all"),
        (lambda: OPS.triton_bn_scale_shift(_c(4), _c(3), None, None, 1e-5),
         r"triton_bn_scale_shift: `var` has shape \[3\] but `mean` has shape \[4\]"),
        (lambda: OPS.triton_bn_scale_shift(_c(4), _c(4), _x(), None, 1e-5),
         r"triton_bn_scale_shift: expected `weight` to be a 1-D float32, float64, float16 or bfloat16 per-channel vector, "
         r"got torch.float32 of shape \[2, 4, 3, 3\]"),
        (lambda: bn_coeffs.bn_scale_shift(_c(4), _c(4), None, _c(device="meta"), 1e-5),
         r"triton_bn_scale_shift: expected all tensors on one device, got .*`bias` on meta"),
        (lambda: OPS.triton_bn_backward_coeffs(_c(4), _c(4), _c(4, dtype=torch.int32), None, 1e-5, 8.0, True),
         r"triton_bn_backward_coeffs: expected `var` to be .* got torch.int32"),
        (lambda: OPS.triton_bn_backward_coeffs(_c(4), _c(5), _c(4), None, 1e-5, 8.0, True),
         r"triton_bn_backward_coeffs: `sum_dy_xmu` has shape \[5\] but `sum_dy` has shape \[4\]"),
    ],
)
def test_bad_arguments_raise(call, message):
    """Wrong shapes, dtypes or devices are named before any kernel runs (a kernel would read out of bounds)."""
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "cl"])
def test_opcheck_activation_ops(gen, fmt):
    """triton_bn_act_apply and triton_act_backward through opcheck (schema, fakes, their strides) with an
    activation and slope other than ReLU's, grad_out in the other layout."""
    g, x, scale, shift, res = _act_operands(gen, (2, 5, 4, 3), torch.float32, fmt, False)
    torch.library.opcheck(OPS.triton_bn_act_apply, (x, scale, shift, res, "leaky_relu", 0.2))
    torch.library.opcheck(OPS.triton_act_backward, (g, x, scale, shift, res, "gelu_tanh", 0.0))


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """On a GPU machine (no TRITON_INTERPRET), CPU tensors reaching the compiled kernels are an error
    naming the op, the device and what it takes; here the interpreter's flag is turned off to show it."""
    monkeypatch.setattr(_launch, "_INTERPRET", False)
    x, c = _x(device="cpu"), _c(device="cpu")
    for op, args in [
        ("add_relu_forward", (x, x)),
        ("bn_stats", (x,)),
        ("bn_act_apply", (x, c, c, None, "relu", 0.0)),
        ("act_backward", (x, x, c, c, None, "silu", 0.0)),
        ("bn_act_backward_reduce", (x, x, c, x)),
        ("bn_act_backward_elemt", (x, x, x, c, c, c, c, True)),
        ("bn_scale_shift", (c, c, c, c, 1e-5)),
        ("bn_backward_coeffs", (c, c, c, c, 1e-5, 8.0, True)),
    ]:
        with pytest.raises(RuntimeError, match=rf"resnet_fused::triton_{op}: got tensors on cpu; it takes CUDA tensors "
                                               rf"\(CPU tensors only when TRITON_INTERPRET=1"):
            getattr(OPS, f"triton_{op}")(*args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs: kernels must launch on the tensors' device")
@pytest.mark.parametrize("fmt", FORMATS)
def test_runs_on_the_tensors_device(gen, fmt):
    """Tensors on cuda:1 while cuda:0 is current: every launcher runs there (Triton would otherwise
    launch on cuda:0 with cuda:1 pointers) and leaves the current device as it was."""
    shape, C = (2, 5, 4, 3), 5
    on1 = [t.to("cuda:1") for t in (_act(gen, shape, torch.float32, fmt, scale=2.0, offset=1.0),
                                    *(_act(gen, shape, torch.float32, fmt) for _ in range(2)),
                                    _vec(gen, C), _vec(gen, C))]
    x, g, y, scale, shift = on1
    with torch.cuda.device(0):
        _check(add_relu(x, g), ref.add_relu(x, g))
        _check(bn_act.bn_act_apply(x, scale, shift, g, "relu", 0.0), ref.bn_act_apply(x, scale, shift, g, "relu", 0.0))
        _check(bn_act.act_backward(g, x, scale, shift, y, "gelu", 0.0), ref.act_backward(g, x, scale, shift, y, "gelu", 0.0))
        _check_stats_and_backward(x, g, x, y, scale, shift)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0


@pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 48 * 2**30,
    reason="needs a CUDA GPU with 48 GiB: over 2^31 elements (int64 offsets)",
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_over_2_31_elements(fmt):
    """An fp16 activation of 2^31 + 131072 elements: offsets past 2^31 (int32 would wrap) in both layouts.
    Values and scales are exact in fp16 (integers in [-255, 255], scales 2^-2..2^1), so results are exact."""
    shape, C = (1, 8, 16384, 16385), 8
    x = ((torch.arange(C * 16384 * 16385, device="cuda") % 511) - 255).half().view(shape).contiguous(memory_format=fmt)
    scale = 2.0 ** (torch.arange(C, device="cuda") % 4 - 2)
    assert torch.equal(add_relu(x, x), torch.relu(x + x))
    assert torch.equal(bn_act.bn_act_apply(x, scale, scale * 0, None, "relu", 0.0), torch.relu(x * scale.half().view(1, C, 1, 1)))
    assert torch.equal(bn_act.act_backward(x, x, scale, scale * 0, None, "relu", 0.0), torch.relu(x))  # scale > 0: z > 0 iff x > 0
    mean, var = bn_act.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, mean_ref, rtol=0, atol=1e-3)
    torch.testing.assert_close(var, var_ref, rtol=1e-4, atol=0)
