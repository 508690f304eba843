import copy, torch, torchvision
from torch.profiler import profile
import resnet_fused
torch.manual_seed(0)
for kind in ("basic", "bottleneck"):
    e = torchvision.models.resnet.BasicBlock(8, 8) if kind == "basic" else torchvision.models.resnet.Bottleneck(32, 8)
    f = resnet_fused.fuse_(copy.deepcopy(e))
    x = torch.randn(1, e.conv1.in_channels, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    for name, m in (("eager", e), ("fused", f)):
        m(x).backward(g)
        with profile() as p:
            out = m(x)
        fwd = sum("::" in ev.name for ev in p.events())
        with profile() as p:
            out.backward(g)
        bwd = sum("::" in ev.name and not ev.name.startswith("autograd::") for ev in p.events())
        print(kind, name, "ops at every level: forward", fwd, "backward", bwd)
