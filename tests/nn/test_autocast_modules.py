"""Fused modules under torch.autocast on the CPU: the output dtype and values of the eager module they
replace under the same autocast, in training (forward and backward) and eval, on every CPU backend.
(On the GPU, with the cuda backend's own conv ops: tests/gpu/test_gpu_cudnn.py; the op-level rule:
tests/ops/test_autocast_rule.py.)"""

import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from helpers import FORMATS, activation, assert_within_eager_error, backend_params, randomize_bn
from resnet_fused import backends
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU

TV = torchvision.models.resnet


def _projection(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _modules(kind):
    """(fused, eager twin with the same state); the fused modules take the backend in force."""
    if kind == "basic":
        return FusedBasicBlock(8, 16, 2, _projection(8, 16, 2)), TV.BasicBlock(8, 16, 2, _projection(8, 16, 2))
    if kind == "bottleneck":
        return FusedBottleneck(8, 4, 1, _projection(8, 16, 1)), TV.Bottleneck(8, 4, 1, _projection(8, 16, 1))
    eager = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
    if kind == "fuse_chain":
        return resnet_fused.fuse_(copy.deepcopy(eager), backend=None), eager
    fused = FusedConvBNReLU(8, 12, 3, padding=1, bias=True)
    return fused, nn.Sequential(copy.deepcopy(fused.conv), copy.deepcopy(fused.bn), nn.ReLU())


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] != "cuda"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "conv_bn_relu", "fuse_chain"])
def test_fused_module_under_cpu_autocast(kind, training, fmt, backend):
    fused, eager = _modules(kind)
    randomize_bn(eager)
    fused.load_state_dict({k.replace("0.", "conv.").replace("1.", "bn.") if kind == "conv_bn_relu" else k: v
                           for k, v in eager.state_dict().items()})
    fused, eager = fused.to(memory_format=fmt), eager.to(memory_format=fmt)
    exact = copy.deepcopy(eager).double()
    for m in (fused, eager, exact):
        m.train(training)
    # Triton's interpreter computes bf16 tl.dot wrongly (DESIGN.md): its conv (training's deferred BN) in fp16 here
    low = torch.float16 if backend == "triton" else torch.bfloat16
    x = activation((3, 8, 9, 7), torch.float32, fmt)
    results = []
    for m, dtype in ((fused, None), (eager, None), (exact, torch.float64)):
        xi = x.detach().to(dtype or x.dtype, copy=True).requires_grad_()
        with backends.use(backend), torch.autocast("cpu", dtype=low, enabled=dtype is None):
            out = m(xi)
        out.float().sum().backward() if dtype is None else out.sum().backward()
        results.append((out.detach(), xi.grad))
    (f, f_grad), (e, e_grad), (x64, x64_grad) = results
    assert f.dtype == e.dtype == low, f"output {f.dtype}, eager's {e.dtype}"
    assert f_grad.dtype == e_grad.dtype
    assert_within_eager_error(f, e, x64, f"{kind} {backend}: output", norm="fro")
    assert_within_eager_error(f_grad, e_grad, x64_grad, f"{kind} {backend}: grad input", norm="fro")
