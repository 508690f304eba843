"""Triton fused convolution (resnet_fused.triton.conv) vs float64 PyTorch, on tiny shapes.

Runs under TRITON_INTERPRET=1 on CPU (one fixed 32x16x16 tile, fp32 in IEEE), or on a GPU.
"""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

from helpers import INTERPRET, TRITON_DEVICE, assert_within_eager_error, round_to_tf32

if not (INTERPRET or torch.cuda.is_available()):
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from resnet_fused.triton import welford  # noqa: E402
from resnet_fused import reference  # noqa: E402
from resnet_fused.activations import ACTIVATIONS, Activation  # noqa: E402
from resnet_fused.triton import conv  # noqa: E402

DEVICE = TRITON_DEVICE
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
# name: (prologue: "relu" | "affine" | None, out scale/shift, residual, epilogue activation, stats)
FUSIONS = {
    "plain": (None, False, False, "none", False),
    "prologue_relu+stats": ("relu", False, False, "none", True),
    "epilogue+stats": (None, True, False, "relu", True),
    "all": ("affine", True, True, "relu", True),
}
# N = 1, Cin = 3 (gathered K), Cout = 5, 9x9, 3x3 stride 2 -> 5x5: the epilogue activation tests' geometry
ODD_GEOMETRY = (1, 3, 5, 9, 9, 3, 2, 1, 1)
# fp32 runs in IEEE fp32 in the interpreter; on a GPU in TF32 (~1e-3 relative, as cuDNN's default).


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


def _rand(gen, shape, dtype=torch.float32, fmt=NCHW, scale=1.0, offset=0.0):
    x = torch.randn(shape, generator=gen) * scale + offset  # never zero, never constant
    return x.to(DEVICE, dtype).contiguous(memory_format=fmt)


def _args(gen, geo, fusion, dtype, fmt):
    N, Cin, Cout, H, W, k, s, p, d = geo
    prologue, affine, residual, act, stats = fusion
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
        act=act, alpha=0.2 if act == "leaky_relu" else 0.0,  # a slope other than nn.LeakyReLU's default
        stats=stats,
    )


def _vec(v):
    return v.view(1, -1, 1, 1)


def _reference(a, compute_dtype, round_operands=None):
    """(out, acc): the op with the convolution in compute_dtype (float64: exact; x's dtype: eager;
    float64 with round_operands=helpers.round_to_tf32: eager TF32).

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
    x, w = x.to(a["input"].dtype), a["weight"]
    if round_operands is not None:  # what the MMA sees of its operands (TF32)
        x, w = round_operands(x), round_operands(w)
    acc = F.conv2d(x.to(compute_dtype), w.to(compute_dtype), None, a["stride"], a["padding"], a["dilation"])
    epi = torch.float64 if compute_dtype == torch.float64 else torch.float32
    y = acc.to(epi)
    if a["out_scale"] is not None:
        y = y * _vec(a["out_scale"].to(epi)) + _vec(a["out_shift"].to(epi))
    if a["residual"] is not None:
        y = y + a["residual"].to(epi)
    return Activation(a["act"], a["alpha"])(y), acc


def _tf32(a) -> bool:
    """The conv runs fp32 in TF32: on a GPU, when torch.backends.cudnn.allow_tf32 (never in the interpreter)."""
    return a["input"].dtype == torch.float32 and not INTERPRET and torch.backends.cudnn.allow_tf32


def _check(a):
    out, mean, var = conv.fused_conv(**a)
    exact, acc = _reference(a, torch.float64)
    assert out.shape == exact.shape and out.dtype == a["input"].dtype and out.is_contiguous(memory_format=CL)
    assert not torch.isnan(out).any(), "an output element was left unwritten"
    # at most ~2x eager's error (+ one ulp), eager = F.conv2d in the input's dtype; fp32 under TF32 (a GPU
    # with torch.backends.cudnn.allow_tf32, which the conv follows): eager = a TF32 convolution, operands
    # rounded to TF32 and exact products (helpers.round_to_tf32), whatever algorithm cuDNN would pick
    if _tf32(a):
        eager, eager_acc = _reference(a, torch.float64, round_operands=round_to_tf32)
        eager, eager_acc = eager.to(out.dtype), eager_acc.float()
    else:
        eager, eager_acc = _reference(a, a["input"].dtype)
        eager = eager.to(out.dtype)
    assert_within_eager_error(out, eager, exact, "out")
    if a["stats"]:
        # eager: torch.var_mean of eager's conv output (in the input's dtype), in fp32
        exact_var, exact_mean = torch.var_mean(acc, (0, 2, 3), correction=0)
        eager_var, eager_mean = torch.var_mean(eager_acc.float(), (0, 2, 3), correction=0)
        assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == exact_mean.shape
        # resolution: the statistics are sums (merged per tile in fp32): a few ulps of their terms' size,
        # mean |acc| for the mean and the variance itself (a sum of squares) for the variance
        eps = torch.finfo(torch.float32).eps
        assert_within_eager_error(mean, eager_mean, exact_mean, "mean", resolution=16 * eps * acc.abs().mean((0, 2, 3)))
        assert_within_eager_error(var, eager_var, exact_var, "var", resolution=16 * eps * exact_var)
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
    a = _args(gen, GEOMETRIES["3x3s1p1"], FUSIONS["plain"], torch.float32, CL)
    Cin = a["input"].shape[1]
    a.update(in_scale=_rand(gen, (Cin,)), in_shift=_rand(gen, (Cin,), scale=0.1, offset=2.0), in_relu=in_relu)
    out = _check(a)
    # the wrong answer: pad first, then transform the padding too
    x = F.pad(a["input"].float(), (1, 1, 1, 1)) * _vec(a["in_scale"]) + _vec(a["in_shift"])
    wrong = F.conv2d(torch.relu(x) if in_relu else x, a["weight"].float())
    assert (out - wrong).abs().max() > 1.0  # the test can tell the two apart


@pytest.mark.parametrize("tile", [(16, 32, 32), (64, 64, 32)], ids=["16x32x32", "64x64x32"])
def test_other_tiles(gen, tile, monkeypatch):
    """Other tile shapes: several stats row tiles per config (merged over a tree of 2-row programs),
    gathered K blocks spanning taps."""
    monkeypatch.setattr(conv._conv, "configs", [conv._config(*tile, 4, 2)])
    monkeypatch.setattr(welford, "MERGE_ROWS", 2)
    for name in ("3x3s2p1", "7x7s2p3", "3x3d2p2"):
        _check(_args(gen, GEOMETRIES[name], FUSIONS["all"], torch.float32, CL))


def test_stats_large_mean(gen, monkeypatch):
    """|mean| >> std of the conv output: per-tile centred M2 + Chan keeps the variance exact-ish."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # GPU: IEEE fp32, TF32 would quantize x
    a = _args(gen, (2, 16, 8, 8, 8, 1, 1, 0, 1), FUSIONS["epilogue+stats"], torch.float32, CL)
    a["input"] = _rand(gen, (2, 16, 8, 8), fmt=CL, scale=0.1, offset=100.0)
    a["weight"] = _rand(gen, (8, 16, 1, 1), offset=1.0)
    _, mean, var = conv.fused_conv(**a)
    _, acc = _reference(a, torch.float64)
    assert (acc.mean((0, 2, 3)).abs() > 100 * acc.std((0, 2, 3))).all()  # the regime under test
    torch.testing.assert_close(mean.double(), acc.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), acc.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("stats", [False, True])
def test_empty(stats):
    x, w = torch.empty((0, 3, 8, 8), device=DEVICE), torch.ones((4, 3, 3, 3), device=DEVICE)
    out, mean, var = conv.fused_conv(x, w, (2, 2), (1, 1), (1, 1), None, None, False, None, None, None, "relu", 0.0, stats)
    assert out.shape == (0, 4, 4, 4) and out.is_contiguous(memory_format=CL)
    for t in (mean, var):
        assert t.dtype == torch.float32 and t.shape == ((4,) if stats else (0,)) and not t.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the interpreter: GPU only")
@pytest.mark.parametrize("geo", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_conv_bf16(gen, geo):
    _check(_args(gen, geo, FUSIONS["all"], torch.bfloat16, CL))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("where", ["prologue", "epilogue"])
def test_relu_keeps_nan_and_inf(gen, where):
    """relu is torch.relu: NaN stays NaN (tl.maximum would return 0), +Inf stays, -Inf becomes 0; in the
    prologue (NaN / Inf in x) and in the epilogue (in the residual). Against resnet_fused.reference."""
    a = _args(gen, GEOMETRIES["3x3s1p1"], FUSIONS["plain"], torch.float32, CL)
    N, Cin, H, W = a["input"].shape
    Cout = a["weight"].shape[0]
    special = torch.tensor([float("nan"), float("inf"), -float("inf")], device=DEVICE)
    if where == "prologue":
        a.update(in_scale=_rand(gen, (Cin,)).abs() + 0.5, in_shift=_rand(gen, (Cin,)), in_relu=True)
        a["input"][0, [1, 5, 9], [0, 3, 6], [2, 4, 7]] = special  # three pixels, far enough apart
        x = reference.bn_act_apply(a["input"], a["in_scale"], a["in_shift"], None, "relu", 0.0)
        acc = F.conv2d(x.double(), a["weight"].double(), None, 1, 1)
        exact = acc
    else:
        a.update(out_scale=_rand(gen, (Cout,)), out_shift=_rand(gen, (Cout,)), act="relu",
                 residual=_rand(gen, (N, Cout, H, W), fmt=CL))
        a["residual"][0, [1, 2, 3], [0, 3, 6], [2, 4, 7]] = special
        acc = F.conv2d(a["input"].double(), a["weight"].double(), None, 1, 1)
        exact = reference.bn_act_apply(acc, a["out_scale"], a["out_shift"], a["residual"], "relu", 0.0)
    out, _, _ = conv.fused_conv(**a)
    assert exact.isnan().any() and exact.isinf().any()  # the test has both to get right
    assert torch.equal(out.isnan(), exact.isnan()) and torch.equal(out.isinf(), exact.isinf()), "NaN / Inf moved"
    assert torch.equal(out[exact.isinf()].double(), exact[exact.isinf()]), "infinities of the wrong sign"
    # the finite rest under the eager-error rule (eager: the same composition in fp32, IEEE in the interpreter)
    finite = exact.isfinite()
    if where == "prologue":
        eager_acc = F.conv2d(x.float(), a["weight"].float(), None, 1, 1)
        eager = eager_acc
    else:
        eager_acc = F.conv2d(a["input"].float(), a["weight"].float(), None, 1, 1)
        eager = reference.bn_act_apply(eager_acc, a["out_scale"], a["out_shift"], a["residual"], "relu", 0.0)
    assert_within_eager_error(out[finite], eager[finite].to(out.dtype), exact[finite], f"{where} finite outputs")



@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_epilogue_activations(gen, act, dtype, fmt, residual):
    """Every activation in the epilogue, act(acc * out_scale + out_shift (+ residual)), at most ~2x eager's
    error (F.conv2d in the input's dtype, then the epilogue in fp32) against float64; N = 1, Cin = 3,
    Cout = 5, 9x9, stride 2. |z| reaches ~10: every branch (ReLU6's 6, Hardswish's +-3) is taken."""
    _check(_args(gen, ODD_GEOMETRY, (None, True, residual, act, False), dtype, fmt))


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_epilogue_activations_keep_nan(gen, act):
    """A NaN in the residual gives NaN out, and only there, whatever the activation (no clamp drops it)."""
    a = _args(gen, ODD_GEOMETRY, (None, True, True, act, False), torch.float32, CL)
    a["residual"][0, [0, 2, 4], [0, 2, 4], [1, 3, 0]] = float("nan")
    out, _, _ = conv.fused_conv(**a)
    assert torch.equal(out.isnan(), a["residual"].isnan())

def _b_matrix(w):
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0])


def test_weight_matrix_is_cached_per_weight_and_version(gen):
    """B is made once per weight, and again after an in-place update or a re-pointed .data."""
    w = torch.nn.Parameter(_rand(gen, (8, 16, 3, 3)))
    b = conv._weight_matrix(w)
    assert conv._weight_matrix(w) is b and torch.equal(b, _b_matrix(w)) and not b.requires_grad
    with torch.no_grad():
        w.mul_(2)  # a new _version
    b2 = conv._weight_matrix(w)
    assert b2 is not b and torch.equal(b2, _b_matrix(w))
    w.data = w.data * 3  # a new storage, the version counter untouched
    b3 = conv._weight_matrix(w)
    assert b3 is not b2 and torch.equal(b3, _b_matrix(w))
    other = w.detach().clone()  # equal values, another tensor: its own entry
    assert conv._weight_matrix(other) is not b3 and conv._weight_matrix(w) is b3


def test_weight_cache_entries_die_with_their_weights(gen):
    w = torch.nn.Parameter(_rand(gen, (8, 16, 3, 3)))
    conv._weight_matrix(w)
    n, ref = len(conv._B_CACHE), weakref.ref(w)
    del w
    gc.collect()
    assert ref() is None and len(conv._B_CACHE) == n - 1


def test_weight_cache_skipped_under_tracing(gen, monkeypatch):
    """No entries for fake tensors, inference tensors (no version counter), or under torch.compile."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = _rand(gen, (8, 16, 3, 3))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(w)
    with torch.inference_mode():
        frozen = w.clone()
    assert not conv._cacheable(fake) and not conv._cacheable(frozen) and conv._cacheable(w)
    n = len(conv._B_CACHE)
    assert torch.equal(conv._weight_matrix(frozen), _b_matrix(w)) and len(conv._B_CACHE) == n
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not conv._cacheable(w)


def test_conv_follows_in_place_weight_updates(gen):
    """An optimizer step (in place, under no_grad) between two calls: the second uses the new weight."""
    a = _args(gen, GEOMETRIES["3x3s2p1"], FUSIONS["epilogue+stats"], torch.float32, NCHW)
    a["weight"] = torch.nn.Parameter(a["weight"])
    _check(a)
    with torch.no_grad():
        a["weight"].sub_(0.3 * torch.sign(a["weight"]))
    _check(a)


@pytest.mark.parametrize("rows", [None, 8], ids=["default", "tree"])
def test_merge_stats(gen, rows, monkeypatch):
    """The statistics merge against float64 Chan: 1000 partial rows of ragged counts, |mean| >> std,
    40 channels (a ragged channel block); with 8 rows per program a 4-level tree (1000, 125, 16, 2)."""
    if rows is not None:
        monkeypatch.setattr(welford, "MERGE_ROWS", rows)
    R, C = 1000, 40
    count = torch.randint(1, 129, (R, C), generator=gen).double()
    mean = 100 + torch.randn((R, C), generator=gen, dtype=torch.float64)
    m2 = torch.rand((R, C), generator=gen, dtype=torch.float64) * count
    partials = torch.stack([count, mean, m2]).float()
    pad = torch.full((3, 5, C), float("nan"))  # rows past R are never read
    got_mean, got_var = welford.merge_stats(torch.cat([partials, pad], 1).to(DEVICE), R)
    count, mean, m2 = partials.double()
    n = count.sum(0)
    exact_mean = (count * mean).sum(0) / n
    exact_var = (m2 + count * (mean - exact_mean) ** 2).sum(0) / n
    assert got_mean.untyped_storage().data_ptr() != got_var.untyped_storage().data_ptr()  # op outputs: no aliases
    torch.testing.assert_close(got_mean.double().cpu(), exact_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_var.double().cpu(), exact_var, rtol=1e-4, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner times configs on a GPU only")
def test_autotune_key_buckets_m(gen):
    """M = 147 and 245 share the bucket 256: the second call reuses the first's config (no tuning)."""
    before = len(conv._conv.cache)
    for n in (3, 5):
        _check(_args(gen, (n, 16, 8, 7, 7, 3, 1, 1, 1), FUSIONS["plain"], torch.float16, CL))
    assert len(conv._conv.cache) == before + 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner times configs on a GPU only")
def test_autotune_key_covers_the_fusion(gen):
    """One geometry under each fusion is tuned once per fusion: "prologue_relu+stats" and "epilogue+stats"
    pass the same dtypes (two fp32 vectors and three fp32 partials) and differ only in which operands;
    "epilogue+stats" with SiLU differs from it only in the activation."""
    before = len(conv._conv.cache)
    for fusion in [*FUSIONS.values(), (None, True, False, "silu", True)]:
        _check(_args(gen, (1, 16, 24, 9, 9, 3, 1, 1, 1), fusion, torch.float16, CL))  # Cout 24: no other test's key
    assert len(conv._conv.cache) == before + len(FUSIONS) + 1


def test_autotune_key_covers_the_activation(gen, monkeypatch):
    """The epilogue activation is part of the autotune key (its code changes the kernel's registers and
    time); its parameter alpha is not. Two configs and a stand-in for the timing, so that the autotuner
    keys its cache here too (the interpreter has one config: nothing is tuned)."""
    configs = [conv._config(32, 16, 16, 4, 1), conv._config(16, 16, 16, 4, 1)]
    monkeypatch.setattr(conv._conv, "configs", configs)
    monkeypatch.setattr(conv._conv, "cache", {})
    monkeypatch.setattr(conv._conv, "_bench", lambda *args, config, **kwargs: [float(configs.index(config))])
    for act, alpha, entries in [("relu", 0.0, 1), ("silu", 0.0, 2), ("leaky_relu", 0.1, 3), ("leaky_relu", 0.3, 3),
                                ("relu", 0.0, 3)]:
        _check(_args(gen, ODD_GEOMETRY, (None, True, False, act, False), torch.float32, CL) | dict(alpha=alpha))
        assert len(conv._conv.cache) == entries, (act, alpha)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_input_device(gen):
    """Triton launches on the current device: the launcher makes it the input's."""
    a = _args(gen, GEOMETRIES["3x3s1p1"], FUSIONS["all"], torch.float16, CL)
    a = {k: v.to("cuda:1") if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    with torch.cuda.device(0):
        _check(a)


def test_autotune_off_keeps_one_config(monkeypatch):
    """RESNET_FUSED_TRITON_AUTOTUNE=0 (the GPU test runs): the first fitting config only, no timing."""
    from resnet_fused.triton import conv

    nargs = {"x_ptr": torch.empty(1, dtype=torch.float16)}
    all_fitting = conv._prune(conv._CONFIGS + conv._FMA_CONFIGS, nargs, DOT_PRECISION="tf32")
    assert len(all_fitting) > 1
    monkeypatch.setenv("RESNET_FUSED_TRITON_AUTOTUNE", "0")
    assert conv._prune(conv._CONFIGS + conv._FMA_CONFIGS, nargs, DOT_PRECISION="tf32") == all_fitting[:1]


@pytest.mark.parametrize("mode", ["eval_epilogue", "prologue_stats", "plain_stats"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "cl"])
def test_opcheck_triton_conv_bn_act(gen, mode, fmt):
    """torch.ops.resnet_fused.triton_conv_bn_act through opcheck in each of its modes: the eval epilogue
    (out_scale / out_shift / residual / an activation with its parameter, no statistics: conv_bn_act's inference path), the
    training prologue (in_scale / in_shift / in_relu, with statistics: conv2d_stats after a deferred
    BN + ReLU), plain with statistics. Odd channel counts, stride 2, the residual in the other layout."""
    fusion = {"eval_epilogue": (None, True, True, "leaky_relu", False), "prologue_stats": ("affine", False, False, "none", True),
              "plain_stats": (None, False, False, "none", True)}[mode]
    a = _args(gen, GEOMETRIES["3x3s2p1"] if mode != "prologue_stats" else GEOMETRIES["1x1s2"], fusion, torch.float32, fmt)
    if mode == "prologue_stats":
        a["in_relu"] = True
    order = ("input", "weight", "stride", "padding", "dilation", "in_scale", "in_shift", "in_relu", "out_scale", "out_shift",
             "residual", "act", "alpha", "stats")
    args = tuple(list(a[k]) if k in ("stride", "padding", "dilation") else a[k] for k in order)
    torch.library.opcheck(torch.ops.resnet_fused.triton_conv_bn_act, args)


def test_max_configs_keeps_the_tiles_that_pad_the_shape_least(monkeypatch):
    """RESNET_FUSED_TRITON_MAX_CONFIGS=3 (gpu_check.sh check): the three configs whose tiles round M,
    Cout and K up least, in list order among equals."""
    from resnet_fused.triton import conv

    configs = conv._CONFIGS + conv._FMA_CONFIGS

    def prune(M, Cout, Cin, k=1, **env):
        nargs = {"x_ptr": torch.empty(1, dtype=torch.float16), "M": M, "Cout": Cout, "Cin": Cin}
        return conv._prune(configs, nargs, DOT_PRECISION="tf32", KH=k, KW=k, GATHER_K=Cin < 16)

    fitting = prune(256 * 56 * 56, 256, 64)
    monkeypatch.setenv("RESNET_FUSED_TRITON_MAX_CONFIGS", "3")
    assert prune(256 * 56 * 56, 256, 64) == fitting[:3]  # nothing padded: the list's first three
    assert [c.kwargs["BLOCK_N"] for c in prune(256 * 56 * 56, 64, 256)] == [64, 64, 64]  # Cout 64
    assert [c.kwargs["BLOCK_M"] for c in prune(49, 512, 512, 3)] == [64, 64, 64]  # batch 1, 7x7
    stem = prune(256 * 112 * 112, 64, 3, 7)  # gathered K = 147: 64-column tiles, BLOCK_K 64 (192) in all
    assert [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) for c in stem] == [(64, 64)] * 3
