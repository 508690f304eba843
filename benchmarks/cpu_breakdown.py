"""Where the CPU time of ResNet inference goes, per provider: eager, fuse_, torch.compile, ONNX Runtime.

    python benchmarks/cpu_breakdown.py [--model resnet50] [--batch 8] [--resolution 224] [--reps 5]

Each provider runs `reps` profiled calls after warm-up; self time is summed per category (convolution,
BN / elementwise, reorders and copies, allocation, pooling and the classifier, the rest) and divided
by `reps`. PyTorch providers use torch.profiler (Inductor's kernels named by
cpp.enable_kernel_profile); ONNX Runtime its own profiler (per-node times). Prints one table.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import tempfile

import torch
import torchvision

import resnet_fused

CATEGORIES = ("conv", "bn/eltwise", "reorder/copy", "alloc", "pool/fc", "other")


def _category(name: str) -> str:
    n = name.lower()
    if "pool" in n or "addmm" in n or "linear" in n or "gemm" in n or "flatten" in n or "mean" in n:
        return "pool/fc"
    if "conv" in n:
        return "conv"
    if "reorder" in n or "copy" in n or "contiguous" in n or "to_dense" in n or "clone" in n or "transpose" in n:
        return "reorder/copy"
    if "empty" in n or "alloc" in n or "resize" in n:
        return "alloc"
    if any(k in n for k in ("bn_", "batch_norm", "relu", "add", "threshold", "cpp_fused", "resnet_fused", "mul")):
        return "bn/eltwise"
    return "other"


def _torch_breakdown(fn, reps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    out = collections.Counter()
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            out[_category(e.key)] += e.self_cpu_time_total / 1e3 / reps  # ms per call
    return dict(out)


def _ort_breakdown(model, x, reps: int) -> dict[str, float]:
    """ONNX Runtime's per-node kernel times over `reps` runs after 3 warm-up runs (its profiler records
    every run of the session; the warm-up runs' nodes are those before the 4th model_run event). The
    session's output is checked against eager first."""
    from resnet_fused.bench.anchors import check_output, ort_session

    with tempfile.TemporaryDirectory() as tmp:
        sess, feed = ort_session(model, x, profile_prefix=os.path.join(tmp, "prof"))
        check_output("ort", torch.as_tensor(sess.run(None, feed)[0]), model, x)
        for _ in range(2 + reps):
            sess.run(None, feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[3]
    out = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            out[_category(e["args"].get("op_name", e["name"]))] += e["dur"] / 1e3 / reps
    return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    base = getattr(torchvision.models, a.model)().eval()
    x = torch.randn(a.batch, 3, a.resolution, a.resolution).contiguous(memory_format=torch.channels_last)
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    fused = resnet_fused.fuse_(copy.deepcopy(cl))
    torch._inductor.config.cpp.enable_kernel_profile = True
    compiled = torch.compile(copy.deepcopy(cl), options={"freezing": True})
    rows = {}
    with torch.no_grad():
        for name, m in (("eager", cl), ("fused", fused), ("compile-freezing", compiled)):
            rows[name] = _torch_breakdown(lambda m=m: m(x), a.reps)
    rows["ort"] = _ort_breakdown(base, x.contiguous(), a.reps)
    head = f"{'provider':<18}" + "".join(f"{c:>14}" for c in CATEGORIES) + f"{'total':>10}"
    print(f"{a.model} eval, batch {a.batch}, {a.resolution}x{a.resolution}, {torch.get_num_threads()} threads: "
          "self time per call, ms")
    print(head)
    for name, r in rows.items():
        print(f"{name:<18}" + "".join(f"{r.get(c, 0):>14.1f}" for c in CATEGORIES) + f"{sum(r.values()):>10.1f}")


if __name__ == "__main__":
    main()
