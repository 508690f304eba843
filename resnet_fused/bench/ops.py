"""The `ops` suite: bn_act (eval, train forward, train forward + backward) and add_relu, fused vs
eager, in achieved GB/s against a copy of one activation measured in the same run (CPU: in the same
alternating rounds as the ops).

Bytes are the floor: each input read once, each output written once (running stats and per-channel
vectors are negligible and not counted).

CPU: every provider's calls run in the memory arena (resnet_fused.ops.arena), so that outputs and temporaries
reuse the blocks the previous call freed, as on a GPU's caching allocator and as inside a fused model. A fresh
activation-sized output page-faults its pages in on every call, and at these sizes that costs more than the
kernel: bn_act eval at 32x256x56x56 on a 2-core AMD EPYC ran at 3.9 GB/s fresh and 31.4 GB/s in the arena
(eager: 2.1 and 18.3). Before 2026-12-07 this suite timed fresh outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from resnet_fused import backends, functional, reference
from resnet_fused.bench.timing import Timing, copies_exceeding_l2, time_cpu_interleaved, time_cuda
from resnet_fused.ops import arena

COPY = "copy"  # the CPU ceiling's entry among the interleaved providers


@dataclass(frozen=True)
class OpCase:
    name: str  # "bn_act eval", "bn_act train", "bn_act train+bwd", "add_relu"
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    channels_last: bool

    @property
    def tensors_moved(self) -> int:
        # activation-sized tensors read or written at the floor
        return {"add_relu": 3, "bn_act eval": 3, "bn_act train": 3, "bn_act train+bwd": 3 + 5}[self.name]
        # train+bwd: forward reads x, residual, writes out; backward reads grad_out, x, out, writes grad_x, grad_residual

    def bytes_moved(self) -> int:
        n, c, h, w = self.shape
        return self.tensors_moved * n * c * h * w * torch.finfo(self.dtype).bits // 8


def bytes_of(shape, dtype) -> int:
    n, c, h, w = shape
    return n * c * h * w * torch.finfo(dtype).bits // 8


def _make_call(case: OpCase, provider: str, device: torch.device) -> Callable[[], object]:
    """One call of `provider` on fresh random inputs of `case` (built once, reused by every call);
    on the CPU inside the arena (module docstring)."""
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    C = case.shape[1]

    def act(requires_grad=False):
        return torch.randn(case.shape, device=device, dtype=case.dtype).contiguous(memory_format=fmt).requires_grad_(requires_grad)

    backward = case.name == "bn_act train+bwd"
    x, r = act(backward), act(backward)
    if case.name == "add_relu":
        fn = (lambda a, b: torch.relu(a + b)) if provider == "eager" else (lambda a, b: functional.add_relu(a, b, backend=provider))
        return _in_arena(lambda: fn(x, r), x)
    w = torch.randn(C, device=device, requires_grad=backward)
    b = torch.randn(C, device=device, requires_grad=backward)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    training = case.name != "bn_act eval"
    bn = reference.bn_act if provider == "eager" else (lambda *a, **k: functional.bn_act(*a, backend=provider, **k))
    if not backward:
        return _in_arena(lambda: bn(x, rm, rv, w, b, training, 0.1, 1e-5, r, True), x)
    grad = act()

    def step():
        out = bn(x, rm, rv, w, b, training, 0.1, 1e-5, r, True)
        torch.autograd.backward(out, grad)  # CPU: the backward runs on this thread, inside the same scope
        x.grad = r.grad = w.grad = b.grad = None

    return _in_arena(step, x)


def _in_arena(call: Callable[[], object], x: torch.Tensor) -> Callable[[], object]:
    """call inside arena.scope(x) on the CPU; call itself elsewhere."""
    if x.device.type != "cpu":
        return call

    def run():
        with arena.scope(x):
            return call()
    return run


def time_case(case: OpCase, provider: str, device: torch.device) -> Timing:
    """GPU: CUDA events over copies of the inputs rotated past L2."""
    copies = copies_exceeding_l2(case.bytes_moved(), device)
    return time_cuda([_make_call(case, provider, device) for _ in range(copies)])


def gpu_copy_gbps(shape, dtype, channels_last: bool, device: torch.device) -> float:
    """The GPU's bandwidth ceiling: GB/s of a ``clone`` of one activation (a new tensor, as the ops return;
    bytes = read + write = 2 x the tensor), inputs rotated past L2."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make():
        src = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        return lambda: src.clone(memory_format=torch.preserve_format)

    t = time_cuda([make() for _ in range(copies_exceeding_l2(2 * bytes_of(shape, dtype), device))])
    return 2 * bytes_of(shape, dtype) / t.median_ms / 1e6


def cpu_copy(shape, dtype) -> Callable[[], object]:
    """The CPU's bandwidth ceiling, timed among the ops in the same alternating rounds: ``dst.copy_(src)`` of
    one activation between two buffers allocated (and page-faulted in) here, on the ops' threads. Timed apart
    from the ops, a copy past the last-level cache moved 22-29 GB/s on the 2-core AMD EPYC from one run to the
    next, and ops in the arena reached 140 % of the slow reading; in the same rounds they reach at most ~110 %
    (an op that reads two tensors and writes one moves 4 streams for the 3 it counts, a copy 3 for 2: every
    store first reads its line)."""
    src = torch.ones(math.prod(shape), dtype=dtype)
    dst = torch.zeros_like(src)
    return lambda: dst.copy_(src)


def fused_providers(device: torch.device) -> list[str]:
    avail = backends.available()
    names = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    return [n for n in names if avail[n]] or ["torch"]


def run(shapes, dtypes, device: torch.device, quick: bool, rec) -> None:
    min_run_time = 0.5 if quick else 2.0
    names = ["bn_act eval", "bn_act train", "bn_act train+bwd", "add_relu"]
    providers = ["eager", *fused_providers(device)]
    for shape in shapes:
        for dtype in dtypes:
            for channels_last in (True, False):
                ceiling = None  # GPU: measured in the first case of this shape, dtype and layout that gets that far
                for name in names:
                    case = OpCase(name, shape, dtype, channels_last)
                    fields = dict(suite="ops", op=name, shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."),
                                  layout="NHWC" if channels_last else "NCHW")
                    with rec.case(fields, providers) as c:
                        if device.type == "cuda":
                            ceiling = ceiling or gpu_copy_gbps(shape, dtype, channels_last, device)
                            timings = c.each(lambda p: time_case(case, p, device))
                        else:  # alternating rounds, the copy among them: see time_cpu_interleaved, cpu_copy
                            calls = c.each(lambda p: _make_call(case, p, device))
                            c.each(lambda p: calls[p]())
                            timings = time_cpu_interleaved({COPY: cpu_copy(shape, dtype), **{p: calls[p] for p in c.live}},
                                                           min_run_time)
                            ceiling = 2 * bytes_of(shape, dtype) / timings.pop(COPY).median_ms / 1e6
                        for p, t in timings.items():
                            gbps = case.bytes_moved() / t.median_ms / 1e6
                            c.result(p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                     bytes=case.bytes_moved(), gbps=gbps, copy_gbps=ceiling,
                                     pct_of_copy=100 * gbps / ceiling)


def count(shapes, dtypes, device) -> int:
    return len(shapes) * len(dtypes) * 2 * 4 * (1 + len(fused_providers(device)))
