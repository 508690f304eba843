"""The eval fold cache (resnet_fused/nn/fold.py) against every way a folded input can change: after
each, eval output equals an unfused twin holding the same state (the eager-error rule against float64).

aten's batch_norm updates the running statistics in place without bumping their version counters
(pytorch issue 13402): after an eager training step (the tuner's eager choice, the CPU compile rule's
eager composition) a cache keyed on those counters alone served BN folded from the old statistics.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused
from helpers import FORMATS, activation, assert_within_eager_error, needs_extension, randomize_bn
from resnet_fused import backends, tuning
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU
from resnet_fused.ops import onednn

TV = torchvision.models.resnet
FrozenBatchNorm2d = torchvision.ops.misc.FrozenBatchNorm2d


class ConvBNReLU(nn.Module):
    """FusedConvBNReLU's unfused twin (the same state_dict keys)."""

    def __init__(self, m: FusedConvBNReLU):
        super().__init__()
        self.conv, self.bn = copy.deepcopy(m.conv), copy.deepcopy(m.bn)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


def _projection(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


def _basic():  # stride 2, projection shortcut, odd channel counts
    fused = FusedBasicBlock(6, 10, 2, _projection(6, 10, 2))
    return fused, TV.BasicBlock(6, 10, 2, _projection(6, 10, 2))


def _bottleneck():
    fused = FusedBottleneck(6, 3, 1, _projection(6, 12, 1))
    return fused, TV.Bottleneck(6, 3, 1, _projection(6, 12, 1))


def _conv_bn_relu(momentum=0.1):  # with a conv bias (folded too)
    fused = FusedConvBNReLU(6, 7, 3, padding=1, bias=True, momentum=momentum)
    return fused, ConvBNReLU(fused)


def _randomize(m: nn.Module, gain=(0.5, 1.5)) -> nn.Module:
    """helpers.randomize_bn, FrozenBatchNorm2d's buffers too."""
    with torch.no_grad():
        for f in (f for f in m.modules() if isinstance(f, FrozenBatchNorm2d)):
            f.weight.uniform_(*gain), f.bias.uniform_(-0.3, 0.3)
            f.running_mean.uniform_(-0.3, 0.3), f.running_var.uniform_(0.5, 1.5)
    return randomize_bn(m, gain)


def _fused_chain(norm=nn.BatchNorm2d):  # fuse_ on conv -> BN -> ReLU: _FusedConvBNReLUHead
    twin = _randomize(nn.Sequential(nn.Conv2d(6, 7, 3, padding=1, bias=False), norm(7), nn.ReLU()))
    return resnet_fused.fuse_(copy.deepcopy(twin), backend=None), twin


def _frozen_basic():  # fuse_ on a detection backbone's block: FusedFrozenBNBasicBlock, its downsample a fused chain
    twin = _randomize(TV.BasicBlock(6, 10, 2, nn.Sequential(nn.Conv2d(6, 10, 1, 2, bias=False), FrozenBatchNorm2d(10)),
                                    norm_layer=FrozenBatchNorm2d))
    return resnet_fused.fuse_(copy.deepcopy(twin), backend=None), twin


MODULES = {"basic": _basic, "frozen_basic": _frozen_basic, "bottleneck": _bottleneck, "conv_bn_relu": _conv_bn_relu, "fuse_chain": _fused_chain,
           "cumulative": lambda: _conv_bn_relu(momentum=None), "frozen_chain": lambda: _fused_chain(FrozenBatchNorm2d)}


def _eager_runner(fused: nn.Module) -> nn.Module:
    """The module whose _run_eager runs the eager composition (the fuse_'d chain: its head conv)."""
    return next(m for m in fused.modules() if hasattr(m, "_run_eager"))


def fused_step(fused, x):
    fused.train()
    fused(x).sum().backward()


def eager_step(fused, x):  # F.batch_norm on the running statistics: their versions stay put
    fused.train()
    _eager_runner(fused)._run_eager(x).sum().backward()


def tuned_step(fused, x, monkeypatch):
    """backend="tune" with eager timed fastest: the real call runs the eager composition."""
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", "off")
    monkeypatch.setenv("RESNET_FUSED_TUNING_BUDGET", "0.01")
    monkeypatch.setattr(tuning, "time_candidates", lambda calls, device, budget: {n: float(n != "eager") for n in calls})
    tuning.store.clear()
    with backends.use("tune"):
        fused_step(fused, x)
    tuning.store.clear()


def compiled_step(fused, x):  # on the CPU under "auto": Inductor lowers the eager composition
    torch._dynamo.reset()
    fused.train()
    torch.compile(fused)(x).sum().backward()


def loaded_state(fused, x):
    state = _randomize(copy.deepcopy(fused), gain=(0.3, 2.0)).state_dict()
    fused.load_state_dict(state)


def inplace_edits(fused, x):
    with torch.no_grad():
        for m in fused.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d)):
                m.running_var.fill_(2.0)
                m.running_mean.add_(0.5)
                m.weight.mul_(1.5)
            elif isinstance(m, nn.Conv2d):
                m.weight.mul_(-0.75)


def replaced_buffers(fused, x):
    """New tensor objects in the running statistics' place (module attribute assignment) over the same
    storage (`.data`: a fresh version counter), then edited in place up to the old one's version: the
    same address and version as before, another tensor."""
    for m in fused.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, FrozenBatchNorm2d)):
            for name, low in (("running_mean", -0.5), ("running_var", 0.5)):
                old = getattr(m, name)
                new = old.data
                while new._version < max(old._version, 1):
                    new.uniform_(low, low + 1.0)
                setattr(m, name, new)


def optimizer_step(fused, x):
    params = [p for p in fused.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    torch.optim.SGD(params, lr=0.5, momentum=0.9, foreach=True).step()


CHANGES = {"fused_step": fused_step, "eager_step": eager_step, "tuned_step": tuned_step, "compiled_step": compiled_step,
           "load_state_dict": loaded_state, "inplace_edits": inplace_edits, "replaced_buffers": replaced_buffers,
           "optimizer_step": optimizer_step}


def _check_eval(fused, twin, x, what):
    twin.load_state_dict(fused.state_dict())
    fused.eval(), twin.eval()
    exact = copy.deepcopy(twin).double()
    with torch.no_grad():
        # folding rounds w * s once: measured up to ~2.6x eager's max error (tests/ops/test_conv_bn_act.py), so 3x
        assert_within_eager_error(fused(x), twin(x), exact(x.double()), what, factor=3.0)


@needs_extension
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("kind", list(MODULES))
def test_eval_after_a_change_equals_the_unfused_twin(kind, change, fmt, monkeypatch):
    monkeypatch.setattr(onednn, "MIN_OUTPUT", 0)  # the oneDNN prepacked weights (cached per fold) at this size too
    torch.manual_seed(0)
    fused, twin = MODULES[kind]()
    fused = _randomize(fused).to(memory_format=fmt)
    twin = twin.to(memory_format=fmt)
    x = activation((3, 6, 9, 7), torch.float32, fmt)
    _check_eval(fused, twin, x, f"{kind}: before")  # fills the fold cache
    args = (monkeypatch,) if change == "tuned_step" else ()
    CHANGES[change](fused, activation((3, 6, 9, 7), torch.float32, fmt, scale=2.0, offset=1.0), *args)
    _check_eval(fused, twin, x, f"{kind}: after {change}")
    _check_eval(fused, twin, x, f"{kind}: after {change}, cached")


@needs_extension
def test_untracked_batchnorm_in_eval_uses_batch_statistics_after_training():
    """track_running_stats=False: nothing is folded (eval normalizes with batch statistics), before and after training."""
    fused = randomize_bn(FusedBasicBlock(6, 6, norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False)))
    twin = TV.BasicBlock(6, 6, norm_layer=lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    x = activation((2, 6, 5, 5), torch.float32, torch.channels_last)
    _check_eval(fused, twin, x, "untracked: before")
    eager_step(fused, x * 2 + 1)
    _check_eval(fused, twin, x, "untracked: after an eager step")
