"""Variants of bn_stats (csrc/cpu/bn_act.cpp) built from stats_probe.cpp for AVX2, timed interleaved against the
library's op, 32x256x56x56 fp32, 2 threads. Run from the repository root: python <this file>."""
import sys, torch
from torch.utils import cpp_extension
sys.path.insert(0, ".")
from resnet_fused.bench.timing import time_cpu_interleaved
import resnet_fused
mod = cpp_extension.load("stats_exp", [__file__.rsplit("/", 1)[0] + "/stats_probe.cpp"], extra_include_paths=["csrc"],
    extra_cflags=["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    extra_ldflags=["-fopenmp"], verbose=False)
x = torch.randn(32, 256, 56, 56) * 3 + 1
xl = x.contiguous(memory_format=torch.channels_last)
ref_m, ref_v = (t.float() for t in torch.var_mean(x.double(), (0, 2, 3), correction=0)[::-1])
ops = torch.ops.resnet_fused
probes = {"ours_nhwc": lambda: ops.bn_stats(xl), "wide_nhwc": lambda: mod.stats_wide(xl), "narrow_nhwc": lambda: mod.stats_narrow(xl),
          "nomerge_b64": lambda: mod.stats_nomerge(xl, 64), **{f"b{r}": (lambda r=r: mod.stats_blocked(xl, r)) for r in (64, 32, 16, 8)},
          "ours_nchw": lambda: ops.bn_stats(x), "narrow_nchw": lambda: mod.stats_narrow(x)}
for name, f in probes.items():  # max |mean error|, max relative var error against fp64
    if name != "nomerge_b64":
        m, v = f()
        print(f"{name:14s} mean {(m - ref_m).abs().max().item():.1e}  var {((v - ref_v).abs() / ref_v).max().item():.1e}")
fns = {**probes, "sum_nhwc": lambda: xl.sum((0, 2, 3))}
for f in fns.values(): f()
for k, v in time_cpu_interleaved(fns, 2.0).items():
    print(f"{k:14s} {v.median_ms:6.2f} ms {4 * x.numel() / v.median_ms / 1e6:5.1f} GB/s")
