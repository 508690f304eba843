"""Host time per block call, fused vs eager: torchvision BasicBlock (1x8x4x4) and Bottleneck (1x32x4x4), eval
(no_grad forward) and train (forward + backward), 1 thread, tiny inputs so that the kernels cost almost nothing;
median of 7 rounds x 200 calls, fused and eager alternating in one process.

    python benchmarks/host_time_blocks.py
"""
import torch, torchvision, time, statistics, copy, sys
import resnet_fused
torch.set_num_threads(1)
def blk(kind):
    torch.manual_seed(0)
    if kind=="basic": return torchvision.models.resnet.BasicBlock(8,8), (1,8,4,4)
    return torchvision.models.resnet.Bottleneck(32,8), (1,32,4,4)
def step(m, x, g, train):
    if not train:
        def f():
            with torch.no_grad(): m(x)
        return f
    def f():
        m(x).backward(g)
    return f
for kind in ("basic","bottleneck"):
    for train in (False, True):
        e, shape = blk(kind); f = copy.deepcopy(e); resnet_fused.fuse_(f)
        e.train(train); f.train(train)
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(train); g=torch.randn_like(x)
        fns = {"eager": step(e,x,g,train), "fused": step(f,x,g,train)}
        for fn in fns.values():
            for _ in range(50): fn()
        res = {k: [] for k in fns}
        for r in range(7):
            for k, fn in fns.items():
                t=time.perf_counter()
                for _ in range(200): fn()
                res[k].append((time.perf_counter()-t)/200*1e6)
        me, mf = statistics.median(res["eager"]), statistics.median(res["fused"])
        print(f"{kind:10s} {'train' if train else 'eval':5s} eager {me:7.1f} us fused {mf:7.1f} us ratio {mf/me:.2f}", flush=True)
