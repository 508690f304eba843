"""Host time of one training step (forward + backward) at tiny sizes, 1 thread, median of 7 x 200 steps: torchvision
eager, the fused block on its plan (cpu rules), and the same fused block with Variant(defer=True) (the deferred plan:
conv_bn_defer_stage + conv_bn_act_stage with the input BN, the data flow the cuda backend takes with the cuDNN graphs).

    PYTHONPATH=. python benchmarks/results/cpu-2cores-amd-2026-12-06-deferred/deferred_host_time.py
"""
import copy, statistics, time, torch, torchvision, resnet_fused
from resnet_fused.backends import use_variant, Variant
torch.set_num_threads(1)
torch.manual_seed(0)
for kind, (cin, planes) in (("BasicBlock", (8, 8)), ("Bottleneck", (32, 8))):
    eager = getattr(torchvision.models.resnet, kind)(cin, planes).train()
    fused = resnet_fused.fuse_(copy.deepcopy(eager))
    x = torch.randn(1, cin, 4, 4).requires_grad_()
    def step(m):
        m(x).sum().backward()
    res = {}
    for name, m, v in (("eager", eager, Variant()), ("fused", fused, Variant()), ("fused-defer", fused, Variant(defer=True))):
        with use_variant(v):
            for _ in range(20): step(m)
            ts = []
            for _ in range(7):
                t = time.perf_counter()
                for _ in range(200): step(m)
                ts.append((time.perf_counter() - t) / 200)
        res[name] = statistics.median(ts) * 1e6
    print(kind, "  ".join(f"{k}: {t:.0f} us/step" for k, t in res.items()))
