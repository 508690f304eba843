"""bn_stats and bn_act_backward_reduce at 32x256x56x56 fp32, both layouts, in the CPU arena; x.sum() beside
them as the one-read floor. Interleaved rounds, the first 2 untimed; each
call's median and minimum in ms. The build under test comes from PYTHONPATH."""
import json, statistics, time
import torch
import resnet_fused
from resnet_fused.ops import arena
OPS = torch.ops.resnet_fused
torch.manual_seed(0)
out = {"resnet_fused": resnet_fused.__file__}
shape = (32, 256, 56, 56)
for layout in ("nchw", "nhwc"):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    xs = [torch.randn(shape).mul_(3).add_(1).contiguous(memory_format=fmt) for _ in range(2)]  # 2 x 103 MB: past L3
    g = torch.randn(shape).contiguous(memory_format=fmt)
    mean = torch.randn(256)
    calls = {
        "sum": lambda x: x.sum(),
        "bn_stats": lambda x: OPS.bn_stats(x),
        "reduce": lambda x: OPS.bn_act_backward_reduce(g, x, mean, None),
    }
    times = {k: [] for k in calls}
    for r in range(30):
        for k, f in calls.items():
            x = xs[r % 2]
            with arena.scope(x):
                t = time.perf_counter(); f(x); dt = time.perf_counter() - t
            if r >= 2: times[k].append(1e3 * dt)
    for k, v in times.items():
        out[f"{layout} {k}"] = round(statistics.median(v), 2)
        out[f"{layout} {k} min"] = round(min(v), 2)
print(json.dumps(out))
