"""fuse_ on the module families beyond ResNet blocks: torchvision Conv2dNormActivation (RegNet,
MobileNet), timm ConvNormAct / BatchNormAct2d, torchvision FrozenBatchNorm2d (detection backbones),
timm pre-activation blocks (resnetv2); activations the kernels do not compute left alone and reported;
every unfused BN explained; dry_run; pickling; the coverage suite. Small models: fast on 2 cores.
(Every activation, standalone BN -> act and transformers ResNets: test_fuse_activations.py.)"""

import copy
import pickle

import pytest
import timm
import torch
import torchvision
from timm.layers import BatchNormAct2d, ConvNormAct, create_conv2d
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import Conv2dNormActivation, FrozenBatchNorm2d

import resnet_fused
from resnet_fused.bench import coverage
from helpers import assert_within_eager_error, check_converted_model


def _frozen_randomized(model):
    return coverage.randomize_norms(model, gain=(0.3, 0.8))


def test_conv2d_norm_activation_fused_unknown_activations_reported():
    def build():
        return nn.Sequential(Conv2dNormActivation(3, 8, 3, stride=2), Conv2dNormActivation(8, 8, 1, activation_layer=None),
                             Conv2dNormActivation(8, 8, 3, activation_layer=nn.Hardswish),
                             Conv2dNormActivation(8, 8, 3, groups=8, activation_layer=nn.ReLU6),
                             Conv2dNormActivation(8, 8, 1, activation_layer=nn.ELU))
    report = check_converted_model(build, torch.randn(2, 3, 12, 12), expect_swapped=4)
    assert report.swapped == ["0.0+1+2", "1.0+1", "2.0+1+2", "3.0+1+2"], report
    assert list(report.bn_left) == ["4.1"] and "ELU(alpha=1.0" in report.bn_left["4.1"], report
    assert "ELU" in str(report) and "4 of 5" in str(report)


def test_timm_conv_norm_act_with_batchnorm_act():
    def build():
        return nn.Sequential(ConvNormAct(3, 8, 3, stride=2), ConvNormAct(8, 8, 3, apply_act=False),
                             ConvNormAct(8, 8, 1, act_layer=nn.SiLU), ConvNormAct(8, 4, 3, act_layer=nn.ReLU))
    model = build()
    assert isinstance(model[0].bn, BatchNormAct2d)
    report = check_converted_model(build, torch.randn(2, 3, 12, 12), expect_swapped=4)
    assert report.swapped == ["0.conv+bn", "1.conv+bn", "2.conv+bn", "3.conv+bn"] and not report.bn_left, report


def test_timm_batchnorm_act_momentum_none_and_pickling():
    torch.manual_seed(0)
    model = nn.Sequential(ConvNormAct(3, 8, 3, norm_kwargs=dict(momentum=None)), ConvNormAct(8, 8, 1, apply_act=False))
    check_converted_model(lambda: model, torch.randn(2, 3, 10, 10), expect_swapped=2)
    fused = resnet_fused.fuse_(copy.deepcopy(model))
    again = pickle.loads(pickle.dumps(fused))  # the lazily made pass-through class pickles by name
    again.eval(), fused.eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x))


def _frozen_net(block):
    def build():
        torch.manual_seed(0)
        return _frozen_randomized(nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), FrozenBatchNorm2d(16), nn.ReLU(inplace=True),
            block(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(block.out, 4)))
    return build


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_frozen_batchnorm_blocks_and_chains(kind):
    if kind == "basic":
        def block(c):
            return BasicBlock(c, 32, 2, nn.Sequential(nn.Conv2d(c, 32, 1, 2, bias=False), FrozenBatchNorm2d(32)),
                              norm_layer=FrozenBatchNorm2d)
        block.out, fused_cls = 32, resnet_fused.nn.norms.FusedFrozenBNBasicBlock
    else:
        def block(c):
            return Bottleneck(c, 8, 2, nn.Sequential(nn.Conv2d(c, 32, 1, 2, bias=False), FrozenBatchNorm2d(32)),
                              norm_layer=FrozenBatchNorm2d)
        block.out, fused_cls = 32, resnet_fused.nn.norms.FusedFrozenBNBottleneck
    build = _frozen_net(block)
    report = check_converted_model(build, torch.randn(2, 3, 16, 16))
    assert not report.bn_left and report.bn_total == (4 if kind == "basic" else 5), report
    assert "0+1+2" in report.swapped and "3" in report.swapped and "3.downsample.0+1" in report.swapped, report
    model = resnet_fused.fuse_(build())
    assert type(model[3]) is fused_cls
    # frozen: the buffers never move in training, and a load_state_dict is seen at once (no stale fold)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        reference = build()
        sd = {k: (v * 1.5 if k.endswith("running_var") else v) for k, v in reference.state_dict().items()}
        model.load_state_dict(sd)
        reference.load_state_dict(sd)
        reference.eval()
        assert_within_eager_error(model(x), reference(x), copy.deepcopy(reference).double()(x.double()), "after load_state_dict")
        assert not torch.allclose(model(x), before)


def test_preactivation_blocks_fuse_conv_into_next_norm():
    def build():
        return timm.models.resnetv2.ResNetV2(layers=[1, 1], channels=(32, 64), num_classes=4, stem_chs=16,
                                             conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
    report = check_converted_model(build, torch.randn(2, 3, 32, 32))
    assert "stages.0.blocks.0.conv1+norm2" in report.swapped and "stages.0.blocks.0.conv2+norm3" in report.swapped
    # the pre-activation norms (BatchNormAct2d: BN + ReLU) and the final norm: standalone bn_act
    assert {"stages.0.blocks.0.norm1", "stages.1.blocks.0.norm1", "norm"} <= set(report.swapped), report
    assert not report.bn_left, report


def test_torchvision_regnet_fully_fused():
    report = check_converted_model(lambda: torchvision.models.regnet_y_400mf(num_classes=4), torch.randn(2, 3, 64, 64))
    assert report.bn_total > 40 and not report.bn_left, report


def test_timm_deep_stem_and_avg_down_downsample():
    report = check_converted_model(lambda: timm.create_model("resnet10t", num_classes=4, pretrained=False),
                                    torch.randn(2, 3, 32, 32))
    assert "conv1.6+bn1+act1" in report.swapped, "the deep stem's last conv folds the model's bn1"
    assert not report.bn_left, report


def test_dry_run_changes_nothing_and_every_left_bn_has_a_reason():
    model = timm.create_model("resnet10t", num_classes=4, pretrained=False, act_layer=nn.ELU)
    before = [(type(m), dict(m.__dict__).keys()) for m in model.modules()]
    report = resnet_fused.fuse_(model, dry_run=True)
    assert isinstance(report, resnet_fused.convert.FuseReport) and report.dry_run
    assert [(type(m), dict(m.__dict__).keys()) for m in model.modules()] == before
    assert not hasattr(model, "resnet_fused_report")
    assert report.bn_total == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert report.bn_left and all(why for why in report.bn_left.values())
    assert any("ELU(alpha=1.0" in why for why in report.bn_left.values()), report


def test_report_of_a_model_without_batchnorm():
    report = resnet_fused.fuse_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), dry_run=True)
    assert "no BatchNorm layer" in str(report)


def test_unknown_parent_is_explained():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x) * 2)

    report = resnet_fused.fuse_(Custom(), dry_run=True)
    assert "Custom" in report.bn_left["bn"], report


def test_tuned_head_runs_and_matches(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_FUSED_TUNING_CACHE", str(tmp_path / "tuning.json"))
    monkeypatch.setenv("RESNET_FUSED_TUNING_BUDGET", "0.02")
    model = nn.Sequential(Conv2dNormActivation(3, 8, 3), ConvNormAct(8, 8, 3, apply_act=False)).eval()
    fused = resnet_fused.fuse_(copy.deepcopy(model), backend="tune")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_within_eager_error(fused(x), model(x), copy.deepcopy(model).double()(x.double()), "tuned head")


def test_coverage_suite_measures_one_model():
    row = coverage.measure("torchvision", "regnet_y_400mf", False, batch=2, resolution=64)
    assert row["fused_pct"] == 100 and row["unfuse_restores"]
    assert row["eval_ratio"] <= 2 and row["train_ratio"] <= 2, row
