"""bn_act and add_relu through the public functions, on every backend, against eager PyTorch in the
same dtype and a float64 reference: forward, backward (one grad_output for all), running statistics."""

import pytest
import torch
import torch.nn.functional as F

from helpers import DTYPES, FORMATS, activation, assert_within_eager_error, backend_params, device_of, interpreted_triton, is_layout
from resnet_fused import backends, functional, reference
from resnet_fused.ops.kernels import kernels

# N=1, C=3, 7x7, H=W=1, non-powers of two, one larger ResNet-like shape; C=20 and 70: channels_last
# reductions take register blocks of 8 or 16 channels, then a tail of 4 or 6
SHAPES = [(2, 5, 3, 3), (1, 3, 7, 7), (3, 6, 1, 1), (4, 16, 8, 8), (2, 64, 14, 14), (3, 20, 5, 7), (2, 70, 6, 6)]
TRITON_SHAPES = [(2, 5, 3, 3), (1, 3, 7, 7)]  # the interpreter is slow


def _cases(backend):
    shapes = TRITON_SHAPES if backend == "triton" and interpreted_triton() else SHAPES
    dtypes = [torch.float32, torch.float16] if backend == "triton" and interpreted_triton() else DTYPES
    return shapes, dtypes


def _bn_inputs(shape, dtype, fmt, device, with_residual):
    C = shape[1]
    x = activation(shape, dtype, fmt, device, scale=2.0, offset=0.5)
    residual = activation(shape, dtype, fmt, device) if with_residual else None
    weight = torch.randn(C, device=device)
    bias = torch.randn(C, device=device)
    running_mean = torch.randn(C, device=device) * 0.3
    running_var = torch.rand(C, device=device) + 0.5
    grad_out = activation(shape, dtype, fmt, device)
    return x, residual, weight, bias, running_mean, running_var, grad_out


def _run_bn_act(fn, inputs, training, relu, cast=None, **kw):
    """Forward + backward of fn on fresh leaves; returns (out, grads dict, running_mean, running_var)."""
    x, residual, weight, bias, rm, rv, grad_out = (t if t is None or cast is None else t.to(cast) for t in inputs)
    leaves = {"input": x, "weight": weight, "bias": bias, "residual": residual}
    leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items() if v is not None}
    rm, rv = rm.clone(), rv.clone()
    out = fn(leaves["input"], rm, rv, leaves["weight"], leaves["bias"], training, 0.1, 1e-5, leaves.get("residual"), relu, **kw)
    out.backward(grad_out)
    return out.detach(), {k: v.grad for k, v in leaves.items()}, rm, rv


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual,relu", [(True, True), (False, True), (True, False), (False, False)],
                         ids=["res-relu", "relu", "res", "plain"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_bn_act_matches_eager(backend, training, with_residual, relu, fmt, poisoned):
    shapes, dtypes = _cases(backend)
    device = device_of(backend)
    for shape in shapes:
        for dtype in dtypes:
            inputs = _bn_inputs(shape, dtype, fmt, device, with_residual)
            fused = _run_bn_act(functional.bn_act, inputs, training, relu, backend=backend)
            eager = _run_bn_act(reference.bn_act, inputs, training, relu)
            exact = _run_bn_act(reference.bn_act, inputs, training, relu, cast=torch.float64)
            what = f"{backend} {shape} {dtype} {'train' if training else 'eval'}"
            assert is_layout(fused[0], fmt), f"{what}: output layout does not follow the input"
            assert_within_eager_error(fused[0], eager[0], exact[0], f"{what} output")
            for name in fused[1]:
                assert_within_eager_error(fused[1][name], eager[1][name], exact[1][name], f"{what} grad {name}")
            assert_within_eager_error(fused[2], eager[2], exact[2], f"{what} running_mean")
            assert_within_eager_error(fused[3], eager[3], exact[3], f"{what} running_var")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
def test_add_relu_matches_eager(backend, fmt, poisoned):
    shapes, dtypes = _cases(backend)
    device = device_of(backend)
    for shape in shapes:
        for dtype in dtypes:
            x, r, g = (activation(shape, dtype, fmt, device) for _ in range(3))

            def run(fn, cast=None, **kw):
                a, b = (t.detach().clone().to(cast or t.dtype).requires_grad_() for t in (x, r))
                out = fn(a, b, **kw)
                out.backward(g.to(cast or g.dtype))
                return out.detach(), a.grad, b.grad

            fused = run(functional.add_relu, backend=backend)
            eager = run(lambda a, b: torch.relu(a + b))
            exact = run(lambda a, b: torch.relu(a + b), cast=torch.float64)
            assert is_layout(fused[0], fmt)
            for name, f, e, x64 in zip(("out", "grad input", "grad residual"), fused, eager, exact):
                assert_within_eager_error(f, e, x64, f"{backend} {shape} {dtype} {name}")


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_running_stats_follow_batchnorm2d(backend, momentum):
    """Several training steps through bn_act leave the same buffers as nn.BatchNorm2d."""
    device = device_of(backend)
    bn = torch.nn.BatchNorm2d(7, momentum=momentum).to(device)
    ours = torch.nn.BatchNorm2d(7, momentum=momentum).to(device)
    exact_bn = torch.nn.BatchNorm2d(7, momentum=momentum).to(device, torch.float64)  # the float64 twin
    for step in range(4):
        x = activation((3, 7, 5, 6), torch.float32, torch.channels_last, device, scale=1 + step, offset=step)
        expected, exact = torch.relu(bn(x)), torch.relu(exact_bn(x.double()))
        ours.num_batches_tracked += 1
        factor = 1.0 / ours.num_batches_tracked.item() if momentum is None else momentum
        out = functional.bn_act(x, ours.running_mean, ours.running_var, ours.weight, ours.bias, True, factor, ours.eps,
                                backend=backend)
        assert_within_eager_error(out, expected, exact, f"step {step} output")
        assert_within_eager_error(ours.running_mean, bn.running_mean, exact_bn.running_mean, f"step {step} running_mean")
        assert_within_eager_error(ours.running_var, bn.running_var, exact_bn.running_var, f"step {step} running_var")


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
def test_running_stats_optional_in_training(backend):
    """track_running_stats=False: no buffers, batch statistics, like F.batch_norm(None, None)."""
    x = activation((2, 4, 3, 3), torch.float32, torch.contiguous_format, device_of(backend))
    out = functional.bn_act(x, None, None, training=True, act=None, backend=backend)
    exact = F.batch_norm(x.double(), None, None, training=True)
    assert_within_eager_error(out, F.batch_norm(x, None, None, training=True), exact, "batch statistics, no buffers")


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_zero_size_batch_matches_eager(backend, training):
    device = device_of(backend)
    inputs = _bn_inputs((0, 4, 5, 5), torch.float32, torch.channels_last, device, with_residual=True)
    fused = _run_bn_act(functional.bn_act, inputs, training, True, backend=backend)
    eager = _run_bn_act(reference.bn_act, inputs, training, True)
    assert fused[0].shape == eager[0].shape
    for name in fused[1]:
        torch.testing.assert_close(fused[1][name], eager[1][name])
    torch.testing.assert_close(fused[2], eager[2])
    torch.testing.assert_close(fused[3], eager[3])


@pytest.mark.parametrize("backend", backend_params(include_triton=False))
def test_one_value_per_channel_raises_like_eager(backend):
    x = activation((1, 3, 1, 1), torch.float32, torch.contiguous_format, device_of(backend))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        functional.bn_act(x, None, None, training=True, backend=backend)


@pytest.mark.parametrize("backend", backend_params())
def test_bn_stats_stable_for_millions_of_values(backend):
    """Mean 1000, std 1, 2M values per channel: a naive fp32 E[x^2] - E[x]^2 loses every digit."""
    if backend == "triton" and interpreted_triton():
        shape = (1, 2, 256, 256)  # 65K values per channel is what the interpreter manages
    else:
        shape = (2, 2, 1024, 1024)
    def check(mean, var, exact_mean, exact_var, what):
        torch.testing.assert_close(mean.double(), exact_mean, rtol=5e-7, atol=0, msg=lambda m: f"{what} mean: {m}")  # a few fp32 ulps
        torch.testing.assert_close(var.double(), exact_var, rtol=1e-4, atol=0, msg=lambda m: f"{what} var: {m}")

    for fmt in FORMATS:
        x = activation(shape, torch.float32, fmt, device_of(backend), scale=1.0, offset=1000.0)
        # independent of every backend (torch's bn_stats is resnet_fused.reference's, fp64 itself)
        exact_var, exact_mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
        naive_mean = x.mean((0, 2, 3))
        naive_var = (x * x).mean((0, 2, 3)) - naive_mean * naive_mean
        with pytest.raises(AssertionError):  # the bounds tell the stable computation from the naive one
            check(naive_mean, naive_var, exact_mean, exact_var, "naive fp32 E[x^2] - E[x]^2")
        check(*kernels(backend).bn_stats(x), exact_mean, exact_var, f"{backend} bn_stats")
        # through the public function: momentum 1 leaves the batch mean and the unbiased batch variance
        rm, rv = torch.zeros_like(exact_mean).float(), torch.ones_like(exact_var).float()
        functional.bn_act(x, rm, rv, None, None, True, 1.0, 1e-5, backend=backend)
        n = x.numel() // x.shape[1]
        check(rm, rv, exact_mean, exact_var * n / (n - 1), f"{backend} bn_act running statistics")


def test_backend_selection():
    x = activation((2, 3, 4, 4), torch.float32, torch.contiguous_format)
    assert backends.resolve(None, x) == ("cpu" if backends.has_extension() else "torch")
    with backends.use("torch"):
        assert backends.resolve(None, x) == "torch"
        if backends.has_extension():
            assert backends.resolve("cpu", x) == "cpu"  # the call's own choice wins
        else:
            with pytest.raises(RuntimeError, match="backend 'cpu' cannot run this call: the compiled extension is unavailable"):
                backends.resolve("cpu", x)
    assert backends.resolve(None, x.double()) == "torch"  # fp64 runs in plain PyTorch
    backends.set_backend("torch")
    try:
        assert backends.get_backend() == "torch"
    finally:
        backends.set_backend("auto")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run this call: it takes CUDA tensors, got cpu"):
        backends.resolve("cuda", x)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.resolve("fast", x)


@pytest.mark.skipif(not backends.has_extension(), reason="the C++ CPU kernels' chunking")
@pytest.mark.parametrize("fmt", FORMATS)
def test_bn_stats_chunks_far_from_each_other(fmt):
    """The CPU statistics take a channel's later chunks (NCHW: plane segments) in one pass about an earlier chunk's mean
    and in two passes where that mean is far off against the chunk's spread: images whose means alternate between 0 and
    1e4 (spread 1 and 1e-2), and plain N(3, 1) data, against float64 within a few fp32 ulps (mean) and 2x the fp32
    rounding of a float64 variance's terms (var)."""
    torch.manual_seed(0)
    shape = (8, 3, 40, 40)
    far = torch.randn(shape).double()
    far[1::2] = far[1::2] * 1e-2 + 1e4
    for x64 in (far, torch.randn(shape).double() + 3.0):
        x = x64.float().contiguous(memory_format=fmt)
        exact_var, exact_mean = torch.var_mean(x.double(), (0, 2, 3), correction=0)
        mean, var = torch.ops.resnet_fused.bn_stats(x)
        eager_var, eager_mean = torch.var_mean(x, (0, 2, 3), correction=0)
        for got, eager, exact, what in ((mean, eager_mean, exact_mean, "mean"), (var, eager_var, exact_var, "var")):
            err, eager_err = (got.double() - exact).abs().max().item(), (eager.double() - exact).abs().max().item()
            ulp = torch.finfo(torch.float32).eps * exact.abs().max().item()
            assert err <= 2 * eager_err + 2 * ulp, f"{what}: error {err:.3g}, eager's {eager_err:.3g}, ulp {ulp:.3g}"
