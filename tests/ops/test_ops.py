"""Every op through torch.library.opcheck, gradcheck in float64, fp32 gradients against float64, and
torch.compile(fullgraph=True). Only what needs resnet_fused._C (the cpu backend's params) skips without it.

Every input is built on its backend's device (helpers.device_of): CUDA for cuda and triton on a GPU
machine (where TRITON_INTERPRET is unset and the compiled kernels need CUDA pointers), CPU otherwise."""

import pytest
import torch

from helpers import CL, NCHW, activation, assert_within_eager_error, backend_params, device_of
from resnet_fused import functional, reference

OPS = torch.ops.resnet_fused
SHAPE = (2, 5, 3, 4)


def _vec(device, C=SHAPE[1], positive=False):
    v = torch.randn(C, device=device)
    return v.abs() + 0.5 if positive else v


def _kernel_op_cases(prefix, device):
    """(op, args) for each kernel op, in both layouts, with and without its optional tensors."""
    def op(name):
        return getattr(OPS, prefix + name)

    def vec():
        return _vec(device)

    for fmt in (NCHW, CL):
        x, r, g, y = (activation(SHAPE, torch.float32, fmt, device) for _ in range(4))
        yield op("add_relu_forward"), (x, r)
        yield op("bn_stats"), (x,)
        yield op("bn_act_apply"), (x, vec(), vec(), r, "relu", 0.0)
        yield op("bn_act_apply"), (x, vec(), vec(), None, "none", 0.0)
        yield op("bn_act_apply"), (x, vec(), vec(), r, "leaky_relu", 0.2)
        yield op("bn_act_apply"), (x, vec(), vec(), None, "silu", 0.0)
        yield op("act_backward"), (g, x, vec(), vec(), r, "gelu", 0.0)
        yield op("act_backward"), (g, x, vec(), vec(), None, "hardswish", 0.0)
        yield op("bn_act_backward_reduce"), (g, x, vec(), y)
        yield op("bn_act_backward_reduce"), (g, x, vec(), None)
        yield op("bn_act_backward_elemt"), (g, y, x, vec(), vec(), vec(), vec(), True)
        yield op("bn_act_backward_elemt"), (g, None, None, None, vec(), None, None, False)
    # the per-channel coefficient ops: (C,) vectors of any floating dtype in, fp32 out
    pos = _vec(device, positive=True)
    yield op("bn_scale_shift"), (vec(), pos, vec(), vec(), 1e-5)
    yield op("bn_scale_shift"), (vec().double(), pos.half(), None, None, 1e-3)
    yield op("bn_scale_shift"), (vec(), pos, vec().bfloat16(), None, 1e-5)
    yield op("bn_backward_coeffs"), (vec(), vec(), pos, vec(), 1e-5, 24.0, True)
    yield op("bn_backward_coeffs"), (vec().double(), vec().double(), pos, None, 1e-5, 24.0, True)
    yield op("bn_backward_coeffs"), (vec(), vec(), pos.half(), vec().half(), 1e-3, 24.0, False)


@pytest.mark.parametrize("backend", backend_params(include_triton=True))
def test_opcheck_kernel_ops(backend):
    """The C++ kernel ops (CPU here, CUDA in test_cuda.py) and the Triton ones (ops named triton_*)."""
    if backend in ("cuda", "torch"):
        pytest.skip("cuda: covered by tests/gpu/test_cuda.py; torch: plain functions, not ops")
    device = device_of(backend)
    for op, args in _kernel_op_cases("triton_" if backend == "triton" else "", device):
        assert all(a.device.type == device for a in args if isinstance(a, torch.Tensor))
        torch.library.opcheck(op, args)


def _autograd_op_cases(backend):
    device = device_of(backend)
    for fmt in (NCHW, CL):
        def act():
            return activation(SHAPE, torch.float32, fmt, device).requires_grad_()

        w, b = _vec(device).requires_grad_(), _vec(device).requires_grad_()
        rm, rv = _vec(device), _vec(device, positive=True)
        yield OPS.add_relu, (act(), act(), backend)
        yield OPS.bn_act_train, (act(), w, b, act(), 1e-5, "relu", 0.0, backend)
        yield OPS.bn_act_train, (act(), None, None, None, 1e-3, "none", 0.0, backend)
        yield OPS.bn_act_train, (act(), w, b, act(), 1e-5, "silu", 0.0, backend)
        yield OPS.bn_act_eval, (act(), rm, rv, w, b, act(), 1e-5, "relu", 0.0, backend)
        yield OPS.bn_act_eval, (act(), rm.clone(), rv.clone(), None, None, None, 1e-5, "none", 0.0, backend)
        yield OPS.bn_act_eval, (act(), rm.clone(), rv.clone(), w, b, act(), 1e-5, "leaky_relu", 0.2, backend)


@pytest.mark.parametrize("backend", backend_params(include_triton=True))
def test_opcheck_autograd_ops(backend):
    """add_relu, bn_act_train, bn_act_eval on each backend, inputs on its device (fp16 / bf16 and
    conv2d_stats on both GPU backends: tests/gpu/test_gpu_ops.py)."""
    for op, args in _autograd_op_cases(backend):
        assert all(a.device.type == device_of(backend) for a in args if isinstance(a, torch.Tensor))
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu,with_residual", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_gradcheck_float64(training, relu, with_residual, fmt):
    """The autograd formulas (reduce + elemt passes, fp64 coefficients) against finite differences."""
    x = activation((3, 4, 3, 2), torch.float64, fmt).requires_grad_()
    r = activation((3, 4, 3, 2), torch.float64, fmt).requires_grad_() if with_residual else None
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def fn(x, w, b, *res):
        return functional.bn_act(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, res[0] if res else None, relu)

    inputs = (x, w, b) + ((r,) if r is not None else ())
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_add_relu_float64():
    x, r = (activation((2, 3, 4, 5), torch.float64, CL).requires_grad_() for _ in range(2))
    assert torch.autograd.gradcheck(functional.add_relu, (x, r))


def _grad_cases(device):
    """(name, fused fn(backend, *leaves), reference fn(*leaves), leaves, relu-relevant) in fp32, odd shapes."""
    N, C, H, W = 3, 5, 4, 3
    for fmt in (NCHW, CL):
        x, r = activation((N, C, H, W), torch.float32, fmt, device, 2.0, 0.5), activation((N, C, H, W), torch.float32, fmt, device)
        w, b = _vec(device), _vec(device)
        rm, rv = _vec(device) * 0.3, _vec(device, positive=True)
        yield f"add_relu {fmt}", (lambda be, x, r: functional.add_relu(x, r, backend=be)), reference.add_relu, (x, r)
        for training in (True, False):
            for with_residual, relu in ((True, True), (False, True), (True, False)):
                def bn(be, x, w, b, *res, training=training, relu=relu):
                    kw = {} if be is None else dict(backend=be)
                    fn = functional.bn_act if be is not None else reference.bn_act
                    return fn(x, rm.clone().to(x.dtype), rv.clone().to(x.dtype), w, b, training, 0.1, 1e-5,
                              res[0] if res else None, relu, **kw)
                yield (f"bn_act {'train' if training else 'eval'} res={with_residual} relu={relu} {fmt}", bn,
                       (lambda *a, bn=bn: bn(None, *a)), (x, w, b) + ((r,) if with_residual else ()))
        cw, cb = torch.randn(C, 4, 3, 3, device=device) / 6, _vec(device)
        xc = activation((N, 4, H + 1, W + 2), torch.float32, fmt, device)
        rc = activation((N, C, H + 1, W + 2), torch.float32, fmt, device)

        def conv(be, x, cw, cb, w, b, r):
            kw = {} if be is None else dict(backend=be)
            fn = functional.conv_bn_act if be is not None else reference.conv_bn_act
            return fn(x, cw, cb, rm.clone().to(x.dtype), rv.clone().to(x.dtype), w, b, 1, 1, 1, 1, True, 0.1, 1e-5, r, True, **kw)
        yield f"conv_bn_act train {fmt}", conv, (lambda *a: conv(None, *a)), (xc, cw, cb, w, b, rc)


def _grads(fn, leaves, grad_out, dtype):
    leaves = [t.detach().clone().to(dtype).requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(grad_out.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend", [p for p in backend_params(include_triton=True) if p.values[0] in ("cpu", "triton")])
def test_fp32_gradients_against_float64(backend):
    """The fp32 kernels' analytic gradients (autograd, one random grad_output) against the float64
    reference's, under the eager-error rule (the eager fp32 composition's gradients as the yardstick):
    gradcheck above runs in float64, which the torch backend computes, never these kernels. Per-channel
    gradients of the BN parameters and the conv bias are sums of cancelling terms, checked at the
    resolution of those sums (2 fp32 ulps of sum |term|, the per-element g's magnitude bounding them)."""
    device = device_of(backend)
    eps32 = torch.finfo(torch.float32).eps
    for name, fused, ref, leaves in _grad_cases(device):
        with torch.no_grad():
            grad_out = torch.randn_like(ref(*leaves))
        got = _grads(lambda *a: fused(backend, *a), leaves, grad_out, torch.float32)
        eager = _grads(ref, leaves, grad_out, torch.float32)
        exact = _grads(ref, leaves, grad_out, torch.float64)
        for i, (a, e, x64) in enumerate(zip(got, eager, exact)):
            # (C,) results are per-channel sums over N*H*W terms of size ~|g| * (1 + |x_hat|)
            res = None
            if x64.dim() == 1:
                res = 2 * eps32 * (grad_out.double().abs().sum((0, 2, 3)) * (1 + leaves[0].double().abs().amax()))
            assert_within_eager_error(a, e, x64, f"{backend} {name} [{i}]", resolution=res)


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_torch_compile_fullgraph(fmt):
    """A residual tail (BN + add + ReLU, then BN + ReLU) compiles without graph breaks and agrees with eager."""
    C = 6
    bn1, bn2 = torch.nn.BatchNorm2d(C), torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        for bn in (bn1, bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)

    def tail(x, skip, training):
        y = functional.bn_act(x, bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias, training, 0.1, 1e-5, residual=skip)
        return functional.add_relu(
            functional.bn_act(y, bn2.running_mean, bn2.running_var, bn2.weight, bn2.bias, training, 0.1, 1e-5, act=None), skip
        )

    compiled = torch.compile(tail, fullgraph=True, backend="aot_eager")
    x, skip = activation((2, C, 5, 5), torch.float32, fmt), activation((2, C, 5, 5), torch.float32, fmt)
    for training in (True, False):
        state = [t.clone() for t in (bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var)]
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = tail(xa, skip, training)
        expected.sum().backward()
        eager_state = [t.clone() for t in (bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var)]
        for t, s in zip((bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var), state):
            t.copy_(s)
        out = compiled(xb, skip, training)
        out.sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(xb.grad, xa.grad)
        for t, e in zip((bn1.running_mean, bn1.running_var, bn2.running_mean, bn2.running_var), eager_state):
            torch.testing.assert_close(t, e)


def test_torch_compile_inductor_cpu():
    """Inductor keeps our ops as extern calls and runs them (eval, no grad)."""
    x = activation((2, 4, 6, 6), torch.float32, CL)
    rm, rv, w, b = torch.randn(4), torch.rand(4) + 0.5, torch.randn(4), torch.randn(4)
    fn = lambda x: functional.bn_act(x, rm, rv, w, b, False, 0.1, 1e-5, residual=x)  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x), fn(x))
