import copy, torch, torchvision, collections, sys
from torch.profiler import profile
import resnet_fused
torch.manual_seed(0)
e = torchvision.models.resnet.BasicBlock(8, 8)
f = resnet_fused.fuse_(copy.deepcopy(e))
x = torch.randn(1, 8, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
g = torch.randn_like(x)
for name, m in (("eager", e), ("fused", f)):
    m(x).backward(g)
    phase = sys.argv[1] if len(sys.argv) > 1 else "bwd"
    if phase == "bwd":
        out = m(x)
        with profile() as p: out.backward(g)
    else:
        with profile() as p: out = m(x)
    c = collections.Counter(ev.name for ev in p.events() if "::" in ev.name and not ev.name.startswith("autograd::"))
    print(name, sum(c.values()), sorted(c.items(), key=lambda t: -t[1]))
