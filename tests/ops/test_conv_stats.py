"""The deferred BN + ReLU (prologue fusion): conv_bn_defer -> conv_bn_act(..., input_bn=) chains on every
backend against eager conv -> batch_norm -> relu -> conv -> ... and a float64 reference (outputs, every
gradient, both BNs' running statistics); the conv2d_stats op through opcheck and gradcheck; the blocks
taking the deferred path in training on Triton; fallbacks; bad input."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

import resnet_fused
from helpers import FORMATS, activation, assert_within_eager_error, backend_params, device_of, interpreted_triton, needs_extension
from decisions import clear_input
from resnet_fused import functional, reference

OPS = torch.ops.resnet_fused
# fp32 results are compared with eager fp32 (cuDNN) under the eager-error rule: both in IEEE fp32, TF32
# off (conftest.no_tf32); the Triton conv's TF32 path has its own bound in test_gpu_tf32.py
pytestmark = pytest.mark.usefixtures("no_tf32")

# chains of (Cout, kernel, stride, padding, groups); the last conv adds the residual and applies ReLU
BASIC = [(6, 3, 2, 1, 1), (6, 3, 1, 1, 1)]  # BasicBlock, stride 2, odd channels
BOTTLENECK = [(4, 1, 1, 0, 1), (4, 3, 1, 1, 2), (12, 1, 1, 0, 1)]  # grouped 3x3 (Triton: the fallback inside the op)


def make_params(cin, chain, dtype, device):
    params, c = [], cin
    for cout, k, _, _, g in chain:
        params.append(dict(
            w=(torch.randn(cout, c // g, k, k) / (c // g * k * k) ** 0.5).to(device, dtype),
            bw=(torch.rand(cout) + 0.5).to(device, dtype), bb=(torch.randn(cout) * 0.3).to(device, dtype),
            rm=(torch.randn(cout) * 0.3).to(device, dtype), rv=(torch.rand(cout) + 0.5).to(device, dtype)))
        c = cout
    return params


def fused_chain(x, params, chain, residual, backend):
    """conv_bn_defer for all but the last conv, each deferring its BN + ReLU to the next conv."""
    y, deferred = x, None
    for p, (_, _, s, pad, g) in zip(params[:-1], chain[:-1]):
        y, deferred = functional.conv_bn_defer(y, p["w"], p["rm"], p["rv"], p["bw"], p["bb"], s, pad, 1, g, 0.1, 1e-5,
                                               input_bn=deferred, backend=backend)
    p, (_, _, s, pad, g) = params[-1], chain[-1]
    return functional.conv_bn_act(y, p["w"], None, p["rm"], p["rv"], p["bw"], p["bb"], s, pad, 1, g, True, 0.1, 1e-5,
                                  residual, True, input_bn=deferred, backend=backend)


def eager_chain(x, params, chain, residual, backend=None):
    y = x
    for i, (p, (_, _, s, pad, g)) in enumerate(zip(params, chain)):
        y = F.batch_norm(F.conv2d(y, p["w"], None, s, pad, 1, g), p["rm"], p["rv"], p["bw"], p["bb"], True, 0.1, 1e-5)
        y = torch.relu(y + residual if i == len(chain) - 1 else y)
    return y


def results(fn, x, params, chain, residual, grad, backend, dtype=None):
    """[output, grad x, grad residual, per conv: grad w, grad bn weight, grad bn bias, running mean, var]."""
    def leaf(t):  # a fresh copy in `dtype`: every run starts from the same values and running statistics
        return t.detach().clone().to(dtype or t.dtype)

    x, residual = leaf(x).requires_grad_(), leaf(residual).requires_grad_()
    params = [{k: leaf(v).requires_grad_(k in ("w", "bw", "bb")) for k, v in p.items()} for p in params]
    out = fn(x, params, chain, residual, backend)
    out.backward(grad.to(out.dtype))
    res = [out.detach(), x.grad, residual.grad]
    for p in params:
        res += [p["w"].grad, p["bw"].grad, p["bb"].grad, p["rm"], p["rv"]]
    return res


def bn_grad_resolutions(x, params, chain, residual, grad, ulps=2.0):
    """{name: resolution} for every BN's grad weight (sum_i dy_i * xhat_i) and grad bias (sum_i dy_i): ulps x
    fp32 eps x sum_i |term_i| per channel, from the float64 eager chain (dy: the gradient at the BN's output)."""
    x, residual = x.detach().double(), residual.detach().double()
    params = [{k: v.detach().double() for k, v in p.items()} for p in params]
    y, seen = x, []
    for i, (p, (_, _, s, pad, g)) in enumerate(zip(params, chain)):
        conv = F.conv2d(y, p["w"], None, s, pad, 1, g)
        mean, var = conv.mean((0, 2, 3), keepdim=True), conv.var((0, 2, 3), unbiased=False, keepdim=True)
        xhat = ((conv - mean) / (var + 1e-5).sqrt()).requires_grad_()
        bn = xhat * p["bw"].view(1, -1, 1, 1) + p["bb"].view(1, -1, 1, 1)
        seen.append(xhat)
        y = torch.relu(bn + residual if i == len(chain) - 1 else bn)
    dxhat = torch.autograd.grad(y, seen, grad.double())
    eps, out = torch.finfo(torch.float32).eps, {}
    for i, (xhat, dx, p) in enumerate(zip(seen, dxhat, params)):
        dy = dx / p["bw"].view(1, -1, 1, 1)  # d loss / d (BN output)
        out[f"conv{i + 1} grad bn weight"] = ulps * eps * (dy * xhat).abs().sum((0, 2, 3))
        out[f"conv{i + 1} grad bn bias"] = ulps * eps * dy.abs().sum((0, 2, 3))
    return [out.get(n) for n in names(chain)]


def names(chain):
    return ["output", "grad input", "grad residual"] + [f"conv{i + 1} {n}" for i in range(len(chain)) for n in
                                                         ("grad weight", "grad bn weight", "grad bn bias", "running_mean",
                                                          "running_var")]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("chain", [BASIC, BOTTLENECK], ids=["basic", "bottleneck"])
def test_deferred_chain_matches_eager(backend, fmt, chain):
    """Every tensor within the eager-error rule against the float64 eager chain: fp32 elementwise (max
    norm); fp16 / bf16 in the 2-norm of each tensor, since there a single ReLU mask flip near zero decides
    one element's error against float64 (eager and fused each have theirs), while the 2-norm measures the
    arithmetic."""
    device = device_of(backend)
    low = torch.float16 if backend == "triton" and interpreted_triton() else torch.bfloat16
    for dtype in (torch.float32, low):
        torch.manual_seed(0)
        cin, H = 5, 9
        Ho = H
        for _, k, s, pad, _ in chain:
            Ho = (Ho + 2 * pad - k) // s + 1
        x = activation((2, cin, H, H), dtype, fmt, device)
        r = activation((2, chain[-1][0], Ho, Ho), dtype, fmt, device)
        params = make_params(cin, chain, dtype, device)
        grad = activation(r.shape, dtype, fmt, device)
        got = results(fused_chain, x, params, chain, r, grad, backend)
        ref = results(eager_chain, x, params, chain, r, grad, backend)
        exact = results(eager_chain, x, params, chain, r, grad, backend, torch.float64)
        norm = "max" if dtype == torch.float32 else "fro"
        # a BN's weight / bias gradient is a per-channel sum of N*H*W terms that cancel: in fp32 held to the
        # resolution of that sum (how eager's own conv backward rounds those terms is the machine's business)
        resolution = dict(zip(names(chain), bn_grad_resolutions(x, params, chain, r, grad))) if norm == "max" else {}
        for name, a, e, x64 in zip(names(chain), got, ref, exact):
            assert_within_eager_error(a, e, x64, f"{backend} {dtype} {name}", norm=norm, resolution=resolution.get(name))


def _conv2d_stats_cases(backend):
    """(input, weight, stride, padding, dilation, groups, backend[, prologue BN]) in both layouts."""
    device = device_of(backend)
    for fmt in FORMATS:
        def leaf(*shape, scale=1.0, offset=0.0):
            return (torch.randn(shape, device=device) * scale + offset).requires_grad_()

        x = activation((2, 4, 5, 5), torch.float32, fmt, device).requires_grad_()
        mean, var = torch.randn(4, device=device), torch.rand(4, device=device) + 0.5
        bw, bb = leaf(4, scale=0.5, offset=1.0), leaf(4)
        yield (x, leaf(6, 4, 3, 3, scale=0.2), [1, 1], [1, 1], [1, 1], 1, backend)
        yield (x, leaf(6, 4, 3, 3, scale=0.2), [2, 2], [1, 1], [1, 1], 1, backend, mean, var, bw, bb, 1e-3)
        yield (x, leaf(6, 4, 1, 1, scale=0.5), [1, 1], [0, 0], [1, 1], 1, backend, mean, var, None, None, 1e-5)
        yield (x, leaf(6, 2, 3, 3, scale=0.2), [1, 1], [1, 1], [1, 1], 2, backend, mean, var, bw, bb, 1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_conv2d_stats_matches_reference(backend):
    """The op's forward (y, mean, var) against reference.conv2d_stats in fp32 and in float64, every case."""
    for args in _conv2d_stats_cases(backend):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        geometry, prologue = args[2:6], args[7:]
        got = OPS.conv2d_stats(*args)
        ref = reference.conv2d_stats(*args[:2], *geometry, *prologue)
        x64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
        exact = reference.conv2d_stats(*x64[:2], *geometry, *x64[7:])
        for name, a, e, c in zip(("y", "mean", "var"), got, ref, exact):
            assert_within_eager_error(a, e, c, f"{backend} groups={args[5]} prologue={bool(prologue)} {name}")


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_conv2d_stats(backend):
    for args in _conv2d_stats_cases(backend):
        torch.library.opcheck(OPS.conv2d_stats, args)


def test_gradcheck_deferred_chain_float64():
    """The prologue backward (recomputed activation, BN backward through the deferred statistics) and
    the conv backward against finite differences."""
    x = activation((2, 3, 5, 5), torch.float64, torch.channels_last).requires_grad_()
    w1, w2 = (torch.randn(4, 3, 3, 3, dtype=torch.float64) / 5).requires_grad_(), (torch.randn(5, 4, 1, 1, dtype=torch.float64) / 2).requires_grad_()
    bw1, bb1 = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(4, dtype=torch.float64).requires_grad_()
    bw2, bb2 = (torch.rand(5, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(5, dtype=torch.float64).requires_grad_()

    def fn(x, w1, bw1, bb1, w2, bw2, bb2):
        y, d = functional.conv_bn_defer(x, w1, None, None, bw1, bb1, 1, 1)
        return functional.conv_bn_act(y, w2, None, None, None, bw2, bb2, training=True, act=None, input_bn=d)

    assert torch.autograd.gradcheck(fn, (x, w1, bw1, bb1, w2, bw2, bb2))


@needs_extension
def test_deferred_chain_compiles_fullgraph():
    torch.manual_seed(0)
    params = make_params(5, BASIC, torch.float32, "cpu")
    x, r = activation((2, 5, 9, 9), torch.float32, torch.channels_last), activation((2, 6, 5, 5), torch.float32, torch.channels_last)

    def fn(x, r):
        return fused_chain(x, params, BASIC, r, "cpu")

    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, r), fn(x, r))


@pytest.mark.parametrize("case", ["conv bias", "eval", "autocast"])
def test_deferred_input_falls_back_exactly(case):
    """Where the prologue does not apply, the deferred activation is written first and the ordinary path
    runs: bitwise the public composition that writes it (bn_act, whose statistics of y come from the same
    bn_stats as conv_bn_defer's, then conv_bn_act), running statistics included; and that composition's
    values are eager's, under the eager-error rule against float64 (autocast: its bf16 against eager's)."""
    torch.manual_seed(0)
    x = activation((2, 3, 6, 6), torch.float32, torch.channels_last)
    w1, w2, b2 = torch.randn(4, 3, 3, 3) / 5, torch.randn(5, 4, 3, 3) / 6, torch.randn(5)
    rm, rv = torch.randn(5) * 0.3, torch.rand(5) + 0.5
    y, d = functional.conv_bn_defer(x, w1, None, None, None, None, 1, 1)
    bias, training = (b2, True) if case == "conv bias" else (None, case != "eval")
    stats_got, stats_written, stats_eager, stats_exact = ((rm.clone(), rv.clone()) for _ in range(4))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        got = functional.conv_bn_act(y, w2, bias, *stats_got, None, None, 1, 1, training=training, input_bn=d)
        a = functional.bn_act(y, None, None, None, None, True, 0.1, 1e-5)
        written = functional.conv_bn_act(a, w2, bias, *stats_written, None, None, 1, 1, training=training)
        a_eager = torch.relu(F.batch_norm(F.conv2d(x, w1, None, 1, 1), None, None, None, None, True))
        eager = torch.relu(F.batch_norm(F.conv2d(a_eager, w2, bias, 1, 1), *stats_eager, None, None, training))
    x64, w1_64, w2_64 = x.double(), w1.double(), w2.double()
    if case == "autocast":  # the convolutions' operands as autocast rounds them
        x64, w1_64, w2_64 = (t.bfloat16().double() for t in (x, w1, w2))
    a64 = torch.relu(F.batch_norm(F.conv2d(x64, w1_64, None, 1, 1), None, None, None, None, True))
    if case == "autocast":
        a64 = a64.bfloat16().double()
    stats_exact = tuple(t.double() for t in stats_exact)
    y64 = F.conv2d(a64, w2_64, None if bias is None else bias.double(), 1, 1)
    if case == "autocast":  # autocast's conv writes bf16: batch norm sees (and takes its statistics of) those values
        y64 = y64.bfloat16().double()
    exact = torch.relu(F.batch_norm(y64, *stats_exact, None, None, training))
    assert got.dtype == written.dtype == eager.dtype
    torch.testing.assert_close(got, written, rtol=0, atol=0)
    for g, w in zip(stats_got, stats_written):  # training: the conv bias moves running_mean only
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # autocast: each side rounds its own fp32 activation to bf16 for the conv, one flip there moves a batch
    # statistic by ~a bf16 ulp of y: the 2-norm over all elements measures the arithmetic
    norm = "fro" if case == "autocast" else "max"
    assert_within_eager_error(written, eager, exact, f"{case} output", norm=norm)
    if case != "autocast":  # autocast: the statistics of two different bf16 roundings of y (bitwise checked above)
        for name, g, e, x64 in zip(("running_mean", "running_var"), stats_written, stats_eager, stats_exact):
            assert_within_eager_error(g, e, x64, f"{case} {name}")


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_blocks_defer_in_training_on_triton(block, monkeypatch):
    """Training on Triton runs the deferred data flow of DESIGN.md, and still matches torchvision's block."""
    if not resnet_fused.backends.available()["triton"]:
        pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")
    calls = []
    defer, with_stats = functional.conv_bn_defer, resnet_fused.ops.conv_stats.conv_with_stats
    monkeypatch.setattr(resnet_fused.nn.conv_bn, "conv_bn_defer",  # what the blocks call for the inner convs
                        lambda *a, **k: calls.append(k.get("input_bn")) or defer(*a, **k))
    monkeypatch.setattr(resnet_fused.ops.conv_bn_act, "conv_with_stats",  # conv_bn_act's conv_stats path (the last)
                        lambda *a: calls.append(a[7]) or with_stats(*a))
    check_deferred_block(block, "triton", calls)


@needs_extension
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_blocks_defer_on_the_cpu_when_the_variant_says_so(block, monkeypatch):
    """Variant(defer=True) (a tuner's candidate) runs the deferred data flow on a stage backend, whose rules keep it
    off on the CPU: the plan's stage ops (conv_bn_defer_stage for the inner convs, conv_bn_act_stage with the input
    BN for the last; on CUDA the cuDNN graphs' path, on the CPU their composite), the block still torchvision's."""
    calls = []
    plan = resnet_fused.nn.plan
    defer_stage, act_stage = plan._conv_bn_defer_stage, plan._conv_bn_act_stage
    monkeypatch.setattr(plan, "_conv_bn_defer_stage", lambda *a: calls.append(a[10] if len(a) > 10 else None) or defer_stage(*a))
    monkeypatch.setattr(plan, "_conv_bn_act_stage", lambda *a: calls.append(a[19] if len(a) > 19 else None) or act_stage(*a))
    with resnet_fused.backends.use_variant(resnet_fused.backends.Variant(defer=True)):
        check_deferred_block(block, "cpu", calls)


def _frozen_last_bn():
    block = torchvision.models.resnet.BasicBlock(8, 8).train()
    block.bn2.eval()  # bn1 in training, bn2 frozen: eager's mixed mode
    return block


def _biased_last_conv():
    block = torchvision.models.resnet.BasicBlock(8, 8)
    block.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=True)
    return block


@needs_extension
@pytest.mark.parametrize("make", [_frozen_last_bn, _biased_last_conv,
                                  lambda: torchvision.models.resnet.Bottleneck(16, 4, groups=2, base_width=64)],
                         ids=["frozen-last-bn", "biased-last-conv", "grouped"])
def test_blocks_the_deferred_plan_cannot_take_run_the_plain_one(make, monkeypatch):
    """Variant(defer=True) on a block the stage ops cannot defer (its last BN frozen, the last conv biased, grouped
    convs as ResNeXt's): the plain stages run (no conv_bn_defer_stage), and the step matches torchvision's block and
    its float64 twin, running statistics included."""
    plan = resnet_fused.nn.plan
    monkeypatch.setattr(plan, "_conv_bn_defer_stage", lambda *a: pytest.fail("deferred a block it cannot"))
    torch.manual_seed(0)
    eager = make()
    models = ((resnet_fused.fuse_(copy.deepcopy(eager), backend="cpu"), torch.float32), (eager, torch.float32),
              (copy.deepcopy(eager).double(), torch.float64))
    x = activation((2, eager.conv1.in_channels, 5, 5), torch.float32, torch.channels_last, "cpu")
    with torch.no_grad():
        grad = activation(copy.deepcopy(eager)(x).shape, torch.float32, torch.channels_last, "cpu")
    with resnet_fused.backends.use_variant(resnet_fused.backends.Variant(defer=True)):
        results = [results_of(model, x.to(dtype), grad.to(dtype), train=False) for model, dtype in models]
    for name, a, e, x64 in zip(("output", "grad input", "parameter grads", "running statistics"), *results):
        assert_within_eager_error(a, e, x64, f"{name}", norm="fro")


def check_deferred_block(block: str, backend: str, calls: list):
    """A fused block in training on `backend` takes the deferred path (`calls`: the input BN each conv was given, in
    order: none for the first, a deferred one for each other) and matches torchvision's block and its float64 twin."""
    device = device_of(backend)
    torch.manual_seed(0)
    eager = (torchvision.models.resnet.BasicBlock(8, 8) if block == "basic"
             else torchvision.models.resnet.Bottleneck(8, 2)).to(device, memory_format=torch.channels_last)
    fused = resnet_fused.fuse_(copy.deepcopy(eager), backend=backend)
    exact_model = copy.deepcopy(eager).double()  # before any step: all three start from the same buffers
    x = activation((2, 8, 5, 5), torch.float32, torch.channels_last, device)
    x = clear_input(eager, exact_model, x, training=True, what=block)  # no ReLU sign within rounding of 0
    grad = activation(x.shape, torch.float32, torch.channels_last, device)
    got = results_of(fused, x, grad)
    ref = results_of(eager, x, grad)
    exact = results_of(exact_model, x.double(), grad.double())
    assert len(calls) == (2 if block == "basic" else 3) and calls[0] is None and all(c is not None for c in calls[1:])
    for name, a, e, x64 in zip(("output", "grad input", "parameter grads", "running statistics"), got, ref, exact):
        assert_within_eager_error(a, e, x64, f"{block} {name}", norm="fro")
    counters = [[b.item() for b in m.buffers() if not b.is_floating_point()] for m in (fused, eager)]
    assert counters[0] == counters[1] == [1] * len(counters[0]), "num_batches_tracked: once per BN per step"


def results_of(model, x, grad, train: bool = True):
    """output, grad input, all parameter grads as one vector, all running statistics as one: single
    (C,) grads of a tiny block are a handful of rounding errors, and their ratios to eager's a coin toss
    (tests/nn/test_nn.py, Trio). train: the model put in training mode first (False: its modules' modes as set)."""
    if train:
        model.train()
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return [out.detach(), x.grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
            torch.cat([b.reshape(-1) for b in model.buffers() if b.is_floating_point()])]


def test_blocks_do_not_defer_on_cpu(monkeypatch):
    """On the CPU backend writing the activation once is as cheap as recomputing it: no deferral."""
    monkeypatch.setattr(functional, "conv_bn_defer", lambda *a, **k: pytest.fail("deferred on the cpu backend"))
    block = resnet_fused.fuse_(torchvision.models.resnet.BasicBlock(4, 4), backend="auto").train()
    block(torch.randn(2, 4, 5, 5)).sum().backward()


def test_bad_deferred_input():
    x = torch.randn(2, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    with pytest.raises(TypeError, match=r"`input_bn` must be the DeferredBnReLU that conv_bn_defer returned, got tuple"):
        functional.conv_bn_act(x, w, None, None, None, training=True, input_bn=(torch.zeros(4), torch.ones(4), None, None, 1e-5))
    bad = functional.DeferredBnReLU(torch.zeros(3), torch.ones(3), None, None, 1e-5)
    with pytest.raises(ValueError, match=r"expected `input_bn.mean` of shape \(4,\), one per channel of input \(2, 4, 5, 5\), got \(3,\)"):
        functional.conv_bn_act(x, w, None, None, None, training=True, input_bn=bad)
    with pytest.raises(ValueError, match=r"conv_bn_defer: `conv_weight` \(6, 3, 3, 3\) with groups=1 expects 3 input channels"):
        functional.conv_bn_defer(x, torch.randn(6, 3, 3, 3), None, None)
