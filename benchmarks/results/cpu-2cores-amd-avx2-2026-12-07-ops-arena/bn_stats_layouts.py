"""bn_stats in both layouts against a plain sum and aten var_mean, interleaved, 2 threads, 32x256x56x56 fp32.
Run from the repository root: PYTHONPATH=. python benchmarks/results/cpu-2cores-amd-avx2-2026-12-07-ops-arena/bn_stats_layouts.py"""
import torch, resnet_fused
from resnet_fused.bench.timing import time_cpu_interleaved
from resnet_fused.ops import arena
ops = torch.ops.resnet_fused
x = torch.randn(32, 256, 56, 56)
xl = x.contiguous(memory_format=torch.channels_last)
src, dst = torch.ones(x.numel()), torch.zeros(x.numel())
def inar(f):
    def g():
        with arena.scope(x):
            return f()
    return g
fns = {"copy": lambda: dst.copy_(src), "stats_nchw": inar(lambda: ops.bn_stats(x)), "stats_nhwc": inar(lambda: ops.bn_stats(xl)),
       "sum_nchw": lambda: x.sum((0, 2, 3)), "sum_nhwc": lambda: xl.sum((0, 2, 3)),
       "var_mean_nhwc": lambda: torch.var_mean(xl, (0, 2, 3), correction=0)}
for f in fns.values(): f()
t = time_cpu_interleaved(fns, 2.0)
for k, v in t.items():
    nb = 8 * x.numel() if k == "copy" else 4 * x.numel()
    print(f"{k:20s} {v.median_ms:7.2f} ms  {nb / v.median_ms / 1e6:6.1f} GB/s read")
