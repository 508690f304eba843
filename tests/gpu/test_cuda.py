"""GPU-only checks (skipped, visibly, without a GPU): the CUDA and Triton kernels at ResNet-50 stage
shapes in fp16 and bf16, both layouts, against eager and float64; opcheck of the CUDA kernel ops."""

import pytest
import torch

from helpers import CL, NCHW, activation, assert_within_eager_error
from resnet_fused import backends, functional, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_BACKENDS = [
    pytest.param("cuda", marks=pytest.mark.skipif(not backends.extension_has_cuda(), reason="_C built without CUDA")),
    "triton",
]
STAGE_SHAPES = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7), (3, 3, 7, 7)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bn_act_stage_shapes(backend, dtype, fmt, training, poisoned):
    """Forward, every gradient and the running statistics against eager in the same dtype and float64,
    in the 2-norm over each tensor (relative Frobenius error within 2x eager's own): over millions of
    elements a handful of ReLU masks flip where |z| < 1e-6, in eager and fused alike, and the max norm
    would measure those coin tosses instead of the arithmetic."""
    for shape in STAGE_SHAPES:
        C = shape[1]
        x = activation(shape, dtype, fmt, "cuda", scale=2.0, offset=0.5)
        r, g = activation(shape, dtype, fmt, "cuda"), activation(shape, dtype, fmt, "cuda")
        w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
        rm, rv = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5
        # keep the pre-activation z = bn(x) + r (float64) off ReLU's kink: a z within rounding of 0 flips its mask
        # in one implementation and not another (a whole grad_output element of error, not arithmetic)
        z = torch.nn.functional.batch_norm(x.double(), rm.double(), rv.double(), w.double(), b.double(), training, 0.0,
                                           1e-5) + r.double()
        push = torch.where(z.abs() < 0.05, 0.1 * torch.where(z < 0, -1.0, 1.0), 0.0)
        r = (r.double() + push).to(dtype).contiguous(memory_format=fmt)

        def run(fn, cast=None, **kw):
            leaves = [t.detach().clone().to(cast or t.dtype).requires_grad_() for t in (x, r, w, b)]
            m, v = rm.clone().to(cast or rm.dtype), rv.clone().to(cast or rv.dtype)
            out = fn(leaves[0], m, v, leaves[2], leaves[3], training, 0.1, 1e-5, leaves[1], True, **kw)
            out.backward(g.to(cast or g.dtype))
            return [out.detach(), *(t.grad for t in leaves), m, v]

        fused, eager = run(functional.bn_act, backend=backend), run(reference.bn_act)
        exact = run(reference.bn_act, cast=torch.float64)
        for i, (f, e, x64) in enumerate(zip(fused, eager, exact)):
            assert_within_eager_error(f, e, x64, f"{backend} {shape} {dtype} [{i}]", norm="fro")


def test_opcheck_cuda_kernel_ops():
    if not backends.extension_has_cuda():
        pytest.skip("_C built without CUDA")
    ops = torch.ops.resnet_fused
    for fmt in (NCHW, CL):
        x, r, g, y = (activation((2, 16, 5, 6), torch.float16, fmt, "cuda") for _ in range(4))
        v = lambda: torch.randn(16, device="cuda")  # noqa: E731
        for op, args in [
            (ops.add_relu_forward, (x, r)),
            (ops.bn_stats, (x,)),
            (ops.bn_act_apply, (x, v(), v(), r, "relu", 0.0)),
            (ops.bn_act_backward_reduce, (g, x, v(), y)),
            (ops.bn_act_backward_elemt, (g, y, x, v(), v(), v(), v(), True)),
            (ops.bn_act_backward_elemt, (g, None, None, None, v(), None, None, False)),
            (ops.bn_scale_shift, (v(), v().abs() + 0.5, v(), v(), 1e-5)),
            (ops.bn_scale_shift, (v().double(), v().abs().half() + 0.5, None, None, 1e-3)),
            (ops.bn_backward_coeffs, (v(), v(), v().abs() + 0.5, v(), 1e-5, 60.0, True)),
            (ops.bn_backward_coeffs, (v().double(), v().double(), v().abs() + 0.5, None, 1e-5, 60.0, False)),
            (ops.bn_act_backward, (g, x, v(), v().abs() + 0.5, v(), y, 1e-5, True, True, True, True)),
            (ops.bn_act_backward, (g, x, v(), v().abs() + 0.5, None, None, 1e-5, False, True, False, True)),
            (ops.bn_act_batch, (x, v(), v(), r, 1e-5, "relu", 0.0)),
            (ops.bn_act_running, (x, v(), v().abs() + 0.5, v(), v(), r, 1e-5, "relu", 0.0)),
        ]:
            torch.library.opcheck(op, args)


# (N, Cin, H, Cout, kernel, stride, residual): ResNet-50 convolutions at batch 32
CONV_SHAPES = [(32, 64, 56, 64, 3, 1, False), (32, 128, 56, 128, 3, 2, False), (32, 256, 14, 1024, 1, 1, True),
               (32, 3, 224, 64, 7, 2, False)]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_act_resnet50_shapes(backend, dtype, training, poisoned):
    """conv_bn_act forward and backward at real shapes, channels_last, against eager and float64
    (2-norm over each tensor: at these sizes it measures the arithmetic, not one ReLU mask flip)."""
    for N, Cin, H, Cout, k, s, with_residual in CONV_SHAPES:
        Ho = (H + 2 * (k // 2) - k) // s + 1
        x = activation((N, Cin, H, H), dtype, CL, "cuda")
        w = (torch.randn(Cout, Cin, k, k, device="cuda") / (Cin * k * k) ** 0.5).to(dtype)
        r = activation((N, Cout, Ho, Ho), dtype, CL, "cuda") if with_residual else None
        g = activation((N, Cout, Ho, Ho), dtype, CL, "cuda")
        bw, bb = torch.rand(Cout, device="cuda") + 0.5, torch.randn(Cout, device="cuda")
        rm, rv = torch.randn(Cout, device="cuda") * 0.3, torch.rand(Cout, device="cuda") + 0.5

        def run(fused, cast=None):
            dt = cast or dtype
            xs, ws, rs = (None if t is None else t.detach().clone().to(dt).requires_grad_() for t in (x, w, r))
            bws, bbs = bw.clone().to(dt).requires_grad_(), bb.clone().to(dt).requires_grad_()
            m, v = rm.clone().to(dt), rv.clone().to(dt)
            if fused:
                out = functional.conv_bn_act(xs, ws, None, m, v, bws, bbs, s, k // 2, 1, 1, training, 0.1, 1e-5, rs,
                                             backend=backend)
            else:
                y = torch.nn.functional.batch_norm(torch.nn.functional.conv2d(xs, ws, None, s, k // 2), m, v, bws, bbs,
                                                   training, 0.1, 1e-5)
                out = torch.relu(y + rs if rs is not None else y)
            out.backward(g.to(dt))
            return [out.detach(), xs.grad, ws.grad, bws.grad, bbs.grad] + ([rs.grad] if rs is not None else []) + [m, v]

        for i, (f, e, x64) in enumerate(zip(run(True), run(False), run(False, torch.float64))):
            assert_within_eager_error(f, e, x64, f"{backend} {dtype} k{k} s{s} Cin={Cin} [{i}]", norm="fro")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_bottleneck_training_resnet50_stage(backend, dtype):
    """A torchvision Bottleneck after fuse_ (Triton: the deferred BN + ReLU data flow) against the
    original in the same dtype and float64, at layer1's shape, batch 32."""
    import copy

    import torchvision

    import resnet_fused

    torch.manual_seed(0)
    eager = torchvision.models.resnet.Bottleneck(256, 64).cuda().to(memory_format=torch.channels_last)
    fused = resnet_fused.fuse_(copy.deepcopy(eager).to(dtype), backend=backend)
    exact = copy.deepcopy(eager).double()
    eager = eager.to(dtype)
    x = activation((32, 256, 56, 56), dtype, CL, "cuda")
    g = activation(x.shape, dtype, CL, "cuda")

    def run(model, cast=None):
        xs = x.detach().clone().to(cast or dtype).requires_grad_()
        out = model.train()(xs)
        out.backward(g.to(cast or dtype))
        return [out.detach(), xs.grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                torch.cat([b.reshape(-1) for b in model.buffers() if b.is_floating_point()])]

    for name, f, e, x64 in zip(("output", "grad input", "parameter grads", "running stats"), run(fused), run(eager),
                               run(exact, torch.float64)):
        assert_within_eager_error(f, e, x64, f"{backend} {dtype} {name}", norm="fro")
