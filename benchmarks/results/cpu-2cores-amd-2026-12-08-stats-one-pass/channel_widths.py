"""bn_stats on channels_last against x.sum() at several channel counts (is the row stride, 4K aliasing, the cause?)."""
import torch, time, resnet_fused
torch.set_num_threads(2)
OPS = torch.ops.resnet_fused
for C in (256, 264, 248, 320):
    # about as many elements at each C (W adjusted), channels_last
    x = torch.randn(32, C, 56, 56 * 256 // C if C != 256 else 56).contiguous(memory_format=torch.channels_last)
    for _ in range(2): OPS.bn_stats(x); x.sum()
    ts, ss = [], []
    for _ in range(7):
        t = time.perf_counter(); OPS.bn_stats(x); ts.append(time.perf_counter() - t)
        t = time.perf_counter(); x.sum(); ss.append(time.perf_counter() - t)
    print(C, tuple(x.shape), f"stats {sorted(ts)[3]*1e3:.2f} ms, sum {sorted(ss)[3]*1e3:.2f} ms, ratio {sorted(ts)[3]/sorted(ss)[3]:.2f}")
