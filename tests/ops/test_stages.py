"""The stage ops (csrc/bn_act_stage.cpp, conv_bn_act_stage.cpp): one C++ op call per fused stage on the cpu
backend, with its autograd, checks and running-statistics update in C++. Against F.batch_norm / F.conv2d in
float64 under the eager-error rule, opcheck (schema, autograd registration, fake, AOT dispatch with dynamic
shapes), the C++ errors, and how many ops a fused block's training step dispatches from Python."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.profiler import profile

import resnet_fused
from resnet_fused import reference
from resnet_fused.ops import onednn
from helpers import CL, NCHW, activation, assert_within_eager_error, backend_params

OPS = torch.ops.resnet_fused
ACTS = {"relu": torch.relu, "none": lambda t: t, "silu": F.silu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2)}
pytestmark = pytest.mark.skipif(not resnet_fused.backends.has_extension(), reason="needs resnet_fused._C")


def _bn_args(C, dtype=torch.float32, requires_grad=True):
    w = (torch.rand(C) + 0.5).requires_grad_(requires_grad)
    b = torch.randn(C).requires_grad_(requires_grad)
    return w, b, torch.randn(C) * 0.1, torch.rand(C) + 0.5


def _eager_bn_act(x, w, b, rm, rv, r, training, momentum, act_fn):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, 1e-5)
    return act_fn(y + r if r is not None else y)


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ["relu", "none", "silu", "leaky_relu"])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_act_stage_matches_batch_norm(fmt, training, act, residual, dtype):
    """Output, every gradient and the running statistics against F.batch_norm in float64 (eager in `dtype`
    sets the error allowed); momentum given as a 0-dim tensor (nn.BatchNorm2d's momentum=None) in eval rounds."""
    shape = (3, 6, 5, 7)
    x = activation(shape, dtype, fmt).requires_grad_()
    r = activation(shape, dtype, fmt).requires_grad_() if residual else None
    w, b, rm, rv = _bn_args(shape[1])
    grad = torch.randn(shape, dtype=dtype)
    alpha = 0.2 if act == "leaky_relu" else 0.0
    momentum = 0.1 if training else torch.tensor(0.25)
    ref_rm, ref_rv = rm.double(), rv.double()
    eager_rm, eager_rv = rm.clone(), rv.clone()
    mom_args = (0.0, momentum) if isinstance(momentum, torch.Tensor) else (momentum, None)
    out = OPS.bn_act_stage(x, w, b, rm, rv, r, training, *mom_args, 1e-5, act, alpha)
    grads = torch.autograd.grad(out, [t for t in (x, w, b, r) if t is not None], grad)

    m = float(momentum)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b) + ((r,) if r is not None else ())]
    exact = _eager_bn_act(*leaves64[:3], ref_rm, ref_rv, leaves64[3] if residual else None, training, m, ACTS[act])
    exact_grads = torch.autograd.grad(exact, leaves64, grad.double())
    # eager in `dtype`: F.batch_norm takes fp32 parameters and statistics with bf16 activations
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) + ((r,) if r is not None else ())]
    eager = _eager_bn_act(*leaves[:3], eager_rm, eager_rv, leaves[3] if residual else None, training, m, ACTS[act])
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    assert out.dtype == dtype and not out.isnan().any()
    assert_within_eager_error(out, eager, exact, "out")
    for name, got, e, ex in zip(("input", "weight", "bias", "residual"), grads, eager_grads, exact_grads):
        assert_within_eager_error(got, e, ex, f"grad {name}", factor=3.0)
    assert_within_eager_error(rm, eager_rm, ref_rm, "running_mean")
    assert_within_eager_error(rv, eager_rv, ref_rv, "running_var")


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("training", [True, False])
def test_conv_bn_act_stage_matches_eager(fmt, training):
    """conv2d (stride 2, 7x7 input, non-power-of-two channels) -> BN -> + residual -> ReLU, and its gradients."""
    x = activation((2, 5, 7, 7), torch.float32, fmt).requires_grad_()
    cw = torch.randn(6, 5, 3, 3, requires_grad=True)
    cb = torch.randn(6, requires_grad=True)
    w, b, rm, rv = _bn_args(6)
    r = activation((2, 6, 4, 4), torch.float32, fmt).requires_grad_()
    grad = torch.randn(2, 6, 4, 4)
    eager_rm, eager_rv = rm.clone(), rv.clone()
    rm0, rv0 = rm.double(), rv.double()  # what eval normalizes with
    out = OPS.conv_bn_act_stage(x, cw, cb, w, b, rm, rv, r, [2, 2], [1, 1], [1, 1], 1, training, 0.1, None, 1e-5, "relu", 0.0)
    got = torch.autograd.grad(out, (x, cw, cb, w, b, r), grad)

    def eager_fn(x, cw, cb, w, b, r, rm, rv):
        return torch.relu(F.batch_norm(F.conv2d(x, cw, cb, 2, 1), rm, rv, w, b, training, 0.1, 1e-5) + r)

    leaves = [t.detach().clone().requires_grad_() for t in (x, cw, cb, w, b, r)]
    eager = eager_fn(*leaves, eager_rm, eager_rv)
    eager_grads = torch.autograd.grad(eager, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, cw, cb, w, b, r)]
    exact = eager_fn(*leaves64, rm0, rv0)
    exact_grads = torch.autograd.grad(exact, leaves64, grad.double())
    assert_within_eager_error(out, eager, exact, "out")
    for name, g, e, ex in zip(("input", "conv_weight", "conv_bias", "bn_weight", "bn_bias", "residual"), got, eager_grads,
                              exact_grads):
        assert_within_eager_error(g, e, ex, f"grad {name}", factor=3.0)
    torch.testing.assert_close(rm, eager_rm)
    torch.testing.assert_close(rv, eager_rv)


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not resnet_fused.backends.available()["cuda"], reason="needs a CUDA GPU and the extension built with CUDA"))])
def test_bn_act_backward_matches_autograd(fmt, training, relu, dtype, device):
    """bn_act_backward (one call: reduction, coefficients, elementwise pass) against autograd through F.batch_norm (+ ReLU)
    in float64, the same graph in `dtype` setting the error allowed; the outputs not asked for are empty."""
    shape = (3, 6, 5, 7)
    x = activation(shape, dtype, fmt, device)
    w, b, rm, rv = (t.to(device) for t in _bn_args(shape[1], requires_grad=False))
    grad = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)

    def autograd_grads(x, w, b):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        y = F.batch_norm(leaves[0], None if training else rm.to(w.dtype), None if training else rv.to(w.dtype), leaves[1],
                         leaves[2], training, 0.0, 1e-5)
        out = torch.relu(y) if relu else y
        return out.detach(), torch.autograd.grad(out, leaves, grad.to(out.dtype))

    exact_out, exact = autograd_grads(x.double(), w.double(), b.double())
    eager_out, eager = autograd_grads(x, w, b)
    if training:
        mean, var = x.double().mean((0, 2, 3)).float(), x.double().var((0, 2, 3), unbiased=False).float()
    else:
        mean, var = rm, rv
    output = eager_out if relu else None
    got = OPS.bn_act_backward(grad, x, mean, var, w, output, 1e-5, training, True, True, True)
    assert got[0].dtype == dtype and got[0].is_contiguous(memory_format=fmt)
    for name, g, e, ex in zip(("input", "weight", "bias"), got, eager, exact):
        assert_within_eager_error(g.to(e.dtype), e, ex, f"grad {name}", factor=3.0)
    dy = grad * (output > 0) if relu else grad
    torch.testing.assert_close(got[3], dy, rtol=0, atol=0)  # grad_residual = dy, exactly
    none = OPS.bn_act_backward(grad, x, mean, var, w, output, 1e-5, training, False, False, False)
    assert none[0].numel() == 0 and none[3].numel() == 0
    assert (none[1].numel() == 0) == (not training)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("weight", [True, False])
def test_bn_act_backward_reference_is_autograd(training, relu, weight):
    """reference.bn_act_backward, the spec of the op, against autograd through F.batch_norm (+ ReLU) in float64 (N = 1,
    odd sizes); every subset of the outputs asked for gives the same values, the others empty."""
    shape = (1, 5, 3, 7)
    x = activation(shape, torch.float64, NCHW)
    w, b, rm, rv = (t.double() for t in _bn_args(shape[1], requires_grad=False))
    grad = torch.randn(shape, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = F.batch_norm(leaves[0], None if training else rm, None if training else rv, leaves[1] if weight else None, leaves[2],
                     training, 0.0, 1e-5)
    out = torch.relu(y) if relu else y
    want = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    mean, var = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)) if training else (rm, rv)
    output = out.detach() if relu else None
    for needs in ((True, True, True), (True, False, False), (False, True, False), (False, False, True)):
        got = reference.bn_act_backward(grad, x, mean, var, w if weight else None, output, 1e-5, training, *needs)
        assert (got[0].numel() > 0) == needs[0] and (got[3].numel() > 0) == needs[2]
        assert (got[1].numel() > 0) == (training or needs[1])
        if needs[0]:
            torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
        if training or needs[1]:
            if weight:
                torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-12)
        if needs[2]:
            torch.testing.assert_close(got[3], grad * (output > 0) if relu else grad, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not resnet_fused.backends.available()["cuda"], reason="needs a CUDA GPU and the extension built with CUDA"))])
def test_stage_kernels_match_reference(fmt, dtype, device):
    """bn_act_batch, bn_act_running and bn_act_backward (the C++ kernels, no autograd) against their references in
    float64 (reference.py), eager's error in `dtype` setting the bound; the backward with the same grad_output."""
    shape = (2, 6, 5, 3)
    x = activation(shape, dtype, fmt, device)
    r = activation(shape, dtype, fmt, device)
    w, b, rm, rv = (t.to(device) for t in _bn_args(shape[1], requires_grad=False))
    grad = torch.randn(shape, dtype=dtype, device=device).contiguous(memory_format=fmt)
    x64, r64, g64 = x.double(), r.double(), grad.double()

    out, mean, var = OPS.bn_act_batch(x, w, b, r, 1e-5, "silu", 0.0)
    exact, exact_mean, exact_var = reference.bn_act_batch(x64, w, b, r64, 1e-5, "silu", 0.0)
    eager = F.silu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5) + r)
    assert out.is_contiguous(memory_format=fmt) and mean.dtype == var.dtype == torch.float32
    assert_within_eager_error(out, eager, exact, "bn_act_batch out")
    torch.testing.assert_close(mean, exact_mean.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, exact_var.float(), rtol=1e-5, atol=1e-6)

    # the running update in the op: a momentum, then nn.BatchNorm2d's momentum=None (1 / num_batches_tracked, counted
    # first); the counter's version moves (fold caches read it)
    for momentum in (0.1, None):
        got_rm, got_rv, want_rm, want_rv = rm.clone(), rv.clone(), rm.clone(), rv.clone()
        got_n, want_n = torch.tensor(3, device=device), torch.tensor(3, device=device)
        version = got_n._version
        OPS.bn_act_batch(x, w, b, r, 1e-5, "silu", 0.0, None, None, got_rm, got_rv, momentum, None, got_n)
        reference.bn_act_batch(x64, w, b, r64, 1e-5, "silu", 0.0, None, None, want_rm, want_rv, momentum, None, want_n)
        assert got_n.item() == want_n.item() == 4 and got_n._version > version
        assert not torch.equal(got_rm, rm) and not torch.equal(got_rv, rv)
        torch.testing.assert_close(got_rm, want_rm, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_rv, want_rv, rtol=1e-5, atol=1e-6)

    out = OPS.bn_act_running(x, rm, rv, w, b, None, 1e-5, "relu", 0.0)
    exact = reference.bn_act_running(x64, rm, rv, w, b, None, 1e-5, "relu", 0.0)
    assert_within_eager_error(out, torch.relu(F.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5)), exact, "bn_act_running out")

    for training in (True, False):
        m, v = (exact_mean.float(), exact_var.float()) if training else (rm, rv)
        z = F.batch_norm(x, None if training else rm, None if training else rv, w, b, training, 0.0, 1e-5) + r
        output = torch.relu(z)
        got = OPS.bn_act_backward(grad, x, m, v, w, output, 1e-5, training, True, True, True)
        exact = reference.bn_act_backward(g64, x64, m, v, w, output, 1e-5, training, True, True, True)
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        eager_out = torch.relu(F.batch_norm(leaves[0], None if training else rm, None if training else rv, leaves[1], leaves[2],
                                            training, 0.0, 1e-5) + r)
        eager = torch.autograd.grad(eager_out, leaves, grad)
        for name, g, e, ex in zip(("input", "weight", "bias"), got, eager, exact):
            assert_within_eager_error(g.to(e.dtype), e, ex, f"bn_act_backward grad {name} (training={training})", factor=3.0)
        torch.testing.assert_close(got[3], exact[3].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("momentum", ["0.1", "none", "tensor"])
@pytest.mark.parametrize("shape", [(4, 3, 1, 1), (2, 33, 7, 7), (2, 64, 56, 56)], ids=["C3hw1", "C33hw49", "C64hw3136"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not resnet_fused.backends.available()["cuda"], reason="needs a CUDA GPU and the extension built with CUDA"))])
def test_stage_kernels_equal_their_steps(device, dtype, fmt, shape, momentum):
    """bn_act_batch and bn_act_backward give bit for bit what their kernel ops give one after another (CUDA runs
    the coefficients, the count and the running update inside the reductions' launches; the same fp32 values through
    the same fp64 math): the statistics, the running statistics and num_batches_tracked (three steps, momentum None:
    the cumulative average), the output, and the backward's gradients."""
    C = shape[1]
    x = activation(shape, dtype, fmt, device)
    w, b, rm, rv = (t.to(device) for t in _bn_args(C, requires_grad=False))
    grad = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    count = x.numel() / C
    mom = {"0.1": 0.1, "none": None, "tensor": None}[momentum]
    mom_t = torch.tensor(0.3, device=device) if momentum == "tensor" else None
    fused_state = [rm.clone(), rv.clone(), torch.tensor(2, device=device)]
    steps_state = [rm.clone(), rv.clone(), torch.tensor(2, device=device)]
    for _ in range(3):
        out, mean, var = OPS.bn_act_batch(x, w, b, None, 1e-5, "relu", 0.0, None, None, fused_state[0], fused_state[1], mom,
                                          mom_t, fused_state[2])
        s_mean, s_var = OPS.bn_stats(x)
        steps_state[2] += 1
        OPS.bn_update_running(steps_state[0], steps_state[1], s_mean, s_var, count, mom, mom_t, steps_state[2])
        scale, shift = OPS.bn_scale_shift(s_mean, s_var, w, b, 1e-5)
        s_out = OPS.bn_act_apply(x, scale, shift, None, "relu", 0.0)
        for name, got, want in zip(("mean", "var", "out", "running_mean", "running_var", "num_batches_tracked"),
                                   (mean, var, out, *fused_state), (s_mean, s_var, s_out, *steps_state)):
            assert torch.equal(got, want), name
    assert fused_state[2].item() == 5

    got = OPS.bn_act_backward(grad, x, mean, var, w, out, 1e-5, True, True, True, False)
    sum_dy, sum_dy_xmu = OPS.bn_act_backward_reduce(grad, x, mean, out)
    a, b_, c, grad_weight = OPS.bn_backward_coeffs(sum_dy, sum_dy_xmu, var, w, 1e-5, count, True)
    grad_input, _ = OPS.bn_act_backward_elemt(grad, out, x, mean, a, b_, c, False)
    for name, g, want in zip(("grad_input", "grad_weight", "grad_bias"), got, (grad_input, grad_weight, sum_dy)):
        assert torch.equal(g, want), name


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_genstats_matches_reference(fmt, dtype):
    """conv_genstats (on the CPU the composite: aten's conv, then bn_stats) against reference.conv_genstats in float64,
    N = 1, 7x7, stride 2, odd channels: y and the gradients of y under the eager-error rule, the statistics against
    float64 statistics of the y it returned; the statistics take no gradient."""
    x = activation((1, 5, 7, 7), dtype, fmt).requires_grad_()
    w = (torch.randn(6, 5, 3, 3) * 0.3).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    conv = ([2, 2], [1, 1], [1, 1])
    y, mean, var = OPS.conv_genstats(x, w, *conv)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w)]
    exact = reference.conv_genstats(*leaves64, *conv)
    eager = F.conv2d(x, w, None, 2, 1)
    assert y.dtype == dtype and mean.dtype == var.dtype == torch.float32 and not mean.requires_grad
    assert_within_eager_error(y, eager, exact[0], "y")
    y64 = y.detach().double()
    torch.testing.assert_close(mean, y64.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, y64.var((0, 2, 3), unbiased=False).float(), rtol=1e-5, atol=1e-6)
    grad = torch.randn(y.shape, dtype=dtype)
    got = torch.autograd.grad(y, (x, w), grad)
    eager_grads = torch.autograd.grad(eager, (x, w), grad)
    exact_grads = torch.autograd.grad(exact[0], leaves64, grad.double())
    for name, g, e, ex in zip(("input", "weight"), got, eager_grads, exact_grads):
        assert_within_eager_error(g, e, ex, f"grad {name}", factor=3.0)


def _conv_of_bn_relu(x, w, bn_weight, bn_bias):
    """What conv_genstats computes with an input BN (here stride 2, padding 1): conv2d(relu(batch_norm(x))) in training."""
    return F.conv2d(torch.relu(F.batch_norm(x, None, None, bn_weight, bn_bias, True, 0.0, 1e-5)), w, None, 2, 1)


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_conv_genstats_input_bn_matches_batch_norm(fmt, dtype, affine):
    """conv_genstats with an input BN + ReLU (the deferred BN; on the CPU the composite: bn_act_apply, aten's conv,
    bn_stats) against conv2d(relu(batch_norm(x))) in float64, x's batch statistics handed in as a conv_genstats returns
    them: y under the eager-error rule, y's statistics against float64 statistics of the y returned, and the gradients
    of x, the conv weight and the input BN's weight and bias (through the batch statistics: the backward's BN is the
    training one) under the eager-error rule. x's channel means sit off zero, so that the BN's shift matters."""
    x = activation((2, 5, 7, 7), dtype, fmt, scale=0.7, offset=0.4).requires_grad_()
    w = (torch.randn(6, 5, 3, 3) * 0.3).to(dtype).contiguous(memory_format=fmt).requires_grad_()
    bn = [(torch.rand(5) + 0.5).requires_grad_(), (torch.randn(5) * 0.3).requires_grad_()] if affine else [None, None]
    var, mean = torch.var_mean(x.detach().double(), (0, 2, 3), correction=0)
    y, y_mean, y_var = OPS.conv_genstats(x, w, [2, 2], [1, 1], [1, 1], mean.float(), var.float(), *bn, 1e-5)
    leaves = [t for t in (x, w, *bn) if t is not None]
    ref = _conv_of_bn_relu(x, w, *bn)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exact = _conv_of_bn_relu(*leaves64, *([None, None] if not affine else []))
    assert y.dtype == dtype and y.stride() == ref.stride() and not y_mean.requires_grad and not y_var.requires_grad
    assert_within_eager_error(y, ref, exact, "y")
    y64 = y.detach().double()
    torch.testing.assert_close(y_mean, y64.mean((0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_var, y64.var((0, 2, 3), unbiased=False).float(), rtol=1e-5, atol=1e-6)
    grad = torch.randn(y.shape, dtype=dtype)
    got = torch.autograd.grad(y, leaves, grad)
    eager = torch.autograd.grad(ref, leaves, grad)
    exact_grads = torch.autograd.grad(exact, leaves64, grad.double())
    for name, g, e, ex in zip(("input", "conv weight", "bn weight", "bn bias"), got, eager, exact_grads):
        assert g.dtype == e.dtype, f"grad {name}: {g.dtype}, eager's {e.dtype}"
        assert_within_eager_error(g, e, ex, f"grad {name}", factor=3.0)


def test_conv_genstats_input_bn_opcheck_gradcheck_and_errors():
    """The input BN through opcheck (with and without its affine parameters) and gradcheck in float64 (the statistics
    recomputed from x inside the function: the op's backward carries their gradient), and its argument errors."""
    x = activation((2, 4, 5, 5), torch.float32, CL, offset=0.3).requires_grad_()
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    bw, bb = (torch.rand(4) + 0.5).requires_grad_(), torch.randn(4).requires_grad_()
    var, mean = torch.var_mean(x.detach(), (0, 2, 3), correction=0)
    torch.library.opcheck(OPS.conv_genstats, (x, w, [1, 1], [1, 1], [1, 1], mean, var, bw, bb, 1e-5))
    torch.library.opcheck(OPS.conv_genstats, (x.detach().contiguous(), w, [2, 1], [0, 1], [1, 2], mean, var, None, None, 1e-3))
    # a non-dense channels_last input: the written a (dense, NCHW) decides y's layout, in the fake too
    sliced = activation((2, 4, 5, 10), torch.float32, CL)[..., ::2].requires_grad_()
    torch.library.opcheck(OPS.conv_genstats, (sliced, w, [1, 1], [1, 1], [1, 1], mean, var, bw, bb, 1e-5))
    x64 = torch.randn(2, 3, 5, 4, dtype=torch.float64).add_(0.5).requires_grad_()
    w64 = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    bw64, bb64 = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), torch.randn(3, dtype=torch.float64).requires_grad_()

    def fn(a, b, g, h):
        v, m = torch.var_mean(a.detach(), (0, 2, 3), correction=0)
        return OPS.conv_genstats(a, b, [2, 1], [1, 0], [1, 1], m, v, g, h, 1e-5)[0]

    assert torch.autograd.gradcheck(fn, (x64, w64, bw64, bb64))
    x = x.detach()
    with pytest.raises(RuntimeError, match="conv_genstats: `input_mean` and `input_var` must not require grad"):
        OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1], mean.clone().requires_grad_(), var)
    with pytest.raises(RuntimeError, match="conv_genstats: give `input_mean` and `input_var` together"):
        OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1], mean, None)
    with pytest.raises(RuntimeError, match="conv_genstats: give .* and `input_weight` / `input_bias` only with them"):
        OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1], None, None, bw)
    with pytest.raises(RuntimeError, match=r"conv_genstats: expected `input_var` of shape \(4\), one per channel of input "
                                           r"\[2, 4, 5, 5\], got \[3\]"):
        OPS.conv_genstats(x, w, [1, 1], [1, 1], [1, 1], mean, var[:3])


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_deferred_stages_are_the_eager_chain(fmt, momentum):
    """A deferred chain of the stage ops (the plan of a training block on the cuda backend with the cuDNN graphs on):
    conv_bn_defer_stage (conv1, its statistics, bn1's running update; relu(bn1) left undone), then conv_bn_act_stage
    applying bn1 + ReLU as conv2 loads its input, bn2, the residual, ReLU. Against conv -> batch_norm -> relu -> conv ->
    batch_norm -> + r -> relu in float64 (eager fp32 setting the error allowed): the output, every gradient (bn1's
    through the deferred statistics), both BNs' running statistics (momentum None: the cumulative average) and
    num_batches_tracked."""
    x = activation((2, 5, 7, 7), torch.float32, fmt, offset=0.2).requires_grad_()
    w1, w2 = torch.randn(8, 5, 3, 3).mul_(0.3).requires_grad_(), torch.randn(6, 8, 3, 3).mul_(0.2).requires_grad_()
    (bw1, bb1, rm1, rv1), (bw2, bb2, rm2, rv2) = _bn_args(8), _bn_args(6)
    r = activation((2, 6, 4, 4), torch.float32, fmt).requires_grad_()
    grad = torch.randn(2, 6, 4, 4)
    leaves = (x, w1, bw1, bb1, w2, bw2, bb2, r)

    def fused(x, w1, bw1, bb1, w2, bw2, bb2, r, running):
        (rm1, rv1, n1), (rm2, rv2, n2) = running
        y1, m1, v1 = OPS.conv_bn_defer_stage(x, w1, rm1, rv1, [2, 2], [1, 1], [1, 1], momentum, None, n1)
        return OPS.conv_bn_act_stage(y1, w2, None, bw2, bb2, rm2, rv2, r, [1, 1], [1, 1], [1, 1], 1, True, momentum, None,
                                     1e-5, "relu", 0.0, n2, m1, v1, bw1, bb1, 1e-5)

    def eager(x, w1, bw1, bb1, w2, bw2, bb2, r, running):
        (rm1, rv1, n1), (rm2, rv2, n2) = running
        for n in (n1, n2):
            n.add_(1)
        # nn.BatchNorm2d's factor: momentum, or (None) the cumulative average's 1 / num_batches_tracked
        m1, m2 = (momentum, momentum) if momentum is not None else (1.0 / n1.item(), 1.0 / n2.item())
        a1 = torch.relu(F.batch_norm(F.conv2d(x, w1, None, 2, 1), rm1, rv1, bw1, bb1, True, m1, 1e-5))
        y2 = F.batch_norm(F.conv2d(a1, w2, None, 1, 1), rm2, rv2, bw2, bb2, True, m2, 1e-5)
        return torch.relu(y2 + r)

    def running(dtype):  # counters past 0, so that the cumulative average's 1 / count is not 1
        return [(rm.clone().to(dtype), rv.clone().to(dtype), torch.tensor(3)) for rm, rv in ((rm1, rv1), (rm2, rv2))]

    got_running, eager_running, exact_running = running(torch.float32), running(torch.float32), running(torch.float64)
    out = fused(*leaves, got_running)
    got = torch.autograd.grad(out, leaves, grad)
    ref_out = eager(*leaves, eager_running)
    ref = torch.autograd.grad(ref_out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exact_out = eager(*leaves64, exact_running)
    exact = torch.autograd.grad(exact_out, leaves64, grad.double())
    assert_within_eager_error(out, ref_out, exact_out, "out")
    for name, g, e, ex in zip(("input", "w1", "bn1 weight", "bn1 bias", "w2", "bn2 weight", "bn2 bias", "residual"),
                              got, ref, exact):
        assert_within_eager_error(g, e, ex, f"grad {name}", factor=3.0)
    for i, (g, e, ex) in enumerate(zip(got_running, eager_running, exact_running)):
        assert g[2].item() == e[2].item() == 4, f"bn{i + 1} num_batches_tracked"
        assert_within_eager_error(g[0], e[0], ex[0], f"bn{i + 1} running_mean")
        assert_within_eager_error(g[1], e[1], ex[1], f"bn{i + 1} running_var")


def test_deferred_stages_opcheck_and_errors():
    x = activation((2, 4, 5, 5), torch.float32, CL, offset=0.3).requires_grad_()
    cw = torch.randn(8, 4, 3, 3, requires_grad=True)
    w, b, rm, rv = _bn_args(8)
    torch.library.opcheck(OPS.conv_bn_defer_stage, (x, cw, rm, rv, [1, 1], [1, 1], [1, 1], 0.1, None, torch.tensor(3)))
    y, mean, var = OPS.conv_bn_defer_stage(x.detach(), cw.detach(), None, None, [1, 1], [1, 1], [1, 1], 0.1, None)
    cw2 = torch.randn(6, 8, 1, 1, requires_grad=True)
    w2, b2, rm2, rv2 = _bn_args(6)
    torch.library.opcheck(OPS.conv_bn_act_stage, (y.requires_grad_(), cw2, None, w2, b2, rm2, rv2, None, [1, 1], [0, 0], [1, 1],
                                                   1, True, 0.1, None, 1e-5, "relu", 0.0, None, mean, var, w, b, 1e-5))
    torch.library.opcheck(OPS.conv_bn_defer_stage, (y, cw2, rm2, rv2, [1, 1], [0, 0], [1, 1], None, None, torch.tensor(1),
                                                     mean, var, None, None, 1e-5))
    y = y.detach()
    with pytest.raises(RuntimeError, match=r"conv_bn_defer_stage: expected `running_var` to be a floating-point vector of "
                                           r"shape \(8\), one per output channel of `conv_weight` \[8, 4, 3, 3\]"):
        OPS.conv_bn_defer_stage(x, cw, rm, rv[:5], [1, 1], [1, 1], [1, 1], 0.1, None)
    with pytest.raises(RuntimeError, match="conv_bn_defer_stage: give both running_mean and running_var, or neither"):
        OPS.conv_bn_defer_stage(x, cw, rm, None, [1, 1], [1, 1], [1, 1], 0.1, None)
    stage_args = (y, cw2, None, w2, b2, rm2, rv2, None, [1, 1], [0, 0], [1, 1], 1, False, 0.1, None, 1e-5, "relu", 0.0, None,
                  mean, var)
    with pytest.raises(RuntimeError, match=r"conv_bn_act_stage: an input BN \(input_mean, input_var: a deferred BN \+ ReLU\) "
                                           r"needs training, no conv_bias and groups=1; got training=0"):
        OPS.conv_bn_act_stage(*stage_args)
    with pytest.raises(RuntimeError, match="conv_genstats: give `input_mean` and `input_var` together"):
        OPS.conv_bn_defer_stage(y, cw2, None, None, [1, 1], [0, 0], [1, 1], 0.1, None, None, mean)


def test_conv_genstats_then_bn_act_batch_is_conv_bn_act():
    """The cuDNN route's composition (conv_bn_act_stage in training on CUDA with the graphs on): conv_genstats, then
    bn_act_batch normalizing by the statistics it was handed. Output and every gradient against conv2d -> batch_norm ->
    + residual -> ReLU in float64 (eager in fp32 setting the error allowed): bn_act_batch's backward differentiates
    through the statistics conv_genstats returned without a gradient."""
    x = activation((2, 5, 7, 7), torch.float32, CL).requires_grad_()
    cw = torch.randn(6, 5, 3, 3, requires_grad=True)
    w, b, _, _ = _bn_args(6)
    r = activation((2, 6, 4, 4), torch.float32, CL).requires_grad_()
    grad = torch.randn(2, 6, 4, 4)

    def fused(x, cw, w, b, r):
        y, mean, var = OPS.conv_genstats(x, cw, [2, 2], [1, 1], [1, 1])
        return OPS.bn_act_batch(y, w, b, r, 1e-5, "relu", 0.0, mean, var)[0]

    def eager(x, cw, w, b, r):
        return torch.relu(F.batch_norm(F.conv2d(x, cw, None, 2, 1), None, None, w, b, True, 0.0, 1e-5) + r)

    leaves = (x, cw, w, b, r)
    out = fused(*leaves)
    got = torch.autograd.grad(out, leaves, grad)
    ref_out = eager(*leaves)
    ref = torch.autograd.grad(ref_out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    exact_out = eager(*leaves64)
    exact = torch.autograd.grad(exact_out, leaves64, grad.double())
    assert_within_eager_error(out, ref_out, exact_out, "out")
    for name, g, e, ex in zip(("input", "conv_weight", "bn_weight", "bn_bias", "residual"), got, ref, exact):
        assert_within_eager_error(g, e, ex, f"grad {name}", factor=3.0)


def test_conv_genstats_opcheck_gradcheck_and_errors():
    x = activation((2, 4, 5, 5), torch.float32, CL).requires_grad_()
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    torch.library.opcheck(OPS.conv_genstats, (x, w, [1, 1], [1, 1], [1, 1]))
    torch.library.opcheck(OPS.conv_genstats, (x.detach().contiguous(), w.detach(), [2, 1], [0, 1], [1, 2]))
    x64 = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    w64 = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: OPS.conv_genstats(a, b, [2, 1], [1, 0], [1, 1])[0], (x64, w64))
    with pytest.raises(RuntimeError, match=r"conv_genstats: expected `weight` of shape \(Cout, 4, KH, KW\) for `input` of "
                                           r"shape \[2, 4, 5, 5\] \(groups 1\), got \[8, 2, 3, 3\]"):
        OPS.conv_genstats(x, torch.randn(8, 2, 3, 3), [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="conv_genstats: `weight` is BFloat16 on cpu but `input` is Float on cpu"):
        OPS.conv_genstats(x, w.detach().bfloat16(), [1, 1], [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match=r"conv_genstats: expected `input` to be a 4-D \(N, C, H, W\) floating-point tensor, "
                                           r"got Float of shape \[4, 5, 5\]"):
        OPS.conv_genstats(x[0], w, [1, 1], [1, 1], [1, 1])


def test_cudnn_graphs_switch():
    """resnet_fused.ops.cudnn's switch of the graph route: refused, saying why, in a build without the graphs (CI's:
    no cudnn-frontend headers); in a build with them, turned on and off, and a CPU training stage still runs aten's
    convolution (the route is CUDA's) with no conv_genstats dispatched."""
    from resnet_fused.ops import cudnn

    if not cudnn.graphs_built():
        with pytest.raises(RuntimeError, match="the cuDNN graphs are not in this build of resnet_fused._C"):
            cudnn.set_graphs(True)
        assert not cudnn.graphs_enabled() and cudnn.graph_report() == []
        return
    was = cudnn.graphs_enabled()
    try:
        cudnn.set_graphs(True)
        assert cudnn.graphs_enabled()
        x = activation((2, 8, 6, 6), torch.float32, CL).requires_grad_()
        w, b, rm, rv = _bn_args(8)
        with profile() as prof:
            OPS.conv_bn_act_stage(x, torch.randn(8, 8, 3, 3), None, w, b, rm, rv, None, [1, 1], [1, 1], [1, 1], 1, True, 0.1,
                                  None, 1e-5, "relu", 0.0).sum().backward()
        names = {e.name for e in prof.events()}
        assert "resnet_fused::conv_genstats" not in names and "aten::convolution" in names
        cudnn.set_graphs(False)
        assert not cudnn.graphs_enabled()
    finally:
        cudnn.set_graphs(was)


def test_stage_ops_opcheck():
    x = activation((2, 5, 4, 3), torch.float32, CL)
    for training in (True, False):
        for act, alpha in (("relu", 0.0), ("gelu", 0.0), ("leaky_relu", 0.1)):
            w, b, rm, rv = _bn_args(5)
            torch.library.opcheck(OPS.bn_act_stage, (x.clone().requires_grad_(), w, b, rm, rv,
                                                      torch.randn(2, 5, 4, 3, requires_grad=True), training, 0.1, None, 1e-5,
                                                      act, alpha))
    w, b, rm, rv = _bn_args(5)
    torch.library.opcheck(OPS.bn_act_stage, (x.clone().requires_grad_(), None, None, rm, rv, None, True, 0.0,
                                              torch.tensor(0.5), 1e-5, "relu", 0.0))
    torch.library.opcheck(OPS.bn_act_batch, (x.clone().requires_grad_(), w, None, None, 1e-5, "relu", 0.0))
    torch.library.opcheck(OPS.bn_act_batch, (x.clone().requires_grad_(), w, b, None, 1e-5, "silu", 0.0, *OPS.bn_stats(x)))
    torch.library.opcheck(OPS.bn_act_batch, (x.clone().requires_grad_(), w, b, None, 1e-5, "relu", 0.0, None, None,
                                             rm.clone(), rv.clone(), None, None, torch.tensor(2)))
    torch.library.opcheck(OPS.bn_act_batch, (x.clone().requires_grad_(), w, None, None, 1e-5, "relu", 0.0, *OPS.bn_stats(x),
                                             rm.clone(), rv.clone(), 0.1, torch.tensor(0.3), None))
    torch.library.opcheck(OPS.bn_act_running, (x.clone().requires_grad_(), rm, rv, w, None, None, 1e-5, "hardswish", 0.0))
    g, out = torch.randn_like(x), torch.relu(x)
    mean, var = OPS.bn_stats(x)
    for training, needs in ((True, (True, True, True)), (True, (False, True, False)), (False, (True, False, True)),
                            (False, (False, False, True))):
        for output in (out, None):
            torch.library.opcheck(OPS.bn_act_backward, (g, x, mean, var, w.detach(), output, 1e-5, training, *needs))
    cw = torch.randn(7, 5, 3, 3, requires_grad=True)
    w, b, rm, rv = _bn_args(7)
    for training in (True, False):
        torch.library.opcheck(OPS.conv_bn_act_stage, (x.clone().requires_grad_(), cw, None, w, b, rm, rv, None, [1, 1], [1, 1],
                                                       [1, 1], 1, training, 0.1, None, 1e-5, "relu", 0.0))


def test_stage_ops_compile_fullgraph():
    """torch.compile(fullgraph=True) of a training step through conv_bn_act_stage: same output, gradient and statistics."""
    x = activation((2, 4, 6, 6), torch.float32, CL).requires_grad_()
    cw = torch.randn(4, 4, 3, 3, requires_grad=True)
    w, b, rm, rv = _bn_args(4)
    rm2, rv2 = rm.clone(), rv.clone()

    def step(x, rm, rv):
        return OPS.conv_bn_act_stage(x, cw, None, w, b, rm, rv, x, [1, 1], [1, 1], [1, 1], 1, True, 0.1, None, 1e-5, "relu", 0.0)

    eager = step(x, rm, rv)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, rm2, rv2)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled.sum(), x)[0], torch.autograd.grad(eager.sum(), x)[0])
    torch.testing.assert_close(rm2, rm)
    torch.testing.assert_close(rv2, rv)


def test_stage_errors_name_the_shapes():
    x = torch.randn(2, 8, 5, 5)
    w, b, rm, rv = _bn_args(8)
    with pytest.raises(RuntimeError, match=r"bn_act_stage: expected `weight` of shape \(8\).*got \[3\]"):
        OPS.bn_act_stage(x, torch.ones(3), None, None, None, None, True, 0.1, None, 1e-5, "relu", 0.0)
    with pytest.raises(RuntimeError, match="give both running_mean and running_var"):
        OPS.bn_act_stage(x, None, None, rm, None, None, True, 0.1, None, 1e-5, "relu", 0.0)
    with pytest.raises(RuntimeError, match="must be given in evaluation mode"):
        OPS.bn_act_stage(x, None, None, None, None, None, False, 0.1, None, 1e-5, "relu", 0.0)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        OPS.bn_act_stage(torch.randn(1, 8, 1, 1), None, None, None, None, None, True, 0.1, None, 1e-5, "relu", 0.0)
    with pytest.raises(RuntimeError, match="unknown activation 'swish'"):
        OPS.bn_act_stage(x, None, None, None, None, None, True, 0.1, None, 1e-5, "swish", 0.0)
    before = rm.clone()
    with pytest.raises(RuntimeError, match=r"`residual` has shape \[2, 6, 9, 9\] but `conv2d\(input\)` has shape \[2, 6, 3, 3\]"):
        OPS.conv_bn_act_stage(x, torch.randn(6, 8, 3, 3), None, None, None, rm[:6], rv[:6], torch.randn(2, 6, 9, 9), [2, 2], [1, 1],
                              [1, 1], 1, True, 0.1, None, 1e-5, "relu", 0.0)
    torch.testing.assert_close(rm, before, rtol=0, atol=0)  # checked before any running statistic moved
    with pytest.raises(RuntimeError, match=r"`conv_weight` \[6, 4, 3, 3\] with groups=1 expects 4 input channels"):
        OPS.conv_bn_act_stage(x, torch.randn(6, 4, 3, 3), None, None, None, None, None, None, [1, 1], [1, 1], [1, 1], 1, True,
                              0.1, None, 1e-5, "relu", 0.0)


def _python_dispatched_ops(fn) -> list[str]:
    """The ops a call dispatches from Python: profiler events with no parent op (deterministic)."""
    fn()
    with profile() as p:
        fn()
    return [e.name for e in p.events() if e.cpu_parent is None and "::" in e.name and not e.name.startswith("autograd::")]


@pytest.mark.parametrize("kind", ["BasicBlock", "Bottleneck"])
def test_fused_block_training_forward_is_one_op_per_stage(kind):
    """A fused block's training forward on the cpu backend: one conv_bn_act_stage call per conv -> BN (-> add) -> ReLU
    (num_batches_tracked += 1 inside it), no Python custom op, fewer ops than eager."""
    torch.manual_seed(0)
    block = getattr(torchvision.models.resnet, kind)(32, 8) if kind == "Bottleneck" else torchvision.models.resnet.BasicBlock(8, 8)
    fused = resnet_fused.fuse_(copy.deepcopy(block), backend="cpu")
    x = torch.randn(2, block.conv1.in_channels, 6, 6).contiguous(memory_format=torch.channels_last)
    fused_ops = _python_dispatched_ops(lambda: fused(x))
    eager_ops = _python_dispatched_ops(lambda: block(x))
    convs = 2 if kind == "BasicBlock" else 3
    assert fused_ops == ["resnet_fused::conv_bn_act_stage"] * convs, fused_ops
    assert len(fused_ops) < len(eager_ops), (fused_ops, eager_ops)


@pytest.mark.parametrize("backend", [b for b in backend_params(include_triton=False) if "cpu" in str(b)])
def test_functional_bn_act_runs_the_stage_op(backend):
    """resnet_fused.functional.bn_act on the cpu backend is the stage op (one dispatch), with the same result."""
    x = activation((2, 3, 4, 4), torch.float32, CL)
    w, b, rm, rv = _bn_args(3, requires_grad=False)
    ops = _python_dispatched_ops(lambda: resnet_fused.functional.bn_act(x, rm, rv, w, b, True, backend="cpu"))
    assert ops == ["resnet_fused::bn_act_stage"], ops


# ---- conv_act_stage: the eval stage once BN is folded (csrc/conv_act_stage.cpp) ----

POST_OPS = {"relu": torch.relu, "none": lambda t: t, "silu": F.silu, "leaky_relu": lambda t: F.leaky_relu(t, 0.2),
            "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "relu6": F.relu6, "hardswish": F.hardswish}


def _conv_act_eager(x, w, b, r, stride, act):
    y = F.conv2d(x, w, b, stride, 1)
    return POST_OPS[act](y + r if r is not None else y)


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("act", list(POST_OPS))
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("fused_conv, dtype", [(True, torch.float32), (True, torch.bfloat16), (False, torch.float32),
                                               (False, torch.bfloat16)],
                         ids=["onednn-fp32", "onednn-bf16", "aten-fp32", "aten-bf16"])
def test_conv_act_stage_matches_eager(fmt, act, residual, fused_conv, dtype):
    """act(conv2d(x, w, b) (+ r)) without gradients: oneDNN's post-ops (fused_conv: fp32, and bf16 where oneDNN has
    its bf16 ISA) or aten's conv with the epilogue, against F.conv2d in float64 under the eager-error rule; stride 2,
    7 odd channels, N=1."""
    if fused_conv and not onednn.runs(dtype):
        pytest.skip(f"oneDNN's fused convolution does not run {dtype} here (onednn.runs: no oneDNN, or no bf16 ISA)")
    alpha = 0.2 if act == "leaky_relu" else 0.0
    x = activation((1, 5, 9, 7), dtype, fmt)
    w, b = torch.randn(7, 5, 3, 3, dtype=dtype) * 0.3, torch.randn(7, dtype=dtype)
    r = activation((1, 7, 5, 4), dtype, fmt) if residual else None
    with torch.no_grad():
        got = OPS.conv_act_stage(x, w, b, r, [2, 2], [1, 1], [1, 1], 1, act, alpha, fused_conv)
        eager = _conv_act_eager(x, w, b, r, 2, act)
        exact = _conv_act_eager(x.double(), w.double(), b.double(), r.double() if r is not None else None, 2, act)
    assert_within_eager_error(got, eager, exact, f"conv_act_stage {act}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_act_stage_prepacked_weight(dtype):
    """A weight prepacked for oneDNN: without a residual the dense weight's result, bit for bit; with one (fused as
    oneDNN's add post-op) within eager's error of float64; a bias in another dtype than the input's is taken in the
    input's (oneDNN's add post-op wants it so)."""
    if not onednn.runs(dtype):
        pytest.skip(f"oneDNN's fused convolution does not run {dtype} here (onednn.runs)")
    x = activation((2, 8, 6, 6), dtype, CL)
    w, b, r = torch.randn(8, 8, 3, 3, dtype=dtype) * 0.2, torch.randn(8, dtype=dtype), activation((2, 8, 6, 6), dtype, CL)
    args = ([1, 1], [1, 1], [1, 1], 1, "relu", 0.0)
    packed_w = onednn.prepack_conv_weight(w, 1, 1, 1, 1, x.shape)
    with torch.no_grad():
        dense = OPS.conv_act_stage(x, w, b, None, *args, True)
        torch.testing.assert_close(OPS.conv_act_stage(x, packed_w, b, None, *args, True), dense, rtol=0, atol=0)
        fused = OPS.conv_act_stage(x, packed_w, b, r, *args, True)
        torch.testing.assert_close(OPS.conv_act_stage(x, packed_w, b.float(), r, *args, True), fused, rtol=0, atol=0)
        exact = _conv_act_eager(x.double(), w.double(), b.double(), r.double(), 1, "relu")
        assert_within_eager_error(fused, _conv_act_eager(x, w, b, r, 1, "relu"), exact, f"prepacked {dtype} + residual")


@pytest.mark.parametrize("fmt", [NCHW, CL])
@pytest.mark.parametrize("prepacked", [True, False], ids=["prepacked", "dense"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_onednn_bf16_residual_where_aten_would_not_fuse_the_add(fmt, prepacked, act):
    """bf16 through oneDNN with a residual where aten's binary call may not fuse the add (groups > 1, a dense
    weight) and falls back to the conv then, for a ReLU, at::add_relu_, which has no bf16 kernel: the op (csrc) and
    functional.conv_act (Python) then add + ReLU themselves (SiLU: aten's fallback add); within eager bf16's error
    of float64."""
    from resnet_fused import functional

    if not onednn.runs(torch.bfloat16):
        pytest.skip("oneDNN's fused convolution does not run bf16 here (onednn.runs)")
    dt = torch.bfloat16
    for groups in (2, 1):
        x = activation((2, 8, 9, 9), dt, fmt)
        w, b = torch.randn(6, 8 // groups, 3, 3, dtype=dt) * 0.2, torch.randn(6, dtype=dt)
        r = activation((2, 6, 9, 9), dt, fmt)
        weight = onednn.prepack_conv_weight(w, 1, 1, 1, groups, x.shape) if prepacked else w
        with torch.no_grad():
            eager = POST_OPS[act](F.conv2d(x, w, b, 1, 1, 1, groups) + r)
            exact = POST_OPS[act](F.conv2d(x.double(), w.double(), b.double(), 1, 1, 1, groups) + r.double())
            got = OPS.conv_act_stage(x, weight, b, r, [1, 1], [1, 1], [1, 1], groups, act, 0.0, True)
            assert_within_eager_error(got, eager, exact, f"conv_act_stage bf16 groups={groups} {act}")
            got = functional.conv_act(x, weight, b, 1, 1, 1, groups, r, act, backend="cpu")
            assert_within_eager_error(got, eager, exact, f"functional.conv_act bf16 groups={groups} {act}")


def test_conv_act_stage_gradients_are_eagers():
    """Where a gradient is wanted the op is aten's differentiable conv, add and activation, fused_conv or not
    (input, weight, bias and residual gradients eager's)."""
    x = activation((2, 8, 6, 6), torch.float32, CL)
    w, b, r = torch.randn(8, 8, 3, 3) * 0.2, torch.randn(8), activation((2, 8, 6, 6), torch.float32, CL)
    args = ([1, 1], [1, 1], [1, 1], 1, "relu", 0.0)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    out = OPS.conv_act_stage(*leaves, *args, True)  # fused_conv stands aside for the gradient
    twins = [t.clone().requires_grad_() for t in (x, w, b, r)]
    eager = torch.relu(F.conv2d(twins[0], twins[1], twins[2], 1, 1) + twins[3])
    g = torch.randn_like(eager)
    torch.testing.assert_close(torch.autograd.grad(out, leaves, g), torch.autograd.grad(eager, twins, g))


def test_conv_act_stage_opcheck_and_errors():
    x = activation((2, 5, 6, 6), torch.float32, CL)
    w, b = torch.randn(7, 5, 3, 3, requires_grad=True), torch.randn(7, requires_grad=True)
    r = torch.randn(2, 7, 6, 6, requires_grad=True)
    for act, alpha in (("relu", 0.0), ("silu", 0.0), ("leaky_relu", 0.1)):
        torch.library.opcheck(OPS.conv_act_stage, (x.clone().requires_grad_(), w, b, r, [1, 1], [1, 1], [1, 1], 1, act, alpha,
                                                    False))
    torch.library.opcheck(OPS.conv_act_stage, (x, w.detach(), None, None, [2, 2], [1, 1], [1, 1], 1, "none", 0.0, False))
    with pytest.raises(RuntimeError, match=r"conv_act_stage: `residual` has shape \[2, 7, 6, 6\] but conv2d\(input\) has shape "
                                           r"\[2, 7, 3, 3\]"):
        OPS.conv_act_stage(x, w, b, r, [2, 2], [1, 1], [1, 1], 1, "relu", 0.0, False)
    with pytest.raises(RuntimeError, match=r"`weight` \[7, 4, 3, 3\] with groups=1 expects 4 input channels"):
        OPS.conv_act_stage(x, torch.randn(7, 4, 3, 3), None, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False)
    with pytest.raises(RuntimeError, match=r"expected `bias` of shape \(7\)"):
        OPS.conv_act_stage(x, w, torch.randn(3), None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, False)
    with pytest.raises(RuntimeError, match="unknown activation 'swish'"):
        OPS.conv_act_stage(x, w, b, None, [1, 1], [1, 1], [1, 1], 1, "swish", 0.0, False)
    if onednn.runs(torch.float32):
        packed = onednn.prepack_conv_weight(w.detach(), 1, 1, 1, 1, x.shape)
        with pytest.raises(RuntimeError, match="a prepacked .oneDNN. weight runs only with fused_conv=True on fp32 or bf16 CPU "
                                               "tensors without gradients; got Half `input` on cpu"):
            OPS.conv_act_stage(x.half(), packed, None, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, True)
        with pytest.raises(RuntimeError, match="the prepacked `weight` is Float, `input` is BFloat16"):
            OPS.conv_act_stage(x.bfloat16(), packed, None, None, [1, 1], [1, 1], [1, 1], 1, "relu", 0.0, True)


def test_stage_counts_num_batches_tracked():
    """num_batches_tracked given: counted in the op (+= 1 per training call), and momentum=None is nn.BatchNorm2d's
    cumulative average 1 / num_batches_tracked; given in eval, an error naming it."""
    x = activation((4, 3, 5, 5), torch.float32, CL)
    bn = torch.nn.BatchNorm2d(3, momentum=None)
    rm, rv, nbt = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for step in range(3):
        xs = x * (step + 1)
        bn(xs)
        OPS.bn_act_stage(xs, None, None, rm, rv, None, True, None, None, 1e-5, "none", 0.0, nbt)
        assert nbt.item() == bn.num_batches_tracked.item() == step + 1
        torch.testing.assert_close(rm, bn.running_mean)
        torch.testing.assert_close(rv, bn.running_var)
    with pytest.raises(RuntimeError, match="`num_batches_tracked` is counted in training"):
        OPS.bn_act_stage(x, None, None, rm, rv, None, False, 0.1, None, 1e-5, "none", 0.0, nbt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bn_update_running_is_torch_lerp(dtype):
    """The stages' running-statistics update: running += w (batch - running), the variance unbiased, in the running
    statistics' dtype, in place (a strided one too); w from momentum, momentum_tensor or 1 / num_batches_tracked."""
    C, count = 6, 10.0
    mean, var = torch.randn(C), torch.rand(C) + 0.1
    for w_args, w in (((0.1, None, None), 0.1), ((None, torch.tensor(0.25), None), 0.25),
                      ((None, None, torch.tensor(4)), 0.25), ((0.3, torch.tensor(0.5), None), 0.5)):
        base = torch.randn(2 * C, dtype=dtype)
        rm, rv = base[::2], torch.rand(C, dtype=dtype) + 0.5  # running_mean strided: updated through a dense copy
        want_m, want_v = rm.clone(), rv.clone()
        reference.bn_update_running(want_m, want_v, mean, var, count, *w_args)
        OPS.bn_update_running(rm, rv, mean, var, count, *w_args)
        torch.testing.assert_close(rm, want_m)
        torch.testing.assert_close(rv, want_v)
        assert base[::2].data_ptr() == rm.data_ptr() and torch.equal(base[::2], rm)
    torch.library.opcheck(OPS.bn_update_running, (torch.zeros(C), torch.ones(C), mean, var, count, 0.1, None, None))
    with pytest.raises(RuntimeError, match="give a momentum, a momentum_tensor or num_batches_tracked"):
        OPS.bn_update_running(torch.zeros(C), torch.ones(C), mean, var, count, None, None, None)
    with pytest.raises(RuntimeError, match=r"`running_var` has shape \[3\] but `mean` has shape \[6\]"):
        OPS.bn_update_running(torch.zeros(C), torch.ones(3), mean, var, count, 0.1, None, None)
