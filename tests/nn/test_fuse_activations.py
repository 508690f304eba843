"""fuse_ with every activation the kernels compute: conv -> BN -> act runs (nn.Sequential, torchvision
Conv2dNormActivation, timm ConvNormAct / BatchNormAct2d), standalone BN -> act (pre-activation norms, a
final norm, a BN after a conv the fused path cannot compute), Hugging Face transformers ResNets; the
activations it leaves alone, named in the report; the drop-in FusedBNAct; pickling in a fresh process.

Each model is checked by helpers.check_converted_model: unit by unit (blocks, conv-headed runs and the
standalone BN -> act units), training and eval, gradients and running statistics, unfuse_."""

import copy
import functools
import pickle
import subprocess
import sys

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d, ConvNormAct
from timm.layers import activations as timm_acts
from torch import nn
from torchvision.ops import Conv2dNormActivation

import resnet_fused
from helpers import Trio, check_converted_model, check_inference, randomize_bn
from resnet_fused.nn.bn_act import FusedBNAct

ACTS = {
    "relu6": nn.ReLU6, "leaky_relu": functools.partial(nn.LeakyReLU, 0.2), "silu": nn.SiLU, "gelu": nn.GELU,
    "gelu_tanh": functools.partial(nn.GELU, approximate="tanh"), "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid, "hardtanh_0_6": functools.partial(nn.Hardtanh, 0.0, 6.0),
    "timm_swish": timm_acts.Swish, "timm_gelu": timm_acts.GELU, "timm_hardswish": timm_acts.HardSwish,
}


@pytest.mark.parametrize("name", list(ACTS))
def test_sequential_runs_with_each_activation(name):
    act = ACTS[name]

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), act(),
                             nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8, momentum=None), act(),
                             nn.BatchNorm2d(8), act())  # no conv before it: a standalone BN -> act
    report = check_converted_model(build, torch.randn(2, 3, 9, 9))
    assert report.swapped == ["0+1+2", "3+4+5", "6+7"] and not report.bn_left, report


@pytest.mark.parametrize("name", ["leaky_relu", "silu", "hardswish", "timm_gelu"])
def test_conv_norm_act_modules_with_each_activation(name):
    act = ACTS[name]

    def build():
        torch.manual_seed(0)
        return nn.Sequential(Conv2dNormActivation(3, 8, 3, stride=2, activation_layer=act),
                             ConvNormAct(8, 8, 3, act_layer=act), ConvNormAct(8, 8, 1, apply_act=False))
    report = check_converted_model(build, torch.randn(2, 3, 12, 12))
    assert report.swapped == ["0.0+1+2", "1.conv+bn", "2.conv+bn"] and not report.bn_left, report


def test_bn_after_a_conv_it_cannot_fold_into_fuses_with_its_activation():
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                             nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(4),
                             nn.AvgPool2d(2))
    report = check_converted_model(build, torch.randn(2, 3, 9, 9))
    assert report.swapped == ["0+1+2", "4+5"], report
    assert list(report.bn_left) == ["7"] and "reflect" in report.bn_left["7"], report


@pytest.mark.parametrize("act,named", [(nn.PReLU(), "PReLU(num_parameters=1)"), (nn.ELU(), "ELU(alpha=1.0)"),
                                       (nn.Hardtanh(-1.0, 1.0), "Hardtanh(min_val=-1.0, max_val=1.0)")])
def test_activations_the_kernels_do_not_compute_leave_the_unit_alone(act, named):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), act, nn.BatchNorm2d(8), copy.deepcopy(act))
    report = resnet_fused.fuse_(model, dry_run=True)
    assert not report.swapped, report
    assert set(report.bn_left) == {"1", "3"} and all(named in why for why in report.bn_left.values()), report
    assert named in report.skipped["0"], report


class _Scaled(nn.Module):
    """A model's own module: fuse_ cannot know what it computes."""

    def forward(self, x):
        return 0.5 * x


def test_a_models_own_module_after_a_bn_runs_as_it_is_and_inside_a_batchnorm_act_is_named():
    def build():
        torch.manual_seed(0)
        inner = ConvNormAct(8, 8, 3)
        inner.bn.act = _Scaled()
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), _Scaled(), inner)
    report = check_converted_model(build, torch.randn(2, 3, 10, 10))
    assert report.swapped == ["0+1"], report
    assert list(report.bn_left) == ["3.bn"] and "_Scaled()" in report.bn_left["3.bn"], report


def test_hooked_or_shared_activations_run_as_they_are():
    def build():
        torch.manual_seed(0)
        shared, hooked = nn.SiLU(), nn.SiLU()
        hooked.register_forward_hook(lambda *args: None)
        return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), shared, nn.Conv2d(8, 8, 1, bias=False),
                             nn.BatchNorm2d(8), shared, nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8), hooked)
    report = check_converted_model(build, torch.randn(2, 3, 10, 10))
    assert report.swapped == ["0+1", "3+4", "6+7"] and not report.bn_left, report


def test_hooked_standalone_bn_is_left_and_explained():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU())
    model[0].register_forward_pre_hook(lambda *args: None)
    report = resnet_fused.fuse_(model, dry_run=True)
    assert not report.swapped and "hooks" in report.bn_left["0"], report


# stage 4 at 2 x 2 (48 / 32, rounded up): at 1 x 1 the folded 1x1 convs' inference error on the cpu backend (aten's
# conv with a bias, 2 output pixels) reaches 3-4x eager's, above check_inference's bound (whose folded eager way,
# torch.fx's conv-BN fusion, does not fold a timm BatchNormAct2d: eager's error there is the unfolded one's)
@pytest.mark.parametrize("name,activation", [("resnext26ts", "SiLU"), ("cspresnet50", "LeakyReLU"), ("resnetv2_50", "ReLU"),
                                             ("mobilenet_v3_small", "Hardswish")])
def test_cnn_families(name, activation):
    def build():
        if name == "mobilenet_v3_small":
            return torchvision.models.mobilenet_v3_small(num_classes=4)
        return timm.create_model(name, num_classes=4, pretrained=False)
    report = check_converted_model(build, torch.randn(2, 3, 48, 48))
    assert any(type(m).__name__ == activation for m in build().modules()) and report.bn_total > 30 and not report.bn_left, report
    if name == "resnetv2_50":  # pre-activation: every block's norm1 and the final norm are standalone BN + ReLU
        assert "stages.0.blocks.0.norm1" in report.swapped and "norm" in report.swapped, report
    if name == "mobilenet_v3_small":
        assert "features.0.0+1+2" in report.swapped, report  # conv -> BN -> Hardswish


class _Logits(nn.Module):
    """A transformers classifier as a tensor -> tensor module."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


@pytest.mark.parametrize("layer_type,act", [("basic", "relu"), ("bottleneck", "swish"), ("basic", "gelu")])
def test_transformers_resnet(layer_type, act):
    import transformers  # the test extra's: a missing install fails here, not skipped

    def build():
        torch.manual_seed(0)
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type=layer_type,
                                           hidden_act=act, num_labels=4)
        return _Logits(transformers.ResNetForImageClassification(config))
    report = check_converted_model(build, torch.randn(2, 3, 32, 32))
    assert report.bn_total >= 6 and not report.bn_left, report
    assert "model.resnet.embedder.embedder.convolution+normalization+activation" in report.swapped, report


@pytest.mark.parametrize("build", [lambda: timm.create_model("resnetv2_50", num_classes=4, pretrained=False),
                                   lambda: torchvision.models.resnet18(num_classes=4)], ids=["resnetv2_50", "resnet18"])
def test_unfuse_restores_every_attribute(build):
    model = build()
    before = [(type(m), sorted(m.__dict__)) for m in model.modules()]
    resnet_fused.fuse_(model, backend="tune")
    resnet_fused.unfuse_(model)
    assert [(type(m), sorted(m.__dict__)) for m in model.modules()] == before


_PICKLED = """
import pickle, sys, torch
model = pickle.loads(sys.stdin.buffer.read())
x = torch.load(sys.argv[1])
with torch.no_grad():
    torch.save(model.eval()(x), sys.argv[2])
"""


def test_pickles_load_in_a_fresh_process(tmp_path):
    """The twins are made on first use; a process that has not made them yet finds them by name."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),
        timm_acts.GELU(), ConvNormAct(8, 8, 1, act_layer=nn.SiLU), BatchNormAct2d(8, act_layer=nn.Hardswish),
        nn.BatchNorm2d(8), nn.LeakyReLU(0.1)))
    fused = resnet_fused.fuse_(model)
    assert len(fused.resnet_fused_report.swapped) == 5 and not fused.resnet_fused_report.bn_left
    x = torch.randn(2, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", _PICKLED, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   input=pickle.dumps(fused), check=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), fused.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("momentum,track,affine", [(0.1, True, True), (None, True, True), (0.1, False, True),
                                                   (0.1, True, False)])
def test_fused_bn_act_module_is_batchnorm2d_then_act(momentum, track, affine):
    fused = FusedBNAct(6, momentum=momentum, track_running_stats=track, affine=affine, act=nn.LeakyReLU(0.3))
    eager = nn.Sequential(nn.BatchNorm2d(6, momentum=momentum, track_running_stats=track, affine=affine), nn.LeakyReLU(0.3))
    eager[0].load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == list(eager[0].state_dict())
    trio = Trio(fused, eager)
    for step in range(3):  # the running statistics after several steps (momentum=None: the cumulative average)
        trio.step(torch.randn(4, 6, 5, 5), True, f"train step {step}")
    trio.step(torch.randn(4, 6, 5, 5), False, "eval")
    assert "act=leaky_relu(0.3)" in repr(fused)


def test_fused_bn_act_tuned(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setenv("RESNET_FUSED_TUNING_BUDGET", "0.02")
    fused = randomize_bn(FusedBNAct(8, act="silu", backend="tune")).eval()
    eager = nn.Sequential(nn.BatchNorm2d(8), nn.SiLU()).eval()
    eager[0].load_state_dict(fused.state_dict())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        check_inference(fused, eager, copy.deepcopy(eager).double(), x, "tuned FusedBNAct")
