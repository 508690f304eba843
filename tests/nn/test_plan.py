"""A fused layer's plan (resnet_fused/nn/plan.py): decided once per input signature, one C++ op per stage on the
cpu backend, made again when what it depends on changes; the result always the unfused twin's."""

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torch.profiler import profile

import resnet_fused
from helpers import CL, activation, assert_within_eager_error, needs_extension, randomize_bn
from resnet_fused import backends
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU

TV = torchvision.models.resnet
pytestmark = needs_extension


def _outermost_ops(fn) -> list[str]:
    fn()
    with profile() as p:
        fn()
    return [e.name for e in p.events() if e.cpu_parent is None and "::" in e.name and not e.name.startswith("autograd::")]


def _pair(kind="basic", projection=False):
    planes, stride = (8, 2) if projection else (8, 1)
    inplanes = 6 if projection else (8 if kind == "basic" else 32)
    out = planes * (1 if kind == "basic" else 4)
    down = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)) if projection else None
    eager = randomize_bn((TV.BasicBlock if kind == "basic" else TV.Bottleneck)(inplanes, planes, stride, down))
    return resnet_fused.fuse_(copy.deepcopy(eager)), eager


def _check(fused, eager, x, what):
    with torch.no_grad():
        exact = copy.deepcopy(eager).double()(x.double())
        # folding rounds w * s once: measured up to ~2.6x eager's max error (tests/ops/test_conv_bn_act.py), so 3x
        assert_within_eager_error(fused(x), eager(x), exact, what, factor=3.0)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
@pytest.mark.parametrize("projection", [False, True], ids=["identity", "projection"])
def test_eval_block_is_one_conv_act_stage_per_conv(kind, projection):
    """Eval without gradients: each conv -> BN (-> add) -> ReLU is one conv_act_stage call, the projection
    shortcut one more; nothing else dispatched, fewer ops than eager."""
    fused, eager = _pair(kind, projection)
    fused.eval(), eager.eval()
    x = activation((2, fused.conv1.in_channels, 6, 6), torch.float32, CL)
    with torch.no_grad():
        ops = _outermost_ops(lambda: fused(x))
        eager_ops = _outermost_ops(lambda: eager(x))
    assert ops == ["resnet_fused::conv_act_stage"] * (fused.num_convs + projection), ops
    assert len(ops) < len(eager_ops)
    _check(fused, eager, x, f"{kind} eval")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_no_backend_resolution_per_call(training, monkeypatch):
    """Routing is decided once per signature: after the first call a block's forward resolves no backend and makes
    no plan (the issue's bound: at most one resolution per block call)."""
    fused, _ = _pair("bottleneck", projection=True)
    fused.train(training)
    x = activation((2, 6, 6, 6), torch.float32, CL)
    fused(x)
    calls = []
    real = backends.resolve
    monkeypatch.setattr(backends, "resolve", lambda *a: calls.append(a) or real(*a))
    made = []
    real_make = type(fused)._make_plan
    monkeypatch.setattr(type(fused), "_make_plan", lambda self, x: made.append(x.shape) or real_make(self, x))
    for _ in range(3):
        fused(x)
    assert calls == [] and made == [], (calls, made)


def test_eval_plan_is_made_again_when_what_it_folded_changes():
    """A folded plan checks identity, version, storage and requires_grad of what it folded, and bn.eps: a replaced
    parameter, an in-place edit, new storage, a new eps, a parameter needing a gradient: each gives eager's result."""
    fused, eager = _pair("basic")
    fused.eval(), eager.eval()
    x = activation((2, 8, 5, 5), torch.float32, CL)
    _check(fused, eager, x, "first")
    w, v = torch.randn_like(eager.conv1.weight), torch.randn_like(eager.conv2.weight)
    edits = {
        "a replaced parameter": lambda m: setattr(m.conv1, "weight", nn.Parameter(w.clone())),
        "an in-place buffer update": lambda m: m.bn2.running_mean.add_(0.5),
        "new storage (p.data = ...)": lambda m: setattr(m.conv2.weight, "data", v.clone()),
        "a new eps": lambda m: setattr(m.bn1, "eps", 0.1),
    }
    for what, edit in edits.items():
        with torch.no_grad():
            edit(fused), edit(eager)
        _check(fused, eager, x, f"after {what}")
    xg = x.clone().requires_grad_()
    out = fused(xg)  # grad mode, parameters needing gradients: the unfolded stages, differentiable in every parameter
    out.sum().backward()
    assert fused.conv1.weight.grad is not None and fused.bn1.weight.grad is not None and xg.grad is not None
    eager_x = x.clone().requires_grad_()
    eager(eager_x).sum().backward()
    torch.testing.assert_close(fused.bn1.weight.grad, eager.bn1.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(xg.grad, eager_x.grad, rtol=1e-4, atol=1e-4)


def test_plans_follow_mode_and_batchnorm_settings():
    """train() / eval(), a BN's own mode, momentum and momentum=None are read per call or keyed on: the running
    statistics and num_batches_tracked stay eager's through mode switches."""
    fused, eager = _pair("bottleneck", projection=True)
    x = activation((3, 6, 7, 7), torch.float32, CL)
    steps = [("train", None), ("eval", None), ("train", lambda m: setattr(m.bn2, "momentum", None)),
             ("train", lambda m: m.bn1.eval()), ("train", lambda m: m.downsample[1].eval()), ("eval", None), ("train", None)]
    for i, (mode, edit) in enumerate(steps):
        for m in (fused, eager):
            getattr(m, mode)()
            if edit is not None:
                edit(m)
        xs = x * (i + 1)
        if mode == "train":
            out, ref = fused(xs), eager(xs)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        else:
            _check(fused, eager, xs, f"step {i}")
        for (k, a), b in zip(eager.state_dict().items(), fused.state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {i} {k}")


def test_fused_conv_bn_relu_plan_with_a_residual():
    """FusedConvBNReLU keys its plan on the residual too: with and without one, eval and train, eager's result."""
    m = randomize_bn(FusedConvBNReLU(5, 6, 3, padding=1))
    seq = nn.Sequential(copy.deepcopy(m.conv), copy.deepcopy(m.bn))
    x, r = activation((2, 5, 6, 6), torch.float32, CL), activation((2, 6, 6, 6), torch.float32, CL)
    for training in (False, True, False):
        m.train(training), seq.train(training)
        for residual in (None, r):
            with torch.no_grad():
                y = seq(x)
                ref = torch.relu(y + residual if residual is not None else y)
                torch.testing.assert_close(m(x, residual), ref, rtol=1e-4, atol=1e-5)


def test_blocks_with_plans_pickle_and_copy():
    """The plans are not state: a block pickles, deep-copies and loads as before, its copies starting with none."""
    block = FusedBasicBlock(8, 8).eval()
    x = activation((1, 8, 4, 4), torch.float32, CL)
    with torch.no_grad():
        y = block(x)
    assert len(block._plans) == 1
    for twin in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert len(twin._plans) == 0
        with torch.no_grad():
            torch.testing.assert_close(twin(x), y)
    assert isinstance(FusedBottleneck(32, 8)._plans, resnet_fused.nn.plan.PlanCache)
