import json, statistics, sys, time, torch
import torch.nn.functional as F
import resnet_fused
torch.manual_seed(0)
op = torch.ops.resnet_fused.bn_act_stage.default
shapes = [(64,112), (64,56), (256,56), (128,56), (128,28), (512,28), (256,28), (1024,14), (512,14), (2048,7)]
print(f"{'shape':9s} {'fused fwd/bwd':>15s} {'eager fwd/bwd':>15s}")
for c, hw in shapes:
    x = torch.randn(8, c, hw, hw).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(c, requires_grad=True); b = torch.randn(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c); g = torch.randn_like(x)
    fused = lambda: op(x, w, b, rm, rv, None, True, 0.1, None, 1e-5, "relu", 0.0, None)
    eager = lambda: torch.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
    res = {}
    for f in (fused, eager):
        for _ in range(3): f().backward(g)
    ts = {0: ([], []), 1: ([], [])}
    for _ in range(15):
        for i, f in enumerate((fused, eager)):
            t = time.perf_counter(); y = f(); t1 = time.perf_counter(); y.backward(g); t2 = time.perf_counter()
            ts[i][0].append((t1 - t) * 1e3); ts[i][1].append((t2 - t1) * 1e3)
    m = lambda v: statistics.median(v)
    print(f"{c}x{hw:<5d} {m(ts[0][0]):7.2f}/{m(ts[0][1]):6.2f} {m(ts[1][0]):7.2f}/{m(ts[1][1]):6.2f}  grad strides fused {x.grad.is_contiguous(memory_format=torch.channels_last)}")
    x.grad = None
