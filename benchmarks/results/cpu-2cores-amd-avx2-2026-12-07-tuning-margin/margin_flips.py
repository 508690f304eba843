"""Run from the repository root: python benchmarks/results/cpu-2cores-amd-avx2-2026-12-07-tuning-margin/margin_flips.py.
Which CPU-inference tuning choices would a 5 % margin change? resnet18/50, batch 8, fp32, channels_last."""
import os, sys
os.environ["RESNET_FUSED_TUNING_CACHE"] = "off"
sys.path.insert(0, ".")
import torch, torchvision, resnet_fused
from resnet_fused import tuning
for name in ("resnet18", "resnet50"):
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)().eval().to(memory_format=torch.channels_last)
    resnet_fused.fuse_(m, backend="tune")
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        m(x)
    flips, fused = [], 0
    for layer, entries in tuning.timings(m).items():
        for ms in entries:
            best = min(ms, key=ms.get)
            if best != "eager":
                fused += 1
                if ms[best] > 0.95 * ms["eager"]:
                    flips.append((layer, best, round(ms[best], 3), round(ms["eager"], 3)))
    print(name, "layers fused by the margin-0 rule:", fused, "would be eager under 5 %:", len(flips))
    for f in flips:
        print("   ", f)
