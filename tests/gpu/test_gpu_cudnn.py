"""The `cuda` backend's inference path (resnet_fused/ops/cudnn.py): cuDNN's conv + our epilogue pass, or
cuDNN's fused conv + add + bias + ReLU (resnet_fused::cudnn_conv_add_relu) where a residual joins and
cudnn_fuses admits the shape; no NaN from an output buffer that held NaN; the fallback where cuDNN has no
fused engine; conv2d's autocast rule; a projection shortcut's BN shift on the last conv's bias."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from helpers import CL, NCHW, activation, assert_within_eager_error, randomize_bn
from resnet_fused import backends, functional, reference
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU
from resnet_fused.ops import cudnn

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and backends.available()["cuda"]),
                                reason="needs a CUDA GPU and the extension built with CUDA")

# (N, Cin, H, W, Cout, kernel, stride, padding, dilation, groups, residual)
SHAPES = [
    (1, 3, 7, 7, 5, 3, 1, 1, 1, 1, False),
    (2, 3, 31, 29, 64, 7, 2, 3, 1, 1, True),  # the stem, odd sizes (no fused engine: Cin = 3)
    (3, 64, 14, 14, 64, 3, 1, 1, 1, 1, True),
    (3, 64, 14, 14, 64, 3, 1, 1, 1, 1, False),
    (2, 96, 9, 9, 40, 1, 2, 0, 1, 1, True),  # projection-like 1x1 stride 2, non-power-of-two channels
    (2, 32, 12, 12, 48, 3, 1, 2, 2, 4, True),  # dilation and groups (no fused engine: groups)
    (2, 24, 10, 10, 20, 3, 1, 1, 1, 1, True),  # Cout = 20: fused in fp32 (TF32) only
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def ieee_fp32():
    """fp32 convolutions in IEEE fp32 on both sides (no TF32), restored afterwards."""
    was = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = was


def _poison_next(shape, dtype, fmt):
    """Leaves a NaN-filled block of this size in the caching allocator: the next allocation of the size
    (a conv's output) gets that memory back, NaN and all."""
    torch.cuda.synchronize()
    t = torch.full(shape, float("nan"), dtype=dtype, device="cuda").contiguous(memory_format=fmt)
    del t


def _case(shape, dtype, fmt):
    N, Cin, H, W, Cout, k, s, p, d, g, with_residual = shape
    x = activation((N, Cin, H, W), dtype, fmt, "cuda")
    w = (torch.randn(Cout, Cin // g, k, k, device="cuda") / (Cin // g * k * k) ** 0.5).to(dtype).contiguous(memory_format=fmt)
    b = torch.randn(Cout, device="cuda").to(dtype)
    Ho, Wo = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n in (H, W))
    r = activation((N, Cout, Ho, Wo), dtype, fmt, "cuda") if with_residual else None
    return x, w, b, r, (s, p, d, g), (N, Cout, Ho, Wo)


def _eager(x, w, b, r, conv):
    y = torch.nn.functional.conv2d(x, w, b, *conv)
    return torch.relu(y + r if r is not None else y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("+r" if s[-1] else ""))
def test_conv_act_on_the_cuda_backend(shape, dtype, fmt, ieee_fp32, monkeypatch):
    """Every shape runs (no raise where cuDNN has no fused engine), with NaN left in the memory its output
    takes; cuDNN's fused call exactly where a residual joins and cudnn_fuses admits it; the eager layout;
    the eager-error rule against float64."""
    x, w, b, r, conv, out_shape = _case(shape, dtype, fmt)
    calls = []
    real = cudnn.cudnn_conv_add_relu
    monkeypatch.setattr(cudnn, "cudnn_conv_add_relu", lambda *a: calls.append(1) or real(*a))
    _poison_next(out_shape, dtype, fmt)
    with torch.no_grad():
        out = functional.conv_act(x, w, b, *conv[:3], conv[3], r, True, backend="cuda")
    fuses = cudnn.cudnn_fuses(x.shape, w.shape, dtype, fmt == CL, conv[3], allow_tf32=False)
    assert bool(calls) == (r is not None and fuses), f"cuDNN's fused call: {bool(calls)}, cudnn_fuses: {fuses}"
    eager = _eager(x, w, b, r, conv)
    exact = _eager(*(t.double() if t is not None else None for t in (x, w, b, r)), conv)
    assert out.stride() == eager.stride(), f"strides {out.stride()} differ from eager's {eager.stride()}"
    assert_within_eager_error(out, eager, exact, f"conv_act {shape} {dtype}", norm="fro")


def test_every_shape_cudnn_fuses_admits_runs_fused():
    """cudnn_fuses's rules against cuDNN itself: each admitted shape, dtype and TF32 setting runs
    cudnn_convolution_add_relu without an error (a wrong rule would raise at a user's conv)."""
    was = torch.backends.cudnn.allow_tf32
    try:
        for tf32 in (True, False):
            torch.backends.cudnn.allow_tf32 = tf32
            for shape in SHAPES:
                for dtype in DTYPES:
                    x, w, b, r, conv, _ = _case(shape[:-1] + (True,), dtype, CL)
                    if cudnn.cudnn_fuses(x.shape, w.shape, dtype, True, conv[3], tf32):
                        torch.ops.resnet_fused.cudnn_conv_add_relu(x, w, b, r, *(list((v, v)) for v in conv[:3]), conv[3])
        torch.cuda.synchronize()
    finally:
        torch.backends.cudnn.allow_tf32 = was


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relu_without_residual_never_reads_its_output(dtype):
    """conv + bias + ReLU alone on the output memory a NaN-filled tensor freed, a hundred times over (aten's
    cudnn_convolution_relu would add 0 * that memory): no NaN, and eager's values within its error."""
    x, w, b, _, conv, out_shape = _case((4, 64, 14, 14, 64, 3, 1, 1, 1, 1, False), dtype, CL)
    eager = _eager(x, w, b, None, conv)
    exact = _eager(x.double(), w.double(), b.double(), None, conv)
    for i in range(100):
        _poison_next(out_shape, dtype, CL)
        with torch.no_grad():
            out = functional.conv_act(x, w, b, *conv[:3], conv[3], None, True, backend="cuda")
        assert not out.isnan().any(), f"call {i}: NaN from the output's previous contents"
    assert_within_eager_error(out, eager, exact, f"conv + bias + ReLU {dtype}", norm="fro")


def test_cudnn_conv_add_relu_opcheck():
    x = activation((2, 16, 10, 10), torch.float16, CL, "cuda")
    w = (torch.randn(32, 16, 3, 3, device="cuda", dtype=torch.float16) * 0.1).contiguous(memory_format=CL)
    b = torch.randn(32, device="cuda", dtype=torch.float16)
    r = activation((2, 32, 5, 5), torch.float16, CL, "cuda")
    torch.library.opcheck(torch.ops.resnet_fused.cudnn_conv_add_relu, (x, w, b, r, [2, 2], [1, 1], [1, 1], 1),
                          test_utils=("test_schema", "test_faketensor"))


def test_conv_act_leaves_the_cuda_path_when_gradients_are_needed(monkeypatch):
    """Gradients needed, other backends: the plain autograd path (neither the epilogue kernel nor cuDNN's fused call)."""
    calls = []
    monkeypatch.setattr(cudnn, "conv_act", lambda *a: calls.append(1))
    x = activation((2, 8, 9, 9), torch.float16, CL, "cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda", dtype=torch.float16)
    b = torch.randn(8, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        functional.conv_act(x, w, b, 1, 1, backend="torch")
    functional.conv_act(x, w.requires_grad_(), b, 1, 1, backend="cuda").sum().backward()
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_conv_bn_relu_eval_matches_eager_module(dtype):
    """The drop-in module in eval on the `cuda` backend (folded BN, conv + epilogue) against eager."""
    eager = randomize_bn(nn.Sequential(nn.Conv2d(24, 40, 3, 2, 1, bias=False), nn.BatchNorm2d(40), nn.ReLU()))
    fused = FusedConvBNReLU(24, 40, 3, 2, 1, bias=False)
    fused.conv.load_state_dict(eager[0].state_dict()), fused.bn.load_state_dict(eager[1].state_dict())
    exact = copy.deepcopy(eager).double().eval().cuda()
    x = activation((3, 24, 17, 17), dtype, CL, "cuda")
    with torch.no_grad(), backends.use("cuda"):
        e64 = exact(x.double())
        e = eager.cuda().to(dtype).eval()(x)
        f = fused.cuda().to(dtype).eval()(x)
    assert_within_eager_error(f, e, e64, f"FusedConvBNReLU eval {dtype}", norm="fro")


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_projection_block_eval_on_the_cuda_backend(kind, fmt, monkeypatch):
    """A block with a projection shortcut in eval (bf16): the shortcut's conv runs once, without a bias
    and without an epilogue pass (its BN shift joins the last conv's bias); the eager-error rule."""
    cls, tv, planes = (FusedBasicBlock, torchvision.models.resnet.BasicBlock, 24) if kind == "basic" else (
        FusedBottleneck, torchvision.models.resnet.Bottleneck, 8)
    out = planes * cls.expansion
    down = nn.Sequential(nn.Conv2d(16, out, 1, 2, bias=False), nn.BatchNorm2d(out))
    eager = randomize_bn(tv(16, planes, 2, down)).eval()
    fused = cls(16, planes, 2, copy.deepcopy(down), backend="cuda").eval()
    fused.load_state_dict(eager.state_dict())
    exact = copy.deepcopy(eager).double().cuda()
    eager, fused = (m.cuda().to(torch.bfloat16, memory_format=fmt) for m in (eager, fused))
    applies = []
    real = cudnn.kernels("cuda").bn_act_apply
    monkeypatch.setattr(cudnn, "kernels", lambda _: type("K", (), {"bn_act_apply": staticmethod(
        lambda y, *a: applies.append(y.shape) or real(y, *a))}))
    x = activation((3, 16, 9, 9), torch.bfloat16, fmt, "cuda")
    with torch.no_grad():
        f, e, e64 = fused(x), eager(x), exact(x.double())
    assert len(applies) <= cls.num_convs, f"{len(applies)} epilogue passes for {cls.num_convs} convs + the shortcut"
    assert_within_eager_error(f, e, e64, f"{kind} eval, projection shortcut", norm="fro")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_block_under_cuda_autocast(dtype, training):
    """An fp32 block under torch.autocast("cuda"): its convolutions in the autocast dtype, so its output
    dtype is eager's; values within the eager-error rule (2-norm) against float64."""
    down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    eager = randomize_bn(torchvision.models.resnet.BasicBlock(16, 32, 2, down)).cuda().to(memory_format=CL)
    fused = FusedBasicBlock(16, 32, 2, copy.deepcopy(down), backend="cuda").cuda().to(memory_format=CL)
    fused.load_state_dict(eager.state_dict())
    exact = copy.deepcopy(eager).double()
    for m in (eager, fused, exact):
        m.train(training)
    x = activation((3, 16, 9, 9), torch.float32, CL, "cuda")
    with torch.no_grad():
        with torch.autocast("cuda", dtype=dtype):
            f, e = fused(x), eager(x)
        e64 = exact(x.double())
    assert f.dtype == e.dtype == dtype
    assert_within_eager_error(f, e, e64, f"autocast {dtype} training={training}", norm="fro")


def test_cudnn_conv_add_relu_takes_the_autocast_dtype():
    """The op itself under autocast: fp32 operands, output in the autocast dtype (conv2d's rule)."""
    x, w, b, r, conv, _ = _case((2, 64, 8, 8, 64, 3, 1, 1, 1, 1, True), torch.float32, CL)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            out = torch.ops.resnet_fused.cudnn_conv_add_relu(x, w, b, r, [1, 1], [1, 1], [1, 1], 1)
        assert out.dtype == dtype
        ref = reference.cudnn_conv_add_relu(*(t.to(dtype) for t in (x, w, b, r)), 1, 1, 1, 1)
        exact = reference.cudnn_conv_add_relu(*(t.to(dtype).double() for t in (x, w, b, r)), 1, 1, 1, 1)
        assert_within_eager_error(out, ref, exact, f"autocast {dtype}", norm="fro")


@pytest.mark.parametrize("graphs", [False, True], ids=["passes", "graphs"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_padded_stem_on_the_cuda_backend(dtype, training, graphs):
    """The tuner's cuda-padded candidate (Variant(pad_channels=True)) on the ResNet stem, 3 -> 8 channels, odd sizes:
    eval (folded, with and without the cuDNN graphs: padded, the conv + bias + ReLU graph may take it) and a training
    step, against eager and float64 in the 2-norm, the output channels_last."""
    from helpers import Trio

    if graphs and not cudnn.graphs_built():
        pytest.skip("_C built without the cuDNN graphs")
    torch.manual_seed(0)
    eager = randomize_bn(nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU()))
    fused = FusedConvBNReLU(3, 64, 7, 2, 3, backend="cuda")
    fused.conv.load_state_dict(eager[0].state_dict()), fused.bn.load_state_dict(eager[1].state_dict())
    fused, eager = (m.to("cuda", dtype, memory_format=CL) for m in (fused, eager))
    x = activation((4, 3, 37, 35), dtype, CL, "cuda")
    with backends.use_variant(backends.Variant(pad_channels=True)), cudnn.graphs(graphs):
        if training:
            Trio(fused, eager, whole_network=True).step(x, True, f"padded stem train {dtype}", CL)
        else:
            fused.eval(), eager.eval()
            with torch.no_grad():
                exact = copy.deepcopy(eager).double()(x.double())
                out = fused(x)
                assert out.is_contiguous(memory_format=CL)
                assert_within_eager_error(out, eager(x), exact, f"padded stem eval {dtype} graphs={graphs}", factor=3.0,
                                          norm="fro")
    assert fused.conv.weight.shape == (64, 3, 7, 7)
