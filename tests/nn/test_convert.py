"""fuse_ / unfuse_ on torchvision and timm models: same function (eval and training: outputs,
gradients, running statistics), same parameters and keys, a truthful report, and a clean undo."""

import logging

import pytest
import timm
import torch
import torchvision
from torch import nn

import resnet_fused
from resnet_fused.nn import FusedBasicBlock, FusedBottleneck
from helpers import check_converted_model


@pytest.mark.parametrize("name,blocks", [("resnet18", 8), ("resnet50", 16)])
def test_torchvision_resnets(name, blocks):
    x = torch.randn(8, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    report = check_converted_model(lambda: getattr(torchvision.models, name)(num_classes=16), x)
    assert sum(1 for s in report.swapped if "layer" in s and "+" not in s) == blocks
    assert any(s.startswith("conv1+bn1") for s in report.swapped), "the stem conv-bn-relu is fused too"


@pytest.mark.parametrize("name", ["resnet18", "resnet26d", "resnet50d", "resnet10t"])
def test_timm_resnets(name):
    check_converted_model(lambda: timm.create_model(name, num_classes=16, pretrained=False), torch.randn(8, 3, 64, 64))


def test_timm_blocks_with_extras_are_left_alone():
    report = check_converted_model(lambda: timm.create_model("seresnet18", num_classes=8, pretrained=False),
                                    torch.randn(2, 3, 64, 64), expect_skipped=("se is",))
    # the blocks stay whole (se runs between bn2 and the add), their conv -> BN (-> ReLU) pairs are fused
    assert not [s for s in report.swapped if s.startswith("layer") and "+" not in s], report
    assert "layer1.0.conv1+bn1+act1" in report.swapped and "layer1.0.conv2+bn2" in report.swapped, report
    assert not report.bn_left, report


def test_hooks_keep_a_block_unfused(caplog):
    model = torchvision.models.resnet18(num_classes=4)
    model.layer1[0].register_forward_hook(lambda *a: None)
    with caplog.at_level(logging.INFO, logger="resnet_fused"):
        resnet_fused.fuse_(model)
    assert type(model.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert isinstance(model.layer1[1], FusedBasicBlock)
    assert "layer1.0" in model.resnet_fused_report.skipped and "layer1.0" in caplog.text


def test_sequential_conv_bn_relu_chains():
    # conv biases right before a BN in training get a zero gradient (rounding noise to compare): none here
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect", bias=False), nn.BatchNorm2d(4), nn.ReLU())
    report = check_converted_model(lambda: model, torch.randn(2, 3, 9, 9), expect_swapped=3)
    # the reflect-padded conv stays; its BN -> ReLU runs as one standalone bn_act
    assert report.swapped == ["0+1+2", "3+4", "6+7"] and not report.bn_left, report


def test_converted_blocks_are_the_fused_classes():
    model = resnet_fused.fuse_(torchvision.models.resnet50())
    assert isinstance(model.layer1[0], FusedBottleneck) and model.layer1[0].backend is None
    resnet_fused.fuse_(m := torchvision.models.resnet18(), backend="torch")
    assert m.layer2[0].backend == "torch"
