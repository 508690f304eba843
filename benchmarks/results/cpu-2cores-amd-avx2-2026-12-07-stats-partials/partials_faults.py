"""bn_stats / bn_act_backward_reduce (csrc/cpu/bn_act.cpp) before and after their chunk partials moved from std::vector
to the tensor allocator: page faults per warm call (getrusage) and time, in the CPU arena, both layouts, fp32, 2 threads.
Both versions are built here from git (the old at BEFORE, the new from the working tree) without their registration,
for AVX2, so that they run side by side in one process. Run from the repository root:
    python benchmarks/results/cpu-2cores-amd-avx2-2026-12-07-stats-partials/partials_faults.py [N C H W]"""
import os, resource, subprocess, sys, tempfile
import torch
from torch.utils import cpp_extension

sys.path.insert(0, ".")
import resnet_fused  # noqa: F401  (the arena)
from resnet_fused.bench.timing import time_cpu_interleaved
from resnet_fused.ops import arena

BEFORE = "ebea09a"  # partials in std::vector
FLAGS = ["-O3", "-fopenmp", "-fvisibility=hidden", "-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]


def build(name, source):
    folder = tempfile.mkdtemp()
    body = source[:source.index("TORCH_LIBRARY_IMPL(resnet_fused, CPU, m)")] + "}  // namespace resnet_fused::cpu\n"
    open(os.path.join(folder, "bn_act_body.cpp"), "w").write(body)
    open(os.path.join(folder, "mod.cpp"), "w").write(
        '#include <torch/extension.h>\n#include "bn_act_body.cpp"\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {\n'
        '  m.def("bn_stats", &resnet_fused::cpu::bn_stats);\n  m.def("reduce", &resnet_fused::cpu::bn_act_backward_reduce);\n}\n')
    return cpp_extension.load(f"partials_{name}", [os.path.join(folder, "mod.cpp")], extra_include_paths=["csrc"],
                              extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], verbose=False)


mods = {"vector": build("vector", subprocess.check_output(["git", "show", f"{BEFORE}:csrc/cpu/bn_act.cpp"], text=True)),
        "tensor": build("tensor", open("csrc/cpu/bn_act.cpp").read())}
shape = tuple(int(a) for a in sys.argv[1:5]) or (32, 256, 56, 56)
torch.manual_seed(0)
fns = {}
for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
    x = torch.randn(shape).contiguous(memory_format=fmt)
    g, mean = torch.randn_like(x), torch.randn(shape[1])
    for name, mod in mods.items():
        for op, f in (("stats", lambda mod=mod, x=x: mod.bn_stats(x)), ("reduce", lambda mod=mod, x=x, g=g, m=mean: mod.reduce(g, x, m, None))):
            def call(f=f, x=x):
                with arena.scope(x):
                    return f()
            fns[f"{op} {layout} {name}"] = call
print(f"{shape}, fp32, {torch.get_num_threads()} threads, in the arena")
for key, call in fns.items():
    call(), call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        call()
    print(f"{key:22s} {(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10:7.0f} page faults per call")
numel = torch.Size(shape).numel()
for rep in range(3):
    t = time_cpu_interleaved(fns, 2.0)
    print(f"run {rep + 1}: " + "  ".join(f"{k} {v.median_ms:.2f} ms ({(1 if k.startswith('stats') else 2) * 4 * numel / v.median_ms / 1e6:.1f} GB/s read)" for k, v in t.items()))
