"""The `ops` suite: bn_act (eval, train forward, train forward + backward) and add_relu, fused vs
eager, in achieved GB/s against a device-to-device copy measured in the same run.

Bytes are the floor: each input read once, each output written once (running stats and per-channel
vectors are negligible and not counted).
"""

from __future__ import annotations

import functools
import glob
from collections.abc import Callable
from dataclasses import dataclass

import torch

from resnet_fused import backends, functional, reference
from resnet_fused.bench.timing import Timing, copies_exceeding_l2, time_cpu_interleaved, time_cuda


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
    """One call of `provider` on fresh random inputs of `case` (built once, reused by every call)."""
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    C = case.shape[1]

    def act(requires_grad=False):
        return torch.randn(case.shape, device=device, dtype=case.dtype).contiguous(memory_format=fmt).requires_grad_(requires_grad)

    backward = case.name == "bn_act train+bwd"
    x, r = act(backward), act(backward)
    if case.name == "add_relu":
        fn = (lambda a, b: torch.relu(a + b)) if provider == "eager" else (lambda a, b: functional.add_relu(a, b, backend=provider))
        return lambda: fn(x, r)
    w = torch.randn(C, device=device, requires_grad=backward)
    b = torch.randn(C, device=device, requires_grad=backward)
    rm, rv = torch.randn(C, device=device), torch.rand(C, device=device) + 0.5
    training = case.name != "bn_act eval"
    bn = reference.bn_act if provider == "eager" else (lambda *a, **k: functional.bn_act(*a, backend=provider, **k))
    if not backward:
        return lambda: bn(x, rm, rv, w, b, training, 0.1, 1e-5, r, True)
    grad = act()

    def step():
        out = bn(x, rm, rv, w, b, training, 0.1, 1e-5, r, True)
        torch.autograd.backward(out, grad)
        x.grad = r.grad = w.grad = b.grad = None

    return step


def time_case(case: OpCase, provider: str, device: torch.device, min_run_time: float) -> Timing:
    """GPU: CUDA events over copies of the inputs rotated past L2."""
    copies = copies_exceeding_l2(case.bytes_moved(), device)
    return time_cuda([_make_call(case, provider, device) for _ in range(copies)])


def copy_gbps(shape, dtype, channels_last: bool, device: torch.device, min_run_time: float) -> float:
    """The bandwidth ceiling, GB/s of a copy with bytes = read + write = 2 x the buffer. GPU: ``clone`` of
    one activation (a new tensor, as the ops return), inputs rotated past L2. CPU: see cpu_copy_gbps."""
    if device.type != "cuda":
        return cpu_copy_gbps(torch.get_num_threads(), min_run_time)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def make():
        src = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        return lambda: src.clone(memory_format=torch.preserve_format)

    t = time_cuda([make() for _ in range(copies_exceeding_l2(2 * bytes_of(shape, dtype), device))])
    return 2 * bytes_of(shape, dtype) / t.median_ms / 1e6


@functools.cache
def cpu_copy_gbps(threads: int, min_run_time: float) -> float:
    """CPU memory bandwidth: ``dst.copy_(src)`` between two preallocated fp32 buffers of
    max(4 x LLC, 256 MiB) each (capped at 1 GiB), past every cache, with the thread count the ops run
    with, timed as the ops are (time_cpu_interleaved: the median of >= 5 rounds). The ceiling used to be
    a ``clone`` of the op's activation under torch.utils.benchmark (1 thread by default) that
    page-faulted a fresh allocation in on every call: 2.9 GB/s on the 2-core CPU (this copy: 18 GB/s),
    and fused ops reached 285 % of it. `threads` (torch.get_num_threads()) keys the cache."""
    n = min(max(4 * _llc_bytes(), 256 << 20), 1 << 30) // 4
    src, dst = torch.ones(n), torch.zeros(n)  # pages faulted in here, not in the timing
    t = time_cpu_interleaved({"copy": lambda: dst.copy_(src)}, min_run_time)["copy"]
    return 2 * 4 * n / t.median_ms / 1e6  # bytes = read + write = 2 x n fp32


def _llc_bytes() -> int:
    """The last-level cache of cpu0 (sysfs; 0 where it cannot be read)."""
    sizes = {}
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{d}/level") as lv, open(f"{d}/size") as sz:
                text = sz.read().strip()
                sizes[int(lv.read())] = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
        except (OSError, ValueError):
            continue
    return sizes[max(sizes)] if sizes else 0


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
                ceiling = None  # measured in the first case of this shape, dtype and layout that gets that far
                for name in names:
                    case = OpCase(name, shape, dtype, channels_last)
                    fields = dict(suite="ops", op=name, shape="x".join(map(str, shape)), dtype=str(dtype).removeprefix("torch."),
                                  layout="NHWC" if channels_last else "NCHW")
                    with rec.case(fields, providers) as c:
                        if ceiling is None:
                            ceiling = copy_gbps(shape, dtype, channels_last, device, min_run_time)
                        if device.type == "cuda":
                            timings = c.each(lambda p: time_case(case, p, device, min_run_time))
                        else:  # alternating rounds: see time_cpu_interleaved
                            calls = c.each(lambda p: _make_call(case, p, device))
                            c.each(lambda p: calls[p]())
                            timings = time_cpu_interleaved({p: calls[p] for p in c.live}, min_run_time)
                        for p, t in timings.items():
                            gbps = case.bytes_moved() / t.median_ms / 1e6
                            c.result(p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                     bytes=case.bytes_moved(), gbps=gbps, copy_gbps=ceiling,
                                     pct_of_copy=100 * gbps / ceiling)


def count(shapes, dtypes, device) -> int:
    return len(shapes) * len(dtypes) * 2 * 4 * (1 + len(fused_providers(device)))
