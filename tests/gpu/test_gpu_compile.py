"""torch.compile with Inductor (fullgraph=True) of the fused ops and of the fused blocks, on the GPU
backends, against the same code run eagerly and a float64 reference (the eager-error rule, 2-norm:
compiled may reorder nothing inside our ops, which stay opaque calls, but Inductor fuses the code
around them, e.g. the running-statistics updates).

("cuda", "cuda") and ("cuda", "triton") are skipped visibly without a GPU; ("cpu", "cpu") runs the same
logic here through Inductor's C++ backend.
"""

import copy

import pytest
import torch

from helpers import BLOCK_INPUT, CL, NCHW, activation, assert_within_eager_error, block_results, counters, \
    device_backend_params, make_block
from resnet_fused import backends, functional

# one_conv_config: the Triton conv compiles one config per kernel specialization instead of timing all of
# them (conftest); what is under test here is compilation around the ops, not the autotuner
pytestmark = [pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built (op schemas)"),
              pytest.mark.usefixtures("one_conv_config")]


@pytest.fixture(autouse=True)
def fresh_dynamo(no_tf32):
    """Each test compiles from scratch (no cache-limit fallbacks across parametrizations). fp32 in IEEE
    (no_tf32): compiled and eager then run the same arithmetic."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tail(x, skip, p, backend):
    """A residual tail: BN (batch statistics, running statistics updated in place) + residual + ReLU,
    then BN with running statistics without ReLU, then add + ReLU."""
    y = functional.bn_act(x, p["rm1"], p["rv1"], p["w1"], p["b1"], True, 0.1, 1e-5, residual=skip, backend=backend)
    z = functional.bn_act(y, p["rm2"], p["rv2"], p["w2"], p["b2"], False, 0.1, 1e-5, act=None, backend=backend)
    return functional.add_relu(z, skip, backend=backend)


def _tail_results(fn, x, skip, grad, params, backend, dtype=None):
    """[output, grad x, grad skip, grad w1, b1, w2, b2, running mean 1, running var 1] from copies in dtype."""
    def leaf(t, grad=True):
        return t.detach().clone().to(dtype or t.dtype).requires_grad_(grad)

    x, skip = leaf(x), leaf(skip)
    p = {k: leaf(v, k[0] in "wb") for k, v in params.items()}
    out = fn(x, skip, p, backend)
    out.backward(grad.to(out.dtype))
    return [out.detach(), x.grad, skip.grad] + [p[k].grad for k in ("w1", "b1", "w2", "b2")] + [p["rm1"], p["rv1"]]


@pytest.mark.parametrize("dtype,fmt", [(torch.float32, NCHW), (torch.bfloat16, CL)], ids=["fp32-nchw", "bf16-nhwc"])
@pytest.mark.parametrize("device,backend", device_backend_params())
def test_compiled_ops_match_eager(device, backend, dtype, fmt):
    """bn_act (training and eval) and add_relu, forward and backward with one grad_output."""
    shape = (3, 24, 7, 9)
    C = shape[1]
    x, skip, grad = (activation(shape, dtype, fmt, device) for _ in range(3))
    params = {"w1": torch.rand(C) + 0.5, "b1": torch.randn(C), "rm1": torch.randn(C) * 0.3, "rv1": torch.rand(C) + 0.5,
              "w2": torch.rand(C) + 0.5, "b2": torch.randn(C), "rm2": torch.randn(C) * 0.3, "rv2": torch.rand(C) + 0.5}
    params = {k: v.to(device, dtype) for k, v in params.items()}  # BN parameters and buffers in the model's dtype
    compiled = torch.compile(_tail, fullgraph=True)  # Inductor
    got = _tail_results(compiled, x, skip, grad, params, backend)
    eager = _tail_results(_tail, x, skip, grad, params, backend)
    exact = _tail_results(_tail, x, skip, grad, params, backend, torch.float64)
    names = ["output", "grad x", "grad skip", "grad w1", "grad b1", "grad w2", "grad b2", "running_mean", "running_var"]
    for name, a, e, x64 in zip(names, got, eager, exact):
        assert a.device.type == device
        assert_within_eager_error(a, e, x64, f"compiled {backend} {dtype} {name}", norm="fro")


# GPU: the bottleneck on Triton (the deferred BN + ReLU chain: conv stats in the epilogue, the next conv's
# prologue) and the basic block on cuda (cuDNN conv + the CUDA kernels; cuDNN's fused conv + add + ReLU
# in eval); both run on the CPU variant.
BLOCK_CASES = [pytest.param(*p.values, kind, id=f"{p.id}-{kind}", marks=p.marks)
               for p in device_backend_params() for kind in ("basic", "bottleneck")
               if (p.values[1], kind) != ("cuda", "bottleneck") and (p.values[1], kind) != ("triton", "basic")]


@pytest.mark.parametrize("device,backend,kind", BLOCK_CASES)
def test_compiled_block_matches_eager(device, backend, kind):
    """A fused block compiled whole: a training step (forward, backward, running statistics and
    num_batches_tracked), then eval without grad, each against the same block run eagerly."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    block = make_block(kind, backend, device, dtype)
    eager, exact, compiled_block = copy.deepcopy(block), copy.deepcopy(block).double(), copy.deepcopy(block)
    compiled = torch.compile(compiled_block, fullgraph=True)
    x = activation(BLOCK_INPUT, dtype, CL, device)
    with torch.no_grad():
        grad = activation(copy.deepcopy(eager).eval()(x).shape, dtype, CL, device)  # a copy in eval: no buffer moves
    for training in (True, False):
        for m in (eager, exact, compiled):  # compiled.train() reaches the block it wraps
            m.train(training)
        got = block_results(compiled, x, grad)
        ref = block_results(eager, x, grad)
        x64 = block_results(exact, x.double(), grad.double())
        names = ["output", "grad input", "all parameter grads", "all float buffers"]
        for name, a, e, c in zip(names, got, ref, x64):
            assert a.device.type == device and a.dtype == dtype
            assert_within_eager_error(a, e, c, f"compiled {kind} {backend} {'train' if training else 'eval'} {name}",
                                      norm="fro")
        assert compiled_block.training == training
        assert counters(compiled_block) == counters(eager) == [1] * len(counters(eager)), "num_batches_tracked"
