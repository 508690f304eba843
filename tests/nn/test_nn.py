"""Drop-in modules against their torchvision / eager twins: values, gradients, running statistics,
state_dict keys, BatchNorm2d's options, the eval fold cache, shortcuts, models, compile, copying."""

import copy
import functools
import pickle

import pytest
import torch
import torchvision
from torch import nn

from helpers import CL, FORMATS, NCHW, Trio, assert_within_eager_error, check_fused_model, needs_extension, randomize_bn
import resnet_fused.nn.conv_bn
from resnet_fused import models
from resnet_fused.ops import onednn
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck, FusedConvBNReLU, FusedInstanceNormResBlock, ShortcutA, make_shortcut

TV = torchvision.models.resnet


def assert_same_function(fused, eager, x, training, what):
    Trio(fused, eager).step(x, training, what)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", FORMATS, ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind,inplanes,planes,stride", [
    ("basic", 16, 16, 1), ("basic", 16, 32, 2), ("bottleneck", 64, 16, 1), ("bottleneck", 32, 16, 2),
])
def test_blocks_equal_torchvision(kind, inplanes, planes, stride, fmt, training):
    ours_cls, tv_cls = (FusedBasicBlock, TV.BasicBlock) if kind == "basic" else (FusedBottleneck, TV.Bottleneck)
    out_planes = planes * tv_cls.expansion
    downsample = TV.nn.Sequential(TV.conv1x1(inplanes, out_planes, stride), nn.BatchNorm2d(out_planes)) \
        if stride != 1 or inplanes != out_planes else None
    tv = randomize_bn(tv_cls(inplanes, planes, stride, downsample)).to(memory_format=fmt)
    ours = ours_cls(inplanes, planes, stride, copy.deepcopy(downsample)).to(memory_format=fmt)
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(tv.state_dict())
    x = torch.randn(3, inplanes, 9, 9).contiguous(memory_format=fmt)
    trio = Trio(ours, tv)
    for step in range(2):  # running statistics and num_batches_tracked over two steps
        trio.step(x + step, training, f"{kind} step {step}", fmt)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_grouped_bottleneck_equals_torchvision(training):
    """ResNeXt's bottleneck: groups=4, base_width=8 (as in resnext50_32x4d, scaled down)."""
    down = nn.Sequential(TV.conv1x1(32, 64, 2), nn.BatchNorm2d(64))
    tv = randomize_bn(TV.Bottleneck(32, 16, 2, down, groups=4, base_width=8))
    ours = FusedBottleneck(32, 16, 2, copy.deepcopy(down), groups=4, base_width=8)
    ours.load_state_dict(tv.state_dict(), strict=True)
    Trio(ours, tv).step(torch.randn(2, 32, 8, 8).contiguous(memory_format=CL), training, "grouped bottleneck", CL)


@pytest.mark.parametrize("bn_options", [
    dict(momentum=None), dict(track_running_stats=False), dict(affine=False), dict(momentum=0.3, eps=1e-3),
], ids=["cumulative", "untracked", "no-affine", "momentum-eps"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batchnorm_options(bn_options, training):
    norm = functools.partial(nn.BatchNorm2d, **bn_options)
    tv = randomize_bn(TV.BasicBlock(8, 8, norm_layer=norm))
    ours = FusedBasicBlock(8, 8, norm_layer=norm)
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 8, 6, 6)
    trio = Trio(ours, tv)
    for step in range(3):
        trio.step(x * (step + 1), training, f"{bn_options} step {step}")


def test_other_norms_fall_back_to_a_correct_path():
    norm = functools.partial(nn.GroupNorm, 4)
    tv, ours = TV.BasicBlock(8, 8, norm_layer=norm), FusedBasicBlock(8, 8, norm_layer=norm)
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(ours(x), tv(x))


@needs_extension
def test_eval_fold_cache_follows_parameter_and_buffer_changes(monkeypatch):
    monkeypatch.setattr(onednn, "MIN_OUTPUT", 0)  # CPU: the prepacked oneDNN weights at this small size too
    packs = []
    prepack = onednn.prepack_conv_weight
    for module in (onednn, resnet_fused.nn.conv_bn):  # a layer's plan (nn/plan.py) and the routed path (nn/conv_bn.py)
        monkeypatch.setattr(module, "prepack_conv_weight", lambda *a: packs.append(a[-1]) or prepack(*a))
    block = randomize_bn(FusedBasicBlock(8, 8)).eval()
    eager = copy.deepcopy(block)
    eager.__class__ = TV.BasicBlock
    x = torch.randn(2, 8, 6, 6)

    def check(what):
        # folding rounds w * s once: measured up to ~2.6x eager's max error (see test_conv_bn_act), so 3x
        with torch.no_grad():
            exact = copy.deepcopy(eager).double()(x.double())
            assert_within_eager_error(block(x), eager(x), exact, what, factor=3.0)

    check("first call")
    check("second call")
    has_onednn = torch.backends.mkldnn.is_available()
    assert len(packs) == (2 if has_onednn else 0), "each conv's folded weight prepacked once, then cached"
    x = torch.randn(3, 8, 6, 6)  # CPU: the folded weights are prepacked for oneDNN per input shape
    check("another batch size")
    assert len(packs) == (4 if has_onednn else 0) and packs[-1] == x.shape
    with torch.no_grad():
        block.bn1.running_var.mul_(2.0)  # in place, like a training step's update
        eager.bn1.running_var.mul_(2.0)
    check("after an in-place buffer update")
    state = randomize_bn(copy.deepcopy(block)).state_dict()
    block.load_state_dict(state)
    eager.load_state_dict(state)
    check("after load_state_dict")
    opt = torch.optim.SGD(block.parameters(), lr=0.1)
    eager.load_state_dict(block.state_dict())
    block.zero_grad()
    block.train()(x).sum().backward()
    opt.step()
    block.eval()
    eager.load_state_dict(block.state_dict())
    check("after an optimizer step")
    block.double(), eager.double()
    with torch.no_grad():
        torch.testing.assert_close(block(x.double()), eager(x.double()))


def test_fused_conv_bn_relu_module():
    m = randomize_bn(FusedConvBNReLU(3, 8, 3, stride=2, padding=1))
    seq = nn.Sequential(m.conv, m.bn, nn.ReLU())
    assert set(m.state_dict()) == {"conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    x = torch.randn(2, 3, 11, 11)
    for training in (True, False):
        assert_same_function(m, copy.deepcopy(seq), x, training, f"FusedConvBNReLU training={training}")


def test_shortcut_options():
    x = torch.randn(2, 16, 8, 8)
    a = ShortcutA(16, 32, 2)
    y = a(x)
    assert y.shape == (2, 32, 4, 4) and not list(a.parameters())
    torch.testing.assert_close(y[:, 8:24], x[:, :, ::2, ::2])
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0
    assert make_shortcut("A", 16, 16, 1) is None and make_shortcut("B", 16, 16, 1) is None
    assert isinstance(make_shortcut("B", 16, 32, 2), nn.Sequential)
    assert isinstance(make_shortcut("C", 16, 16, 1), nn.Sequential)
    with pytest.raises(ValueError, match="shortcut must be one of"):
        make_shortcut("D", 16, 16, 1)


@pytest.mark.parametrize("depth,params", [(20, 0.27e6), (32, 0.46e6), (44, 0.66e6), (56, 0.85e6), (110, 1.7e6)])
def test_cifar_parameter_counts_match_the_paper(depth, params):
    """Table 6 of He et al. (2015): option A shortcuts, 10 classes."""
    n = sum(p.numel() for p in models.cifar_resnet(depth).parameters())
    assert abs(n - params) / params < 0.02, n


def test_cifar_1202_parameter_count():
    assert abs(sum(p.numel() for p in models.cifar_resnet(1202).parameters()) - 19.4e6) / 19.4e6 < 0.01


@pytest.mark.parametrize("name,params", [("resnet18", 11_689_512), ("resnet34", 21_797_672), ("resnet50", 25_557_032),
                                         ("resnet101", 44_549_160), ("resnet152", 60_192_808)])
def test_imagenet_models_match_torchvision(name, params):
    ours, tv = getattr(models, name)(), getattr(torchvision.models, name)()
    assert sum(p.numel() for p in ours.parameters()) == params == sum(p.numel() for p in tv.parameters())
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv.load_state_dict(ours.state_dict(), strict=True)


def test_resnet18_model_equals_torchvision():
    tv = randomize_bn(torchvision.models.resnet18(num_classes=10))
    ours = models.resnet18(num_classes=10)
    ours.load_state_dict(tv.state_dict())
    # block by block on what each block receives, and the whole network's eval output (check_fused_model): a
    # whole-network gradient comparison is a coin toss once a ReLU sign flips (tests/decisions.py)
    check_fused_model(tv, ours, torch.randn(4, 3, 64, 64))


def test_plain_networks_have_no_shortcuts():
    plain, res = models.cifar_resnet(20, plain=True), models.cifar_resnet(20)
    assert all(b.downsample is None and not b.shortcut for layer in (plain.layer1, plain.layer2, plain.layer3) for b in layer)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in res.parameters())  # option A: no parameters
    block = plain.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    eager = nn.Sequential(block.conv1, block.bn1, nn.ReLU(), block.conv2, block.bn2, nn.ReLU())
    torch.testing.assert_close(block(x), eager(x))
    assert models.resnet50(plain=True)(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_instance_norm_block_equals_eager():
    # conv biases right before a normalization get a zero gradient (pure rounding noise): left out
    m = FusedInstanceNormResBlock(6, affine=True, bias=False)
    with torch.no_grad():
        m.in1.weight.uniform_(0.5, 1.5), m.in2.bias.uniform_(-0.5, 0.5)

    class Eager(nn.Module):
        def __init__(self, f):
            super().__init__()
            self.conv1, self.in1, self.conv2, self.in2 = f.conv1, f.in1, f.conv2, f.in2

        def forward(self, x):
            return x + self.in2(self.conv2(torch.relu(self.in1(self.conv1(x)))))

    for fmt in FORMATS:
        x = torch.randn(2, 6, 7, 7).contiguous(memory_format=fmt)
        assert_same_function(m, Eager(copy.deepcopy(m)), x, True, f"instance norm block {fmt}")


@pytest.mark.parametrize("fmt", [NCHW, CL], ids=["nchw", "nhwc"])
def test_block_compiles_without_graph_breaks(fmt):
    block = randomize_bn(FusedBottleneck(32, 8, norm_layer=functools.partial(nn.BatchNorm2d, momentum=None)))
    eager = copy.deepcopy(block)
    compiled = torch.compile(copy.deepcopy(block), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 32, 6, 6).contiguous(memory_format=fmt)
    for training in (True, False):
        for m in (eager, compiled):
            m.train(training)
        torch.testing.assert_close(compiled(x), eager(x))
    torch.testing.assert_close(compiled.bn1.running_var, eager.bn1.running_var)
    assert compiled.bn1.num_batches_tracked == eager.bn1.num_batches_tracked


def test_copy_pickle_dtype_and_autocast():
    block = randomize_bn(FusedBasicBlock(8, 8)).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = block(x)
        for clone in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
            torch.testing.assert_close(clone(x), expected)
        eager = copy.deepcopy(block)
        eager.__class__ = TV.BasicBlock
        low = copy.deepcopy(block).bfloat16()
        assert_within_eager_error(low(x.bfloat16()), copy.deepcopy(eager).bfloat16()(x.bfloat16()), expected.double(), "bf16 block")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, ref = block(x), eager(x)
        assert out.dtype == ref.dtype
        assert_within_eager_error(out, ref, expected.double(), "autocast block")


@pytest.mark.parametrize("backend", ["auto", pytest.param("cpu", marks=needs_extension)])
def test_compile_on_cpu_lowers_the_eager_composition_under_auto(backend):
    """Under torch.compile on the CPU, "auto" hands Inductor the eager composition (it fuses conv + BN +
    ReLU itself, and opaque custom ops would stop it); a named backend keeps its ops in the graph; both
    compute what the uncompiled fused block does."""
    block = randomize_bn(FusedBasicBlock(8, 8, backend=backend)).train()
    ops_seen = []

    def record(gm, example_inputs):
        ops_seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    eager, exact_block = copy.deepcopy(block), copy.deepcopy(block).double()  # all three from the same buffers
    torch._dynamo.reset()
    out = torch.compile(block, backend=record, fullgraph=True)(x)
    fused_ops = [t for t in ops_seen if "resnet_fused" in t]
    assert bool(fused_ops) == (backend == "cpu"), ops_seen
    assert_within_eager_error(out, eager(x), exact_block(x.double()), f"{backend}: compiled block")
    assert_within_eager_error(block.bn1.running_var, eager.bn1.running_var, exact_block.bn1.running_var,
                              f"{backend}: running_var")
