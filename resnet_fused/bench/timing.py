"""Timing that a kernel engineer trusts: medians after warm-up; CUDA events on the GPU (optionally
CUDA graph replays), inputs rotated so the working set exceeds L2; on the CPU, providers timed in
alternating rounds (the machine's speed drifts)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


def _quantiles(samples_ms: Sequence[float]) -> Timing:
    s = sorted(samples_ms)
    q = statistics.quantiles(s, n=5) if len(s) >= 2 else [s[0]] * 4
    return Timing(statistics.median(s), q[0], q[3], len(s))


def time_cpu_interleaved(fns: dict[str, Callable[[], object]], min_run_time: float = 1.0) -> dict[str, Timing]:
    """Per-call times of several providers of the same work, measured in alternating rounds (one
    block of each per round): a shared machine's speed drifts over seconds, and alternation spreads
    that drift over every provider instead of handing it to whichever ran last. Each fn has been called
    once before (warm-up: caches, first-call setup; the suites make that call per provider, guarded)."""
    if not fns:
        return {}
    per_call = {name: _seconds_per_call(fn) for name, fn in fns.items()}
    block = {name: max(1, int(0.05 / t)) for name, t in per_call.items()}  # ~50 ms blocks
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds = max(5, int(min_run_time / max(sum(block[n] * per_call[n] for n in fns), 1e-9)))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(block[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / block[name] * 1e3)
    return {name: _quantiles(s) for name, s in samples.items()}


def _seconds_per_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-6)


_cuda_graphs = False


def use_cuda_graphs(enabled: bool) -> None:
    """time_cuda replays each call as a captured CUDA graph (no CPU launch overhead) when enabled."""
    global _cuda_graphs
    _cuda_graphs = enabled


def _captured(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured into a CUDA graph (after warm-up calls on a side stream, as capture requires):
    replaying it runs fn's kernels on the same buffers without the Python and launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_cuda(fns: Sequence[Callable[[], object]], warmup: int = 10, reps: int = 50) -> Timing:
    """CUDA-event time per call, cycling through `fns` (the same work on different buffers, so the
    inputs are not resident in L2 from the previous call); as CUDA graph replays after
    use_cuda_graphs(True)."""
    for i in range(warmup):  # first calls: autotuning, fold caches, allocator warm-up
        fns[i % len(fns)]()
    if _cuda_graphs:
        fns = [_captured(fn) for fn in fns]
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return _quantiles([s.elapsed_time(e) for s, e in zip(starts, ends)])


def first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of fn's first call, device work included: for the "tuned" provider, the tuner's own
    measurements (the bench runs with the tuning cache off, so every run tunes afresh)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def fresh_compile_cache() -> None:
    """Forget every torch.compile result before a new case. Each case compiles the same forward code
    object (a module class's or a closure's) for new shapes and modules; kept, the entries pile up,
    each call's guard checks grow, and past dynamo's recompile limit (8) the compiled provider silently
    runs eager (seen on the first GPU run)."""
    torch._dynamo.reset()


def copies_exceeding_l2(nbytes_per_copy: int, device: torch.device) -> int:
    """How many copies of the inputs to rotate through so that they do not fit in L2 together."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(1, min(8, -(-3 * l2 // max(nbytes_per_copy, 1))))


def peak_memory(fn: Callable[[], object], device: torch.device) -> float:
    """Peak GPU memory (MiB) allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20
