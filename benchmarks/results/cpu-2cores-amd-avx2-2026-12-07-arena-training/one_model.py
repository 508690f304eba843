"""One model per process (a user's training script): eager, fuse_ with its plans made without the arena, or fuse_;
torchvision model, batch 8, channels_last, fp32, cross-entropy + SGD step; prints the median step time."""
import copy, resource, sys, time, torch, torchvision, resnet_fused
from resnet_fused.nn import plan
torch.manual_seed(0)
name, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = getattr(torchvision.models, name)(num_classes=1000).train().to(memory_format=torch.channels_last)
if mode != "eager":
    resnet_fused.fuse_(m)
if mode == "fused-no-arena":
    plan.cpu_arena = lambda x: None
x = torch.randn(8, 3, 224, 224).to(memory_format=torch.channels_last)
labels = torch.randint(0, 1000, (8,))
opt = torch.optim.SGD(m.parameters(), lr=1e-3)
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(m(x), labels).backward()
    opt.step()
for _ in range(3): step()
ts, pf, us, ss = [], [], [], []
for _ in range(steps):
    r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
    step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    ts.append(time.perf_counter() - t0); pf.append(r1.ru_minflt - r0.ru_minflt)
    us.append(r1.ru_utime - r0.ru_utime); ss.append(r1.ru_stime - r0.ru_stime)
med = lambda v: sorted(v)[len(v) // 2]
print(f"{name:9s} {mode:15s} wall {med(ts)*1e3:7.1f} ms  user {med(us)*1e3:7.1f}  sys {med(ss)*1e3:6.1f}  faults {med(pf):6d}  "
      f"maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
