"""The `overhead` suite: host time per call at tiny sizes, where the kernels cost almost nothing and what
is left is the Python, dispatch and autograd path around them.

Cases: torchvision BasicBlock(8, 8) on 1x8x4x4, Bottleneck(32, 8) on 1x32x4x4 (identity shortcuts) and
a whole resnet50(num_classes=10) on 2x3x32x32 (batch 2: at batch 1 layer4's 1x1 maps leave one value per
channel, which BatchNorm refuses in training; at this size resnet50 is bound by reading its 94 MB of
weights, ~25 ms on one thread, not by its host path). Channels_last, the run's dtype; inference (eval, no grad)
and training (train(), forward + backward of a fixed grad_output into an input that requires grad;
parameter gradients accumulate from step to step, as in the blocks suite). Providers: eager, fused
(fuse_ with the device's backend) and torch.compile of the eager module (--quick: not for resnet50).

Host time: CPU, one thread (torch.set_num_threads(1), restored afterwards; compiles happen under it too),
providers in alternating rounds (time_cpu_interleaved). CUDA: the wall time of a block of BLOCK calls
with no synchronization inside it (synchronized before and after), divided by BLOCK, blocks alternating
between providers the same way; CUDA graph replays are not measured (they remove the host path this
suite is about; that path would be untested here, no GPU in CI). The first call (compile, tuning, fold
caches) is timed apart (first_call_s) and WARMUP more calls precede the timing.

Counts, of one step after the timing, from torch.profiler: aten_ops = the outermost dispatched ops,
events named aten::*, resnet_fused::* or mkldnn::* with no such op among their ancestors (ops called
by Python, by the autograd engine or by compiled code; the ops they call in turn are not counted, nor
Inductor's generated kernels, which are not dispatched ops). launches (CUDA only, None on CPU) =
device events of the step (kernels, memcpy, memset).
"""

from __future__ import annotations

import contextlib

import torch
import torchvision
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import resnet_fused
from resnet_fused.bench.blocks import prepare, step_fn
from resnet_fused.bench.timing import Timing, first_call_s, fresh_compile_cache, time_cpu_interleaved

# name: (input shape, the eager module, output shape)
CASES = {
    "BasicBlock": ((1, 8, 4, 4), lambda: torchvision.models.resnet.BasicBlock(8, 8), (1, 8, 4, 4)),
    "Bottleneck": ((1, 32, 4, 4), lambda: torchvision.models.resnet.Bottleneck(32, 8), (1, 32, 4, 4)),
    "resnet50": ((2, 3, 32, 32), lambda: torchvision.models.resnet50(num_classes=10), (2, 10)),
}
# a cold-cache compile of resnet50 takes ~2 min on 2 CPU cores (30 s eval, 90 s training): --quick leaves it out
SLOW_TO_COMPILE = {"resnet50"}
OP_PREFIXES = ("aten::", "resnet_fused::", "mkldnn::")
WARMUP = 3
BLOCK = 100  # CUDA: calls per timed block


def providers(device: torch.device, compile_modes: list[str], case: str, quick: bool) -> list[str]:
    compile_modes = [] if quick and case in SLOW_TO_COMPILE else compile_modes
    backend = "cpu" if device.type == "cpu" else "cuda"
    fused = [f"fused-{backend}"] if resnet_fused.backends.available()[backend] else []
    return ["eager", *[f"compile-{m}" for m in compile_modes], *fused]


def _is_op(event) -> bool:
    return event.name.startswith(OP_PREFIXES)


def count_events(step, device: torch.device) -> tuple[int, int | None]:
    """(aten_ops, launches) of one call of step, as the module docstring defines them."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()

    def outermost(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if _is_op(parent):
                return False
            parent = parent.cpu_parent
        return True

    ops = sum(1 for e in events if e.device_type == DeviceType.CPU and _is_op(e) and outermost(e))
    return ops, (sum(1 for e in events if e.device_type == DeviceType.CUDA) if cuda else None)


def _time_host(steps: dict, device: torch.device, min_run_time: float) -> dict[str, Timing]:
    """Host time per call, as the module docstring says (CUDA: untested, no GPU in CI)."""
    if device.type != "cuda":
        return time_cpu_interleaved(steps, min_run_time)

    def block(step):
        def run():
            torch.cuda.synchronize(device)
            for _ in range(BLOCK):
                step()
            torch.cuda.synchronize(device)
        return run

    per_block = time_cpu_interleaved({p: block(s) for p, s in steps.items()}, min_run_time)
    return {p: Timing(t.median_ms / BLOCK, t.p20_ms / BLOCK, t.p80_ms / BLOCK, t.runs) for p, t in per_block.items()}


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """CPU: torch's intra-op threads set to 1 inside the block, restored after it."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(cases, dtypes, device: torch.device, compile_modes, quick: bool, rec) -> None:
    """cases: names in CASES (the main job passes all of them)."""
    min_run_time = 0.3 if quick else 1.0
    with _one_thread(device):
        for case in cases:
            shape, make_module, out_shape = CASES[case]
            for dtype in dtypes:
                for training in (False, True):
                    fields = dict(suite="overhead", case=case, shape="x".join(map(str, shape)),
                                  dtype=str(dtype).removeprefix("torch."), mode="training" if training else "inference")
                    with rec.case(fields, providers(device, compile_modes, case, quick)) as c:
                        fresh_compile_cache()
                        torch.manual_seed(0)
                        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
                        x.requires_grad_(training)
                        grad = torch.randn(out_shape, device=device, dtype=dtype)

                        def build(p):
                            torch.manual_seed(0)
                            return step_fn(prepare(make_module(), p, device, dtype).train(training), x, grad, training)

                        steps = c.each(build)
                        first = c.each(lambda p: first_call_s(steps[p], device))
                        c.each(lambda p: [steps[p]() for _ in range(WARMUP)])
                        timings = _time_host({p: steps[p] for p in c.live}, device, min_run_time)
                        counts = c.each(lambda p: count_events(steps[p], device))
                        for p in c.live:
                            t = timings[p]
                            c.result(p, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, runs=t.runs,
                                     host_us=t.median_ms * 1e3, aten_ops=counts[p][0], launches=counts[p][1],
                                     first_call_s=first[p])


def count(cases, dtypes, device, compile_modes, quick: bool) -> int:
    return len(dtypes) * 2 * sum(len(providers(device, compile_modes, case, quick)) for case in cases)
