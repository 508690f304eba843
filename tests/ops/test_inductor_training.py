"""torch.compile(backend="inductor", fullgraph=True) in training on CPU (cpu backend): forward and
backward of add_relu, bn_act (training) and conv_bn_act (training), and a FusedBasicBlock in train mode,
against eager execution of the same fused code: outputs, gradients, running statistics. Tiny shapes: CPU
inductor compiles take seconds each."""

import copy

import pytest
import torch

from helpers import CL, activation, backend_params, randomize_bn
from resnet_fused import functional
from resnet_fused.nn import FusedBasicBlock

CPU = [p for p in backend_params(include_triton=False) if p.values[0] == "cpu"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _step(fn, leaves, buffers, grad):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    buffers = [b.clone() for b in buffers]
    out = fn(*leaves, *buffers)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in leaves] + buffers


def _assert_same(got, expected, what):
    """Inductor runs our ops as extern kernels and only reorders / fuses the glue around them: the same
    values up to fp32 rounding of the glue (a few ulps), not a tolerance on the kernels."""
    for i, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=4 * torch.finfo(torch.float32).eps, atol=4 * torch.finfo(torch.float32).eps,
                                   msg=lambda m: f"{what} [{i}]: {m}")


@pytest.mark.parametrize("backend", CPU)
def test_ops_inductor_training(backend):
    N, C, H, W = 2, 5, 3, 4
    x, r = activation((N, C, H, W), torch.float32, CL, scale=2.0, offset=0.5), activation((N, C, H, W), torch.float32, CL)
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv = torch.randn(C) * 0.3, torch.rand(C) + 0.5
    cw = torch.randn(C, 3, 3, 3) / 5
    xc = activation((N, 3, H + 1, W + 2), torch.float32, CL)
    rc = activation((N, C, H + 1, W + 2), torch.float32, CL)

    def fn(x, r, w, b, cw, xc, rc, rm, rv, rm2, rv2):
        y = functional.add_relu(x, r, backend=backend)
        y = functional.bn_act(y, rm, rv, w, b, True, 0.1, 1e-5, r, True, backend=backend)
        z = functional.conv_bn_act(xc, cw, None, rm2, rv2, w, b, 1, 1, 1, 1, True, 0.1, 1e-5, rc, True, backend=backend)
        return y.sum((2, 3)) + z.sum((2, 3))

    leaves, buffers = [x, r, w, b, cw, xc, rc], [rm, rv, rm.clone(), rv.clone()]
    grad = torch.randn(N, C)
    expected = _step(fn, leaves, buffers, grad)
    got = _step(torch.compile(fn, backend="inductor", fullgraph=True), leaves, buffers, grad)
    _assert_same(got, expected, "ops")


@pytest.mark.parametrize("backend", CPU)
def test_fused_basic_block_inductor_training(backend):
    torch.manual_seed(0)
    down = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 1, 2, bias=False), torch.nn.BatchNorm2d(6))
    block = randomize_bn(FusedBasicBlock(4, 6, 2, down, backend=backend)).to(memory_format=CL).train()
    compiled_block = copy.deepcopy(block)
    compiled = torch.compile(compiled_block, backend="inductor", fullgraph=True)
    x = activation((2, 4, 7, 7), torch.float32, CL)
    grad = activation((2, 6, 4, 4), torch.float32, CL)
    results = []
    for model, run in ((block, block), (compiled_block, compiled)):
        xi = x.clone().requires_grad_()
        out = run(xi)
        out.backward(grad)
        results.append([out.detach(), xi.grad] + [p.grad for p in model.parameters()] + [b.clone() for b in model.buffers()])
    _assert_same(results[1], results[0], "FusedBasicBlock")
