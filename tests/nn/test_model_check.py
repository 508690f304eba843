"""The model-level check (helpers.check_fused_model) is sound: it passes a correctly fused model on any
machine and seed (the suite runs it under CPU capability caps and seeds, .ci/run), and it fails a model
with a small defect planted in one unit, each of which a whole-network comparison in the chaotic regime
of a deep net in training (eager's own gradient error ~10 % of the norm) could not see."""

import copy

import pytest
import torch
import torchvision

import resnet_fused
from decisions import clear_input, nearest_call, record
from helpers import check_fused_model, randomize_bn


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.001


def _eps(block):
    block.bn2.eps *= 2  # 1e-5 -> 2e-5 in the fused model only: the original keeps its own BN


def _grad(block):
    block.register_forward_hook(lambda m, args, out: _ScaleGrad.apply(out))  # d out / d x off by 0.1 %


def _running_var(block):
    """bn1's running variance updated with the biased batch variance (nn.BatchNorm2d: the unbiased one):
    off by a factor (n - 1) / n in the update term, n = N*H*W (a stride-1 block: its input's)."""
    bn, before = block.bn1, {}

    def save(m, args):
        before["var"] = bn.running_var.clone()

    def bias(m, args, out):
        if m.training:
            x, mom = args[0], bn.momentum
            n = x.numel() // x.shape[1]
            unbiased = (bn.running_var - (1 - mom) * before["var"]) / mom
            with torch.no_grad():
                bn.running_var.copy_((1 - mom) * before["var"] + mom * unbiased * (n - 1) / n)

    block.register_forward_pre_hook(save)
    block.register_forward_hook(bias)


DEFECTS = {"bn eps x2": _eps, "grad x1.001": _grad, "running_var": _running_var}


def _models(seed=0):
    torch.manual_seed(seed)
    original = randomize_bn(torchvision.models.resnet18(num_classes=8), gain=(0.2, 0.6))
    fused = resnet_fused.fuse_(copy.deepcopy(original))
    return original, fused, torch.randn(4, 3, 64, 64)


def test_a_correct_model_passes():
    check_fused_model(*_models())


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_a_small_defect_in_one_unit_fails(defect):
    original, fused, x = _models()
    DEFECTS[defect](fused.layer3[1])
    with pytest.raises(AssertionError, match="layer3.1"):
        check_fused_model(original, fused, x)


@pytest.mark.parametrize("net,x", [
    (torch.nn.ReLU(), torch.tensor([[[[0.0, 1.0], [-1.0, 2.0]]]])),  # a ReLU input exactly at its threshold
    (torch.nn.MaxPool2d(2), torch.tensor([[[[1.0, 1.0], [0.0, -1.0]]]])),  # a max-pool window with a tie
], ids=["relu", "maxpool"])
def test_clear_input_moves_decisions_off_their_thresholds(net, x):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1, bias=False), net)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    exact = copy.deepcopy(net).double()
    assert nearest_call(record(net, x, True), record(exact, x.double(), True))[0] < 1.0
    cleared = clear_input(net, exact, x, True, "tiny")
    assert nearest_call(record(net, cleared, True), record(exact, cleared.double(), True))[0] > 1.0
    assert (cleared - x).abs().max() < 0.05 * x.std()
