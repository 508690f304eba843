"""The `cuda` backend's inference path: cuDNN's fused conv + bias (+ residual) + ReLU (resnet_fused::cudnn_conv_act)."""

import copy

import pytest
import torch
from torch import nn

from resnet_fused import backends, functional, reference
from resnet_fused.ops import conv_bn_act as conv_bn_act_module
from resnet_fused.nn import FusedConvBNReLU
from helpers import CL, NCHW, activation, assert_within_eager_error

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and backends.available()["cuda"]),
                                reason="needs a CUDA GPU and the extension built with CUDA")

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups, residual)
SHAPES = [
    (1, 3, 7, 7, 5, 3, 1, 1, 1, 1, False),
    (2, 3, 31, 29, 64, 7, 2, 3, 1, 1, False),  # the stem, odd sizes
    (3, 64, 14, 14, 64, 3, 1, 1, 1, 1, True),
    (2, 96, 9, 9, 40, 1, 2, 0, 1, 1, True),  # projection-like 1x1 stride 2, non-power-of-two channels
    (2, 32, 12, 12, 48, 3, 1, 2, 2, 4, True),  # dilation and groups
]


@pytest.fixture
def ieee_fp32():
    """fp32 convolutions in IEEE fp32 on both sides (no TF32), restored afterwards."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_conv_act_runs_cudnn_fused(shape, dtype, fmt, ieee_fp32, poisoned, monkeypatch):
    N, Cin, H, W, Cout, k, s, p, d, g, with_residual = shape
    x = activation((N, Cin, H, W), dtype, fmt, "cuda")
    w = (torch.randn(Cout, Cin // g, k, k, device="cuda") / (Cin // g * k * k) ** 0.5).to(dtype)
    b = torch.randn(Cout, device="cuda").to(dtype)
    Ho, Wo = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in (H, W))
    r = activation((N, Cout, Ho, Wo), dtype, fmt, "cuda") if with_residual else None

    calls = []
    real = conv_bn_act_module.cudnn_conv_act
    monkeypatch.setattr(conv_bn_act_module, "cudnn_conv_act", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        out = functional.conv_act(x, w, b, s, p, d, g, r, True, backend="cuda")
    assert calls, "conv_act did not take cuDNN's fused path"
    eager = reference.cudnn_conv_act(x, w, b, r, s, p, d, g)
    exact = reference.cudnn_conv_act(*(t.double() if t is not None else None for t in (x, w, b, r)), s, p, d, g)
    assert out.stride() == eager.stride(), f"strides {out.stride()} differ from eager's {eager.stride()}"
    assert_within_eager_error(out, eager, exact, f"cudnn_conv_act {shape} {dtype}", norm="fro")


def test_conv_act_leaves_cudnn_fused_path_when_it_cannot_apply(monkeypatch):
    """No ReLU, gradients needed, mixed dtypes, other backends: the plain conv path."""
    calls = []
    real = conv_bn_act_module.cudnn_conv_act
    monkeypatch.setattr(conv_bn_act_module, "cudnn_conv_act", lambda *a: calls.append(1) or real(*a))
    x = activation((2, 8, 9, 9), torch.float16, CL, "cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.float16)
    b = torch.randn(8, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        functional.conv_act(x, w, b, 1, 1, relu=False, backend="cuda")
        functional.conv_act(x, w, b.float(), 1, 1, backend="cuda")
        functional.conv_act(x, w, b, 1, 1, backend="torch")
    functional.conv_act(x, w.requires_grad_(), b, 1, 1, backend="cuda").sum().backward()
    assert not calls


def test_cudnn_conv_act_opcheck():
    x = activation((2, 16, 10, 10), torch.float16, CL, "cuda")
    w = torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.float16) * 0.1
    b = torch.randn(32, device="cuda", dtype=torch.float16)
    r = activation((2, 32, 5, 5), torch.float16, CL, "cuda")
    for residual in (None, r):
        torch.library.opcheck(torch.ops.resnet_fused.cudnn_conv_act, (x, w, b, residual, [2, 2], [1, 1], [1, 1], 1),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_conv_bn_relu_eval_matches_eager_module(dtype):
    """The drop-in module in eval on the `cuda` backend (folded BN, cuDNN's fused call) against eager."""
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(24, 40, 3, 2, 1, bias=False), nn.BatchNorm2d(40), nn.ReLU())
    with torch.no_grad():
        eager[1].running_mean.uniform_(-0.5, 0.5), eager[1].running_var.uniform_(0.5, 2.0)
        eager[1].weight.uniform_(0.5, 1.5), eager[1].bias.uniform_(-0.5, 0.5)
    fused = FusedConvBNReLU(24, 40, 3, 2, 1, bias=False)
    fused.conv.load_state_dict(eager[0].state_dict()), fused.bn.load_state_dict(eager[1].state_dict())
    exact = copy.deepcopy(eager).double().eval()
    x = activation((3, 24, 17, 17), dtype, CL, "cuda")
    with torch.no_grad(), backends.use("cuda"):
        e64 = exact.cuda()(x.double())
        e = eager.cuda().to(dtype).eval()(x)
        f = fused.cuda().to(dtype).eval()(x)
    assert_within_eager_error(f, e, e64, f"FusedConvBNReLU eval {dtype}", norm="fro")
