"""A block's projection shortcut in eval (a plan's Folded stages, resnet_fused/nn/plan.py; routed:
resnet_fused/nn/conv_bn.py conv_bn_projection_forward): both
conv -> BN pairs folded, the shortcut's conv runs without a bias and its BN shift joins the last conv's
bias, relu(conv(a, W s) + conv(x, W_d s_d) + (b + b_d)); the result is eager's."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import resnet_fused.nn.conv_bn
import resnet_fused.nn.plan
from helpers import FORMATS, activation, assert_within_eager_error, backend_params, randomize_bn
from resnet_fused.functional import fold_bn
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck

TV = torchvision.models.resnet


def _blocks(kind):
    cls, tv, planes = (FusedBasicBlock, TV.BasicBlock, 10) if kind == "basic" else (FusedBottleneck, TV.Bottleneck, 3)
    out = planes * cls.expansion
    down = nn.Sequential(nn.Conv2d(6, out, 1, 2, bias=False), nn.BatchNorm2d(out))
    eager = randomize_bn(tv(6, planes, 2, down))
    fused = cls(6, planes, 2, copy.deepcopy(down))
    fused.load_state_dict(eager.state_dict())
    return fused, eager


@pytest.mark.parametrize("backend", [p for p in backend_params(include_triton=False) if p.values[0] != "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_projection_shift_joins_the_last_conv_bias(kind, fmt, dtype, backend, monkeypatch):
    fused, eager = _blocks(kind)
    fused.backend = backend
    exact = copy.deepcopy(eager).double().eval()
    fused, eager = (m.eval().to(dtype=dtype, memory_format=fmt) for m in (fused, eager))
    calls = []  # (bias, residual) of each folded conv: a plan's conv_act_stage (cpu), or the routed path's conv_act
    real, stage = resnet_fused.nn.conv_bn.conv_act, resnet_fused.nn.plan._conv_act_stage
    monkeypatch.setattr(resnet_fused.nn.conv_bn, "conv_act", lambda x, w, b, *a, **k: calls.append((b, a[4])) or real(x, w, b, *a, **k))
    monkeypatch.setattr(resnet_fused.nn.plan, "_conv_act_stage", lambda x, w, b, r, *a: calls.append((b, r)) or stage(x, w, b, r, *a))
    x = activation((3, 6, 9, 7), dtype, fmt)
    with torch.no_grad():
        for step in range(2):  # the fold and the summed bias made, then cached
            # folding rounds w * s once: measured up to ~2.6x eager's max error (tests/ops/test_conv_bn_act.py), so 3x
            assert_within_eager_error(fused(x), eager(x), exact(x.double()), f"{kind} eval, step {step}", factor=3.0)
    shortcut, last = calls[-2:]
    assert shortcut == (None, None), "the shortcut's conv: no bias, no residual"
    n = fused.num_convs
    (conv, bn), (ds_conv, ds_bn) = (getattr(fused, f"conv{n}"), getattr(fused, f"bn{n}")), fused.downsample
    shifts = [fold_bn(c.weight, c.bias, b.running_mean, b.running_var, b.weight, b.bias, b.eps)[1] for c, b in
              ((conv, bn), (ds_conv, ds_bn))]
    assert last[1] is not None and torch.equal(last[0], (shifts[0].double() + shifts[1].double()).to(dtype)), \
        "the last conv's bias: its folded shift plus the shortcut's"


def test_projection_in_eval_with_input_gradients():
    """Eval with a gradient wanted for the input only (as adversarial attacks take): both pairs still fold,
    the output and the input's gradient are eager's."""
    fused, eager = _blocks("bottleneck")
    exact = copy.deepcopy(eager).double().eval()
    fused.eval(), eager.eval()
    for m in (fused, eager, exact):
        m.requires_grad_(False)
    x = activation((2, 6, 9, 9), torch.float32, torch.channels_last)
    g = activation((2, 12, 5, 5), torch.float32, torch.channels_last)
    results = []
    for m, t in ((fused, x), (eager, x), (exact, x.double())):
        t = t.detach().clone().requires_grad_()
        out = m(t)
        out.backward(g.to(out.dtype))
        results.append((out.detach(), t.grad))
    (f, fg), (e, eg), (x64, x64g) = results
    assert_within_eager_error(f, e, x64, "eval output", factor=3.0)
    assert_within_eager_error(fg, eg, x64g, "grad input", factor=3.0)
