import torch, time, resnet_fused
torch.set_num_threads(2)
OPS = torch.ops.resnet_fused
x = torch.randn(32, 256, 56, 56)
xcl = x.contiguous(memory_format=torch.channels_last)
g = torch.randn_like(x); gcl = g.contiguous(memory_format=torch.channels_last)
m = torch.zeros(256)
fns = {"sum": lambda: x.sum(), "stats nchw": lambda: OPS.bn_stats(x), "stats nhwc": lambda: OPS.bn_stats(xcl),
       "red nchw": lambda: OPS.bn_act_backward_reduce(g, x, m, None), "red nhwc": lambda: OPS.bn_act_backward_reduce(gcl, xcl, m, None)}
for f in fns.values(): f(); f()
ts = {k: [] for k in fns}
for _ in range(7):
    for k, f in fns.items():
        t = time.perf_counter(); f(); ts[k].append(time.perf_counter() - t)
for k, v in ts.items(): print(f"{k:12s} median {sorted(v)[3]*1e3:6.2f} ms min {min(v)*1e3:6.2f}")
