"""Run-to-run determinism on one device: the same inputs twice give bitwise-equal outputs, gradients,
batch statistics and running statistics.

Why it should hold. `cuda`: every reduction (bn_stats, bn_act_backward_reduce) is a per-block partial
pass plus a finalize kernel that merges the partials in a fixed order, no atomics (csrc/cuda/bn_act.cu);
the elementwise kernels write each element once. `triton`: resnet_fused/triton/*.py use no atomics at all;
bn_stats (partial kernel + combine kernel over the rows in order), bn_act_backward_reduce (partial kernel +
torch.sum over the rows) and the conv's statistics (per row-tile partials + _merge_stats's fixed tree)
are two-level reductions in a fixed order, and the conv's K loop runs in one order per config. So every
Triton op is deterministic for a given autotuned config; the autotuner picks the config once per key
and process, so results are bitwise reproducible within a process, and across processes only where the
same config wins (here one config is forced, see pytestmark). Convolution gradients are aten's (cuDNN): deterministic
only with torch.backends.cudnn.deterministic, which the conv test sets.

("cuda", "cuda") and ("cuda", "triton") are skipped visibly without a GPU; the CPU variants ("cpu": the
C++ kernels; "triton": the interpreter) run the same checks here.
"""

import pytest
import torch

from helpers import CL, NCHW, activation, device_backend_params
from resnet_fused import backends, functional

# one_conv_config (conftest): one Triton conv config, compiled once per specialization instead of all of
# them timed (GPU time); the order of the K blocks is fixed per config either way
pytestmark = [pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built (op schemas)"),
              pytest.mark.usefixtures("one_conv_config")]
OPS = torch.ops.resnet_fused
_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), f"{what}: metadata differs"
    if a.dtype in _BITS:  # bit patterns: -0.0 != 0.0, and NaN payloads count
        a, b = a.contiguous().view(_BITS[a.dtype]), b.contiguous().view(_BITS[b.dtype])
    diff = (a != b).sum().item()
    assert diff == 0, f"{what}: {diff} of {a.numel()} elements differ between two runs on the same inputs"


def _shape(device):
    # GPU: enough elements per channel that the reductions split over many blocks / programs (and, for
    # `cuda`, over a multi-block grid whose partials are merged); CPU: small (the interpreter is slow)
    return (16, 40, 28, 28) if device == "cuda" else (3, 24, 7, 9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("device,backend", device_backend_params(cpu_variants=("cpu", "triton")))
def test_ops_are_bitwise_deterministic(device, backend, dtype):
    """bn_act training (batch statistics, running statistics, every gradient), bn_act eval, add_relu;
    both layouts; one grad_output."""
    shape = _shape(device)
    C = shape[1]
    for fmt in (NCHW, CL):
        x, r, g = (activation(shape, dtype, fmt, device, scale=2.0, offset=0.5) for _ in range(3))
        w, b = torch.rand(C, device=device) + 0.5, torch.randn(C, device=device)
        rm, rv = torch.randn(C, device=device) * 0.3, torch.rand(C, device=device) + 0.5

        def run():
            leaves = [t.detach().clone().requires_grad_() for t in (x, r, w, b)]
            out, mean, var = OPS.bn_act_train(leaves[0], leaves[2], leaves[3], leaves[1], 1e-5, "relu", 0.0, backend)
            m, v = rm.clone(), rv.clone()
            y = functional.bn_act(out, m, v, leaves[2], leaves[3], True, 0.1, 1e-5, act=None, backend=backend)
            z = functional.bn_act(y, rm, rv, leaves[2], leaves[3], False, 0.1, 1e-5, residual=leaves[1], backend=backend)
            final = functional.add_relu(z, leaves[1], backend=backend)
            final.backward(g)
            return [out, mean, var, y, z, final, m, v] + [t.grad for t in leaves]

        first, second = run(), run()
        names = ["bn_act_train out", "batch mean", "batch var", "bn_act train out", "bn_act eval out", "add_relu out",
                 "running_mean", "running_var", "grad x", "grad r", "grad w", "grad b"]
        for name, a, b2 in zip(names, first, second):
            assert a.device.type == device
            assert_bitwise_equal(a.detach(), b2.detach(), f"{backend} {dtype} {fmt} {name}")


@pytest.mark.parametrize("device,backend", device_backend_params(cpu_variants=("cpu", "triton")))
def test_conv_chain_is_bitwise_deterministic(device, backend, deterministic_cudnn):
    """conv_bn_defer -> conv_bn_act(input_bn=) in training (Triton: statistics in the conv epilogue, the
    deferred BN + ReLU in the next conv's prologue; others: conv + the bn_act ops), forward, backward and
    running statistics, then the eval path (Triton: BN + residual + ReLU in the conv epilogue). fp16
    (Triton's interpreter computes fp16 dots right; bf16 on a GPU is covered by the other GPU tests)."""
    dtype = torch.float16
    N, H = (8, 20) if device == "cuda" else (2, 7)
    Ho = (H + 2 - 3) // 2 + 1  # 3x3, stride 2, padding 1
    x = activation((N, 16, H, H), dtype, CL, device)
    r = activation((N, 24, Ho, Ho), dtype, CL, device)
    g = activation(r.shape, dtype, CL, device)
    w1 = (torch.randn(20, 16, 3, 3, device=device) / 12).to(dtype)
    w2 = (torch.randn(24, 20, 1, 1, device=device) / 4.5).to(dtype)
    bn = [(torch.rand(c, device=device) + 0.5, torch.randn(c, device=device) * 0.3) for c in (20, 24)]
    stats = [(torch.randn(c, device=device) * 0.3, torch.rand(c, device=device) + 0.5) for c in (20, 24)]

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (x, r, w1, w2, *bn[0], *bn[1])]
        xs, rs, w1s, w2s, bw1, bb1, bw2, bb2 = leaves
        (rm1, rv1), (rm2, rv2) = [(m.clone(), v.clone()) for m, v in stats]
        y1, deferred = functional.conv_bn_defer(xs, w1s, rm1, rv1, bw1, bb1, 2, 1, backend=backend)
        out = functional.conv_bn_act(y1, w2s, None, rm2, rv2, bw2, bb2, 1, 0, training=True, residual=rs,
                                     input_bn=deferred, backend=backend)
        out.backward(g)
        with torch.no_grad():
            inference = functional.conv_bn_act(x, w1, None, *stats[0], *bn[0], 2, 1, backend=backend)
        return [y1, deferred.mean, deferred.var, out, rm1, rv1, rm2, rv2, inference] + [t.grad for t in leaves]

    first, second = run(), run()
    names = ["y1", "batch mean 1", "batch var 1", "output", "rm1", "rv1", "rm2", "rv2", "inference output",
             "grad x", "grad residual", "grad w1", "grad w2", "grad bn1 w", "grad bn1 b", "grad bn2 w", "grad bn2 b"]
    assert len(first) == len(names)
    for name, a, b in zip(names, first, second):
        assert a is not None and a.device.type == device, name
        assert_bitwise_equal(a.detach(), b.detach(), f"{backend} conv chain {name}")
