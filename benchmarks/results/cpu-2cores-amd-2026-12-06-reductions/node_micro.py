# backward host time of one training BN + ReLU stage at a tiny size: resnet_fused bn_act_stage vs aten batch_norm + relu
import statistics, time, torch
import resnet_fused
torch.set_num_threads(1)
x = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
w = torch.randn(8, requires_grad=True); b = torch.randn(8, requires_grad=True)
rm, rv = torch.zeros(8), torch.ones(8)
op = torch.ops.resnet_fused.bn_act_stage.default
def fused():
    xi = x.detach().requires_grad_()
    return op(xi, w, b, rm, rv, None, True, 0.1, None, 1e-5, "relu", 0.0, None)
def eager():
    xi = x.detach().requires_grad_()
    return torch.relu(torch.nn.functional.batch_norm(xi, rm, rv, w, b, True, 0.1, 1e-5))
g = torch.randn(1, 8, 4, 4).to(memory_format=torch.channels_last)
def bwd_time(f, n=2000):
    ys = [f() for _ in range(n)]
    t = time.perf_counter()
    for y in ys: y.backward(g)
    return (time.perf_counter() - t) / n * 1e6
def fwd_time(f, n=2000):
    t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n * 1e6
for f in (fused, eager): bwd_time(f, 200); fwd_time(f, 200)
res = {"fused": ([], []), "eager": ([], [])}
for _ in range(7):
    for name, f in (("fused", fused), ("eager", eager)):
        res[name][0].append(fwd_time(f)); res[name][1].append(bwd_time(f))
for name, (fw, bw) in res.items():
    print(f"{name}: forward {statistics.median(fw):6.2f} us  backward {statistics.median(bw):6.2f} us")
