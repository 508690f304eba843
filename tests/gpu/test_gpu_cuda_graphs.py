"""CUDA-graph capture (torch.cuda.graphs) of the fused ops and of the fused blocks, eval and a training
step (forward + backward + running statistics), replayed with new inputs copied into the static
buffers, against the same code run eagerly and a float64 reference.

The capture recipe is PyTorch's whole-network one: warm up on a side stream (Triton autotuning and
compilation, cuDNN handles, the eval fold cache), drop the gradients (set_to_none) so that the backward
allocates them from the graph's pool, capture one step, then replay. ("cuda", "cuda") and ("cuda",
"triton") are skipped visibly without a GPU; the CPU variants run the same logic here with a stand-in
for the graph (each replay reruns the step and copies its results into the tensors the capture
returned), so everything but the capture itself is checked on any machine.
"""

import copy

import pytest
import torch

from helpers import BLOCK_INPUT, CL, NCHW, activation, assert_within_eager_error, block_results, counters, \
    device_backend_params, make_block
from resnet_fused import backends, functional

pytestmark = [pytest.mark.skipif(not backends.has_extension(), reason="resnet_fused._C is not built (op schemas)"),
              pytest.mark.usefixtures("no_tf32", "one_conv_config")]  # one_conv_config: conftest (compile time)
WARMUP = 3  # PyTorch's recipe: a few eager iterations on a side stream before capture


def capture(step, device):
    """(replay, static outputs): step() captured in a CUDA graph after WARMUP eager calls on a side stream.
    On CPU a stand-in: the capture runs step() once, and each replay runs it again and copies its
    results into the tensors the capture returned (as a replay overwrites the graph's outputs)."""
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()

        def replay():
            graph.replay()
            torch.cuda.synchronize()

        return replay, static
    for _ in range(WARMUP):
        step()
    static = step()

    def replay():
        new = step()
        with torch.no_grad():
            for s, n in zip(static, new):
                s.copy_(n)

    return replay, static


def _new_inputs(static, device):
    """Fresh random draws of the static inputs' shapes, dtypes and layouts, copied into them."""
    fresh = []
    for t in static:
        fmt = CL if t.is_contiguous(memory_format=CL) and not t.is_contiguous() else NCHW
        new = activation(t.shape, t.dtype, fmt, device)
        with torch.no_grad():
            t.copy_(new)
        fresh.append(new)
    return fresh


# ---- the ops ----


def _ops_step(x, r, g, p, backend, training):
    """add_relu(bn_act(bn_act(x) + r), r) forward (training: batch statistics, running statistics
    updated in place) and backward; returns [output, grad x, grad r, grad w1, b1, w2, b2]."""
    leaves = [x, r, p["w1"], p["b1"], p["w2"], p["b2"]]
    for t in leaves:
        t.grad = None  # the backward allocates fresh gradients (from the graph's pool when capturing)
    y = functional.bn_act(x, p["rm1"], p["rv1"], p["w1"], p["b1"], training, 0.1, 1e-5, residual=r, backend=backend)
    z = functional.bn_act(y, p["rm2"], p["rv2"], p["w2"], p["b2"], training, 0.1, 1e-5, act=None, backend=backend)
    out = functional.add_relu(z, r, backend=backend)
    out.backward(g)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype,fmt", [(torch.float16, CL), (torch.bfloat16, NCHW)], ids=["fp16-nhwc", "bf16-nchw"])
@pytest.mark.parametrize("device,backend", device_backend_params(cpu_variants=("cpu", "triton")))
def test_graphed_ops_match_eager(device, backend, dtype, fmt, training):
    shape = (3, 24, 7, 9)
    C = shape[1]
    x, r = (activation(shape, dtype, fmt, device).requires_grad_() for _ in range(2))
    g = activation(shape, dtype, fmt, device)
    p = {"w1": torch.rand(C) + 0.5, "b1": torch.randn(C), "w2": torch.rand(C) + 0.5, "b2": torch.randn(C)}
    p = {k: v.to(device).requires_grad_() for k, v in p.items()}  # fp32 affine parameters, as autocast keeps them
    p.update({k: v.to(device) for k, v in {"rm1": torch.randn(C) * 0.3, "rv1": torch.rand(C) + 0.5,
                                           "rm2": torch.randn(C) * 0.3, "rv2": torch.rand(C) + 0.5}.items()})
    replay, static = capture(lambda: _ops_step(x, r, g, p, backend, training), device)
    for replay_no in range(2):  # the running statistics move at every training replay
        state = {k: v.detach().clone() for k, v in p.items()}  # where the graph starts from
        new_x, new_r, new_g = _new_inputs([x, r, g], device)
        replay()

        def run(cast=None):  # the eager step from `state` on the new inputs; cast: float64 for the exact one
            q = {k: v.clone().to(cast or v.dtype).requires_grad_(k[0] in "wb") for k, v in state.items()}
            leaves = [t.clone().to(cast or t.dtype).requires_grad_() for t in (new_x, new_r)]
            res = _ops_step(*leaves, new_g.clone().to(cast or dtype), q, backend, training)
            return res + [q[k] for k in ("rm1", "rv1", "rm2", "rv2")]

        eager, exact = run(), run(torch.float64)
        got = static + [p[k] for k in ("rm1", "rv1", "rm2", "rv2")]
        names = ["output", "grad x", "grad r", "grad w1", "grad b1", "grad w2", "grad b2", "rm1", "rv1", "rm2", "rv2"]
        for name, a, e, c in zip(names, got, eager, exact):
            assert a.device.type == device
            assert_within_eager_error(a, e, c, f"graphed {backend} replay {replay_no} {name}", norm="fro")


# ---- the blocks ----

BLOCK_CASES = [pytest.param(*p.values, kind, id=f"{p.id}-{kind}", marks=p.marks)
               for p in device_backend_params() for kind in ("basic", "bottleneck")]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("device,backend,kind", BLOCK_CASES)
def test_graphed_block_matches_eager(device, backend, kind, training):
    """Eval: the forward captured (fold cache warm). Training: forward + backward captured, parameter and
    input gradients from the graph's pool, running statistics and num_batches_tracked updated in place at
    every replay. Two replays with fresh inputs, each against an eager copy of the block taken just before."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    block = make_block(kind, backend, device, dtype).train(training)
    static_x = activation(BLOCK_INPUT, dtype, CL, device).requires_grad_(training)
    with torch.no_grad():
        static_g = activation(copy.deepcopy(block).eval()(static_x).shape, dtype, CL, device)

    def step():
        if not training:
            with torch.no_grad():
                return [block(static_x)]
        block.zero_grad(set_to_none=True)
        static_x.grad = None
        out = block(static_x)
        out.backward(static_g)
        return [out.detach(), static_x.grad] + [p.grad for p in block.parameters()]

    replay, static = capture(step, device)
    for replay_no in range(2):
        before = copy.deepcopy(block)  # the state the replay starts from (a capture runs nothing)
        exact = copy.deepcopy(block).double()
        new_x, new_g = _new_inputs([static_x, static_g], device)
        replay()
        if training:
            got = [static[0], static[1], torch.cat([t.reshape(-1) for t in static[2:]]),
                   torch.cat([b.reshape(-1) for b in block.buffers() if b.is_floating_point()])]
        else:
            got = static
        eager = block_results(before, new_x, new_g)
        x64 = block_results(exact, new_x.double(), new_g.double())
        names = ["output", "grad input", "all parameter grads", "all float buffers"]
        for name, a, e, c in zip(names, got, eager, x64):
            assert a.device.type == device and a.dtype == dtype
            assert_within_eager_error(a, e, c, f"graphed {kind} {backend} replay {replay_no} {name}", norm="fro")
        assert counters(block) == counters(before), "num_batches_tracked"
