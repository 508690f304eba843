"""resnet50.layer1[1] (Bottleneck 256 -> 64 -> 256) eval, 8x256x56x56 fp32 channels_last: eager, fused (fuse_, auto) and
torch.compile (default) interleaved in one process, inputs rotated over 4 tensors; per-call wall time.

    PYTHONPATH=. python benchmarks/results/cpu-2cores-amd-2026-12-06-deferred/bottleneck_inference_ab.py 100
"""
import copy, statistics, time, sys, torch, torchvision, resnet_fused
torch.manual_seed(0)
m = torchvision.models.resnet50().eval()
layer = m.layer1[1].to(memory_format=torch.channels_last)
xs = [torch.randn(8, 256, 56, 56).contiguous(memory_format=torch.channels_last) for _ in range(4)]
fused = resnet_fused.fuse_(copy.deepcopy(layer))
comp = torch.compile(copy.deepcopy(layer))
fns = (("eager", layer), ("fused", fused), ("compile", comp))
with torch.no_grad():
    for _, f in fns:
        for x in xs: f(x)
    res = {k: [] for k, _ in fns}
    for i in range(int(sys.argv[1])):
        for k, f in fns:
            x = xs[i % 4]
            t = time.perf_counter(); f(x); res[k].append(time.perf_counter() - t)
    for k, v in res.items():
        v.sort(); print(k, f"median {statistics.median(v)*1e3:.2f} ms  p10 {v[len(v)//10]*1e3:.2f}  min {v[0]*1e3:.2f}")
