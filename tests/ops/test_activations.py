"""Every activation through the fused ops: bn_act and conv_bn_act (train / eval, forward + backward)
against eager PyTorch in the same dtype and a float64 reference (the 2x-eager rule), the kernel ops
(bn_act_apply, act_backward) against aten's activations and their backward kernels, NaN / Inf and the
kinks, gradcheck in float64, FusedConvBNAct against its eager twin, and the spec's parsing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import (FORMATS, activation, assert_within_eager_error, backend_params, bn_act_backward_resolution, device_of,
                     interpreted_triton)
from resnet_fused import functional, reference
from resnet_fused.activations import ACTIVATIONS, Activation, activation as parse, module_activation
from resnet_fused.nn import FusedConvBNAct, FusedConvBNReLU
from resnet_fused.ops.kernels import kernels

ACTS = [Activation(n, 0.2 if n == "leaky_relu" else 0.0) for n in ACTIVATIONS]
ACT_IDS = [a.name for a in ACTS]
SHAPES = [(2, 5, 3, 3), (1, 3, 7, 7), (3, 20, 5, 7)]  # N=1, C=3, 7x7, non-powers of two, a vector tail
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cases(backend):
    if backend == "triton" and interpreted_triton():
        return SHAPES[:1], [torch.float32, torch.float16]  # the interpreter is slow
    return SHAPES, DTYPES


def _run(fn, inputs, training, act, cast=None, **kw):
    """Forward + backward of bn_act-like fn on fresh leaves: (out, grads, running_mean, running_var)."""
    x, residual, weight, bias, rm, rv, grad_out = (t if t is None or cast is None else t.to(cast) for t in inputs)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in
              dict(input=x, weight=weight, bias=bias, residual=residual).items() if v is not None}
    rm, rv = rm.clone(), rv.clone()
    out = fn(leaves["input"], rm, rv, leaves["weight"], leaves["bias"], training, 0.1, 1e-5, leaves.get("residual"), act, **kw)
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in leaves.items()}, rm, rv


def _inputs(shape, dtype, fmt, device, with_residual):
    C = shape[1]
    x = activation(shape, dtype, fmt, device, scale=2.0, offset=0.5)
    residual = activation(shape, dtype, fmt, device, scale=2.0) if with_residual else None
    return (x, residual, torch.randn(C, device=device), torch.randn(C, device=device), torch.randn(C, device=device) * 0.3,
            torch.rand(C, device=device) + 0.5, activation(shape, dtype, fmt, device))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_bn_act_every_activation(backend, act, training, fmt, poisoned):
    shapes, dtypes = _cases(backend)
    device = device_of(backend)
    for shape in shapes:
        for dtype in dtypes:
            for with_residual in (True, False):
                inputs = _inputs(shape, dtype, fmt, device, with_residual)
                fused = _run(functional.bn_act, inputs, training, act, backend=backend)
                eager = _run(reference.bn_act, inputs, training, act.module())
                exact = _run(reference.bn_act, inputs, training, act, cast=torch.float64)
                what = f"{backend} {act} {shape} {dtype} {'train' if training else 'eval'} residual={with_residual}"
                assert_within_eager_error(fused[0], eager[0], exact[0], f"{what} output")
                x, residual, weight, bias, rm, rv, grad_out = inputs
                resolution = bn_act_backward_resolution(x, residual, weight, bias, rm, rv, grad_out, act, training)
                for name in fused[1]:  # grad residual = dz, elementwise: the 2x rule alone
                    assert_within_eager_error(fused[1][name], eager[1][name], exact[1][name], f"{what} grad {name}",
                                              resolution=resolution.get(name))
                assert_within_eager_error(fused[2], eager[2], exact[2], f"{what} running_mean")


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_act_every_activation(backend, act, training):
    """The conv paths (training: conv then bn_act; eval: BN folded, then conv_act's epilogue or oneDNN's post-op)."""
    device = device_of(backend)
    for fmt in FORMATS:
        for with_residual in (True, False):
            x = activation((2, 6, 9, 7), torch.float32, fmt, device)
            w = torch.randn(10, 6, 3, 3, device=device) / 4
            r = activation((2, 10, 5, 4), torch.float32, fmt, device) if with_residual else None
            bw, bb, rm, rv = torch.randn(10, device=device), torch.randn(10, device=device), torch.randn(10, device=device), \
                torch.rand(10, device=device) + 0.5
            for grad in (True, False):  # eval without gradients takes the folded path
                def run(fn, dtype, module_act, **kw):
                    leaves = [t.detach().clone().to(dtype).requires_grad_(grad) for t in (x, w, bw, bb)]
                    res = r.to(dtype) if r is not None else None
                    with torch.set_grad_enabled(grad):
                        out = fn(leaves[0], leaves[1], None, rm.clone().to(dtype), rv.clone().to(dtype), leaves[2], leaves[3],
                                 2, 1, 1, 1, training, 0.1, 1e-5, res, module_act, **kw)
                    if not grad:
                        return [out]
                    out.backward(torch.ones_like(out) + out.detach().sin())  # one grad_output, a function of the output
                    return [out.detach()] + [t.grad for t in leaves]

                fused = run(functional.conv_bn_act, torch.float32, act, backend=backend)
                eager = run(reference.conv_bn_act, torch.float32, act.module())
                exact = run(reference.conv_bn_act, torch.float64, act)
                for i, (f, e, x64) in enumerate(zip(fused, eager, exact)):
                    assert_within_eager_error(f, e, x64, f"{backend} {act} train={training} grad={grad} residual="
                                                         f"{with_residual} {fmt} [{i}]", factor=2.5 if i else 2.0)


# values at and around every kink, the overflow points of exp / tanh, and the specials
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -3.0, 3.0, 6.0, -6.0, 1e-30, -1e-30, 2.9999998,
            -2.9999998, 5.9999995, 88.0, -88.0, 100.0, -100.0, 1e30, -1e30]


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # elementwise: both NaN, the same infinity, or within 1e-5 relative (fp32 formulas, denormals aside)
    a, b = a.double(), b.double()
    return (a.isnan() & b.isnan()) | (a == b) | ((a - b).abs() <= 1e-5 * b.abs() + 1e-30)


def _within_aten_error(got, fp32, fp64, magnitude) -> torch.Tensor:
    # elementwise, finite: no further from float64 than 2x aten's fp32, + an fp32 ulp of the terms' magnitude
    # (1 + erf(z) cancels in gelu's tail: both lose all but a few bits there)
    err, aten_err = (got.double() - fp64).abs(), (fp32.double() - fp64).abs()
    return err.isfinite() & (err <= 2 * aten_err + torch.finfo(torch.float32).eps * magnitude)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_kernel_ops_match_aten_at_specials(act, fmt):
    """bn_act_apply and act_backward on the CPU kernels against aten's activation and its backward kernel
    at the kinks, overflow points and specials (scale 1, shift 0: z is the value): each element equal to
    aten's in fp32 or in float64 (where aten's fp32 formula breaks: gelu(inf) is NaN through its vector
    erf; in gelu's tail 1 + erf cancels: there within 2x aten's fp32 error), NaN / Inf included. 64 channels: vector body and scalar tail."""
    k = kernels("cpu")
    values = torch.tensor(SPECIALS)
    z = values.repeat(64 * 4 // len(values) + 1)[: 64 * 4].view(4, 64, 1, 1).contiguous(memory_format=fmt)
    g = torch.linspace(0.5, 1.5, z.numel()).view_as(z).contiguous(memory_format=fmt)
    ones, zeros = torch.ones(64), torch.zeros(64)
    for what, got, fp32, fp64 in (
            ("forward", k.bn_act_apply(z, ones, zeros, None, act.name, act.alpha), act(z), act(z.double())),
            ("backward", k.act_backward(g, z, ones, zeros, None, act.name, act.alpha), act.backward(g, z),
             act.backward(g.double(), z.double()))):
        magnitude = 1 + z.double().abs() if what == "forward" else g.double().abs()
        bad = ~(_close(got, fp32) | _close(got, fp64) | _within_aten_error(got, fp32, fp64, magnitude))
        assert not bad.any(), (f"{act} {what} at z = {z[bad].tolist()}: got {got[bad].tolist()}, aten fp32 "
                               f"{fp32[bad].tolist()}, float64 {fp64[bad].tolist()}")


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_nan_propagates_through_bn_act(act):
    """A NaN in the input is NaN in the output, as torch's activation gives (batch statistics aside:
    eval mode, running statistics)."""
    x = activation((2, 4, 3, 3), torch.float32, torch.channels_last)
    x[1, 2, 1, 1] = float("nan")
    out = functional.bn_act(x, torch.zeros(4), torch.ones(4), torch.randn(4), torch.randn(4), False, act=act, backend="cpu")
    assert torch.isnan(out[1, 2, 1, 1]), f"{act}: NaN in, {out[1, 2, 1, 1].item()} out"
    assert torch.isnan(out).sum() == 1, f"{act}: a NaN spread to other elements"


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(act, training):
    x = activation((3, 4, 3, 2), torch.float64, torch.channels_last, scale=2.0).requires_grad_()
    r = activation((3, 4, 3, 2), torch.float64, torch.channels_last).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def fn(x, w, b, r):
        return functional.bn_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, r, act)

    assert torch.autograd.gradcheck(fn, (x, w, b, r))


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_fused_conv_bn_act_module_matches_eager(act):
    """FusedConvBNAct against nn.Sequential(conv, bn, act module) with the same parameters: training
    (output, every gradient, running statistics, num_batches_tracked) and eval."""
    torch.manual_seed(0)
    fused = FusedConvBNAct(5, 7, 3, stride=2, padding=1, act=act.module())
    with torch.no_grad():
        fused.bn.weight.uniform_(0.5, 1.5), fused.bn.bias.uniform_(-0.5, 0.5)
    eager = nn.Sequential(nn.Conv2d(5, 7, 3, 2, 1, bias=False), nn.BatchNorm2d(7), act.module())
    eager.load_state_dict({k.replace("conv.", "0.").replace("bn.", "1."): v for k, v in fused.state_dict().items()})
    exact = nn.Sequential(nn.Conv2d(5, 7, 3, 2, 1, bias=False), nn.BatchNorm2d(7), act.module()).double()
    exact.load_state_dict(eager.state_dict())
    x = activation((2, 5, 9, 8), torch.float32, torch.channels_last)
    g = activation((2, 7, 5, 4), torch.float32, torch.channels_last)
    for training in (True, False):
        results = []
        for m, dtype in ((fused, torch.float32), (eager, torch.float32), (exact, torch.float64)):
            m.train(training)
            xi = x.detach().to(dtype).requires_grad_()
            out = m(xi)
            out.backward(g.to(dtype))
            params = dict(m.named_parameters())
            results.append([out.detach(), xi.grad] + [p.grad.clone() for p in params.values()]
                           + [b.clone() for b in m.buffers()])
            m.zero_grad()
        for i, (f, e, x64) in enumerate(zip(*results)):
            if f.dtype == torch.int64:  # num_batches_tracked
                assert f.item() == e.item(), f"{act} training={training}: num_batches_tracked"
            else:
                assert_within_eager_error(f, e, x64, f"{act} training={training} [{i}]", factor=2.5)
    assert "act=" in repr(fused)


def test_fused_conv_bn_relu_keeps_its_flag():
    assert FusedConvBNReLU(3, 4, 3).act == Activation("relu") and FusedConvBNReLU(3, 4, 3).relu
    assert FusedConvBNReLU(3, 4, 3, relu=False).act.is_identity and not FusedConvBNReLU(3, 4, 3, relu=False).relu


def test_activation_spec_parsing():
    assert parse("silu") == Activation("silu") and parse(None).is_identity and parse(False).is_identity
    assert parse(True) == Activation("relu") and parse("leaky_relu") == Activation("leaky_relu", 0.01)
    assert parse(nn.LeakyReLU(0.3)) == Activation("leaky_relu", 0.3)
    assert parse(nn.GELU(approximate="tanh")) == Activation("gelu_tanh") and parse(nn.GELU()) == Activation("gelu")
    assert parse(nn.Hardtanh(0.0, 6.0)) == Activation("relu6") and parse(nn.ReLU6()) == Activation("relu6")
    assert parse(nn.Identity()).is_identity and parse(nn.ReLU(inplace=True)) == Activation("relu")
    assert module_activation(nn.PReLU()) is None and module_activation(nn.Hardtanh(-1.0, 1.0)) is None
    from transformers.activations import ACT2FN  # Hugging Face's modules: the same functions
    for name, spec in (("gelu", "gelu"), ("silu", "silu"), ("gelu_pytorch_tanh", "gelu_tanh"), ("linear", "none"),
                       ("relu", "relu"), ("relu6", "relu6")):
        z = torch.randn(50) * 4
        assert parse(ACT2FN[name]) == Activation(spec), name
        torch.testing.assert_close(ACT2FN[name](z), Activation(spec)(z))
    for act in ACTS:  # the eager module of each spec computes the spec's function
        z = torch.randn(50) * 4
        torch.testing.assert_close(act.module()(z), act(z))
        assert parse(act.module()) == (act if act.name != "leaky_relu" else Activation("leaky_relu", 0.2))


def test_unknown_activation_is_a_clear_error():
    x = activation((2, 3, 4, 4), torch.float32, torch.contiguous_format)
    with pytest.raises(ValueError, match="unknown activation 'swishy'; known: none, relu, relu6"):
        functional.bn_act(x, torch.zeros(3), torch.ones(3), act="swishy")
    with pytest.raises(ValueError, match="torch.nn.modules.activation.PReLU is not an activation the fused kernels"):
        functional.conv_bn_act(x, torch.randn(4, 3, 1, 1), None, None, None, training=True, act=nn.PReLU())
    with pytest.raises(TypeError, match="an activation is a name"):
        functional.bn_act(x, torch.zeros(3), torch.ones(3), act=3)
    # the kernel ops check the name too (a direct call, bypassing the public functions)
    with pytest.raises(RuntimeError, match="resnet_fused::bn_act_apply: unknown activation 'swishy'"):
        torch.ops.resnet_fused.bn_act_apply(x, torch.ones(3), torch.zeros(3), None, "swishy", 0.0)
    with pytest.raises(RuntimeError, match="resnet_fused::act_backward: unknown activation 'gelu_erf'"):
        torch.ops.resnet_fused.act_backward(x, x, torch.ones(3), torch.zeros(3), None, "gelu_erf", 0.0)


def test_leaky_relu_slope_reaches_the_kernel():
    x = -torch.rand(2, 4, 3, 3) - 0.1  # negative everywhere after a unit affine
    out = functional.bn_act(x, torch.zeros(4), torch.ones(4) - 1e-5, None, None, False, act=nn.LeakyReLU(0.37),
                            backend="cpu")
    torch.testing.assert_close(out, F.leaky_relu(x, 0.37), rtol=1e-5, atol=1e-6)
