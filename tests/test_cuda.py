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
    for shape in STAGE_SHAPES:
        C = shape[1]
        x = activation(shape, dtype, fmt, "cuda", scale=2.0, offset=0.5)
        r, g = activation(shape, dtype, fmt, "cuda"), activation(shape, dtype, fmt, "cuda")
        w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
        rm, rv = torch.randn(C, device="cuda"), torch.rand(C, device="cuda") + 0.5

        def run(fn, cast=None, **kw):
            leaves = [t.detach().clone().to(cast or t.dtype).requires_grad_() for t in (x, r, w, b)]
            m, v = rm.clone().to(cast or rm.dtype), rv.clone().to(cast or rv.dtype)
            out = fn(leaves[0], m, v, leaves[2], leaves[3], training, 0.1, 1e-5, leaves[1], True, **kw)
            out.backward(g.to(cast or g.dtype))
            return [out.detach(), *(t.grad for t in leaves), m, v]

        fused, eager = run(functional.bn_act, backend=backend), run(reference.bn_act)
        exact = run(reference.bn_act, cast=torch.float64)
        for i, (f, e, x64) in enumerate(zip(fused, eager, exact)):
            assert_within_eager_error(f, e, x64, f"{backend} {shape} {dtype} [{i}]")


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
            (ops.bn_act_apply, (x, v(), v(), r, True)),
            (ops.bn_act_backward_reduce, (g, x, v(), y)),
            (ops.bn_act_backward_elemt, (g, y, x, v(), v(), v(), v(), True)),
            (ops.bn_act_backward_elemt, (g, None, None, None, v(), None, None, False)),
        ]:
            torch.library.opcheck(op, args)
