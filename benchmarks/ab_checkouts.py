"""A/B of two checkouts on the CPU: fuse_(torchvision resnet18 / resnet50), eval (no grad) and a training
forward + backward, batch 8 at 224x224, channels_last; eager and fused timed alternately in one process
(medians in ms, and their ratio: eager drifts with the machine as much as fused). The checkout under test
comes from PYTHONPATH; alternate checkouts run after run:

    for i in 1 2; do for v in OLD NEW; do PYTHONPATH=$v python benchmarks/ab_checkouts.py >> ab.jsonl; done; done
"""
import json, statistics, sys, time
import torch, torchvision
import resnet_fused
torch.manual_seed(0)
out = {"resnet_fused": resnet_fused.__file__}
for name, batch, hw in (("resnet18", 8, 224), ("resnet50", 8, 224)):
    for mode in ("eval", "train"):
        eager = getattr(torchvision.models, name)().to(memory_format=torch.channels_last)
        fused = resnet_fused.fuse_(getattr(torchvision.models, name)().to(memory_format=torch.channels_last))
        x = torch.randn(batch, 3, hw, hw).to(memory_format=torch.channels_last)
        times = {"eager": [], "fused": []}
        def step(m):
            if mode == "eval":
                with torch.no_grad():
                    m(x)
            else:
                m(x).sum().backward()
        for m in (eager, fused):
            m.train(mode == "train")
            for _ in range(2): step(m)
        reps = 6 if mode == "eval" else 3
        if name == "resnet50" and mode == "train": reps = 2
        for _ in range(reps):
            for k, m in (("eager", eager), ("fused", fused)):
                t = time.perf_counter(); step(m); times[k].append(1e3 * (time.perf_counter() - t))
        out[f"{name} {mode}"] = {k: statistics.median(v) for k, v in times.items()}
print(json.dumps(out))
