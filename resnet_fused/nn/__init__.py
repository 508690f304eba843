"""Drop-in fused modules: FusedConvBNAct, FusedConvBNReLU, FusedBNAct, FusedBasicBlock, FusedBottleneck, the
shortcut options of the ResNet paper, and the InstanceNorm residual block."""

from resnet_fused.nn.blocks import FusedBasicBlock, FusedBottleneck
from resnet_fused.nn.bn_act import FusedBNAct
from resnet_fused.nn.conv_bn import FusedConvBNAct, FusedConvBNReLU
from resnet_fused.nn.instance_norm import FusedInstanceNormResBlock
from resnet_fused.nn.norms import FusedFrozenBNBasicBlock, FusedFrozenBNBottleneck
from resnet_fused.nn.shortcut import ShortcutA, make_shortcut

__all__ = ["FusedBNAct", "FusedBasicBlock", "FusedBottleneck", "FusedFrozenBNBasicBlock", "FusedFrozenBNBottleneck", "FusedConvBNAct",
           "FusedConvBNReLU", "FusedInstanceNormResBlock", "ShortcutA", "make_shortcut"]
