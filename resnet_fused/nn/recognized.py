"""The torchvision, timm and Hugging Face transformers classes fuse_ recognizes, by (module path, class
name), so that none of these libraries is imported: whole blocks, conv -> BN chains inside modules, stems,
where activation modules live."""

from resnet_fused.nn.blocks import FusedBasicBlock, FusedBottleneck
from resnet_fused.nn.norms import FusedFrozenBNBasicBlock, FusedFrozenBNBottleneck

# (module path, class name) of the blocks we know -> the fused class, its FrozenBN twin, its number of conv-bn stages
KNOWN_BLOCKS = {
    ("torchvision.models.resnet", "BasicBlock"): (FusedBasicBlock, FusedFrozenBNBasicBlock, 2),
    ("torchvision.models.resnet", "Bottleneck"): (FusedBottleneck, FusedFrozenBNBottleneck, 3),
    ("timm.models.resnet", "BasicBlock"): (FusedBasicBlock, FusedFrozenBNBasicBlock, 2),
    ("timm.models.resnet", "Bottleneck"): (FusedBottleneck, FusedFrozenBNBottleneck, 3),
}

# modules whose forward runs these (conv, norm, modules between, act) in this order, the conv's output
# going straight into the norm, and the norm's (through `between`, when all Identity) into act; act None:
# the norm's output goes elsewhere (a ReLU shared with other calls, an add, attention)
CHAINS = {
    ("torchvision.models.resnet", "BasicBlock"): [("conv1", "bn1", (), None), ("conv2", "bn2", (), None)],
    ("torchvision.models.resnet", "Bottleneck"): [("conv1", "bn1", (), None), ("conv2", "bn2", (), None),
                                                  ("conv3", "bn3", (), None)],
    ("timm.models.resnet", "BasicBlock"): [("conv1", "bn1", ("drop_block",), "act1"), ("conv2", "bn2", (), None)],
    ("timm.models.resnet", "Bottleneck"): [("conv1", "bn1", (), "act1"), ("conv2", "bn2", ("drop_block",), "act2"),
                                           ("conv3", "bn3", (), None)],
    ("timm.models.resnetv2", "PreActBasic"): [("conv1", "norm2", (), None)],
    ("timm.models.resnetv2", "PreActBottleneck"): [("conv1", "norm2", (), None), ("conv2", "norm3", (), None)],
    ("timm.models.resnetv2", "DownsampleConv"): [("conv", "norm", (), None)],
    ("timm.layers.conv_bn_act", "ConvNormAct"): [("conv", "bn", (), None)],
    ("timm.layers.selective_kernel", "SelectiveKernelAttn"): [("fc_reduce", "bn", (), "act")],
    # transformers ResNets (ResNetModel, ResNetForImageClassification, ResNetBackbone): every BN is in one of these
    ("transformers.models.resnet.modeling_resnet", "ResNetConvLayer"): [("convolution", "normalization", (), "activation")],
    ("transformers.models.resnet.modeling_resnet", "ResNetShortCut"): [("convolution", "normalization", (), None)],
}

# stems: children run conv -> bn -> act in this order (a conv that is an nn.Sequential is flattened)
KNOWN_STEMS = {
    ("torchvision.models.resnet", "ResNet"): ("conv1", "bn1", "relu"),
    ("timm.models.resnet", "ResNet"): ("conv1", "bn1", "act1"),
}

PREACT_BLOCKS = {("timm.models.resnetv2", "PreActBasic"), ("timm.models.resnetv2", "PreActBottleneck")}

# where activation modules live: one of these after a norm that the fused kernels do not compute
# (resnet_fused.activations.module_activation is None: PReLU, ELU, Hardtanh other than (0, 6), ...) leaves
# the unit alone; another module there (pooling, dropout, a model's own) runs as it is after the fused unit
ACTIVATION_MODULES = ("torch.nn.modules.activation", "timm.layers.activations", "timm.layers.activations_me",
                      "timm.layers.create_act", "transformers.activations")
