"""The autograd ops through torch.library.opcheck on the GPU backends, in fp16 and bf16 (fp32:
tests/ops/test_ops.py, tests/ops/test_conv_stats.py), and the `poisoned` fixture on CUDA tensors.

Each test runs on ("cuda", "cuda") and ("cuda", "triton"), skipped visibly without a GPU, and on CPU
variants that run the same logic here ("cpu"; "triton" under its interpreter, fp16 only: its bf16 tl.dot
is wrong in the interpreter, DESIGN.md). Inputs are fresh random draws on the backend's device, at odd
shapes (N=1, C=3, 7x7, non-power-of-two sizes; vectorizable and not), in both memory formats.
"""

import pytest
import torch

from helpers import CL, NCHW, activation, device_backend_params
from resnet_fused import backends

pytestmark = pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built (op schemas)")

OPS = torch.ops.resnet_fused
# (1, 3, 7, 7): every CUDA kernel on its scalar path; (3, 24, 5, 8): C and H*W multiples of 8, the
# 16-byte vector path in both layouts
SHAPES = [(1, 3, 7, 7), (3, 24, 5, 8)]
LOW = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


def _skip_unsupported(device, backend, dtype):
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly (DESIGN.md); bf16 Triton runs on a GPU")


def _vec(C, device, positive=False):
    v = torch.randn(C, device=device)
    return v.abs() + 0.5 if positive else v


def _autograd_op_cases(device, backend, dtype):
    """(op, args): add_relu, bn_act_train and bn_act_eval with and without their optional tensors.
    Per-channel weight / bias in the activation's dtype (as in an fp16 model), statistics in fp32."""
    for shape in SHAPES:
        C = shape[1]
        for fmt in (NCHW, CL):
            def act():
                return activation(shape, dtype, fmt, device).requires_grad_()

            def param():
                return _vec(C, device).to(dtype).requires_grad_()

            yield OPS.add_relu, (act(), act(), backend)
            yield OPS.bn_act_train, (act(), param(), param(), act(), 1e-5, "relu", 0.0, backend)
            yield OPS.bn_act_train, (act(), None, None, None, 1e-3, "none", 0.0, backend)
            yield OPS.bn_act_train, (act(), param(), param(), act(), 1e-5, "silu", 0.0, backend)
            yield OPS.bn_act_eval, (act(), _vec(C, device), _vec(C, device, positive=True), param(), param(), act(), 1e-5,
                                    "relu", 0.0, backend)
            yield OPS.bn_act_eval, (act(), _vec(C, device), _vec(C, device, positive=True), None, None, None, 1e-5, "none",
                                    0.0, backend)
            yield OPS.bn_act_eval, (act(), _vec(C, device), _vec(C, device, positive=True), param(), param(), act(), 1e-5,
                                    "leaky_relu", 0.2, backend)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("device,backend", device_backend_params(cpu_variants=("cpu", "triton")))
def test_opcheck_autograd_ops_low_precision(device, backend, dtype):
    _skip_unsupported(device, backend, dtype)
    n = 0
    for op, args in _autograd_op_cases(device, backend, dtype):
        assert all(a.device.type == device for a in args if isinstance(a, torch.Tensor))
        torch.library.opcheck(op, args)
        n += 1
    assert n == 7 * len(SHAPES) * 2  # 7 calls per shape and layout (_autograd_cases)


def _conv2d_stats_cases(device, backend, dtype):
    """conv2d_stats: 3x3, stride 2 with the deferred BN + ReLU prologue (affine and not), 1x1, grouped,
    and the 7x7 stride-2 stem on C=3 (Triton's gathered-K path), in both layouts."""
    for fmt in (NCHW, CL):
        x = activation((2, 6, 7, 5), dtype, fmt, device).requires_grad_()
        stem = activation((1, 3, 9, 11), dtype, fmt, device).requires_grad_()
        mean, var = torch.randn(6, device=device), torch.rand(6, device=device) + 0.5  # fp32, as bn statistics

        def weight(*shape):
            fan_in = shape[1] * shape[2] * shape[3]
            return (torch.randn(shape, device=device) / fan_in ** 0.5).to(dtype).requires_grad_()

        def param(offset=0.0):
            return (torch.randn(6, device=device) * 0.5 + offset).to(dtype).requires_grad_()

        yield (x, weight(10, 6, 3, 3), [1, 1], [1, 1], [1, 1], 1, backend)
        yield (x, weight(10, 6, 3, 3), [2, 2], [1, 1], [1, 1], 1, backend, mean, var, param(1.0), param(), 1e-3)
        yield (x, weight(5, 6, 1, 1), [1, 1], [0, 0], [1, 1], 1, backend, mean, var, None, None, 1e-5)
        yield (x, weight(4, 3, 3, 3), [1, 1], [1, 1], [1, 1], 2, backend, mean, var, param(1.0), param(), 1e-5)
        yield (stem, weight(8, 3, 7, 7), [2, 2], [3, 3], [1, 1], 1, backend)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("device,backend", device_backend_params(cpu_variants=("cpu", "triton")))
def test_opcheck_conv2d_stats_low_precision(device, backend, dtype, deterministic_cudnn, one_conv_config):
    _skip_unsupported(device, backend, dtype)
    n = 0
    for args in _conv2d_stats_cases(device, backend, dtype):
        assert all(a.device.type == device for a in args if isinstance(a, torch.Tensor))
        torch.library.opcheck(OPS.conv2d_stats, args)
        n += 1
    assert n == 10


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_poisoned_fixture_fills_new_allocations(device):
    """conftest's `poisoned`: every new uninitialized allocation is NaN (integers: their maximum), on this
    device too, in both layouts and for memory the caching allocator hands out again; and it is undone
    after. (torch's at::empty fills under use_deterministic_algorithms + fill_uninitialized_memory; the C++
    and Triton kernels allocate their outputs with at::empty / torch.empty.)"""
    import conftest

    fixture = conftest.poisoned.__wrapped__()  # the generator behind the fixture
    was = torch.are_deterministic_algorithms_enabled()
    next(fixture)
    try:
        shape = (3, 5, 7, 9)
        old = torch.ones(shape, device=device)
        del old  # on CUDA its block goes back to the caching allocator, dirty, and is handed out again below
        fresh = [torch.empty(shape, device=device), torch.empty(shape, device=device, memory_format=CL),
                 torch.empty_like(torch.ones(shape, device=device, dtype=torch.float16), memory_format=CL),
                 torch.ones(2, device=device, dtype=torch.bfloat16).new_empty(shape),
                 torch.empty_strided(shape, (1, 3, 15, 105), device=device)]
        for t in fresh:
            assert t.device.type == device and torch.isnan(t).all(), f"{t.dtype} {t.stride()}: not NaN-filled"
        ints = torch.empty(17, device=device, dtype=torch.int32)
        assert (ints == torch.iinfo(torch.int32).max).all()
        if backends.available()["cuda" if device == "cuda" else "cpu"]:
            # an op whose kernel writes only part of a fresh output would now leave NaN: a full write leaves none
            x = activation((2, 5, 3, 3), torch.float16, CL, device)
            out = OPS.add_relu_forward(x, x)
            assert not torch.isnan(out).any() and out.is_contiguous(memory_format=CL)
    finally:
        next(fixture, None)
    assert torch.are_deterministic_algorithms_enabled() == was
