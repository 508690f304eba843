"""resnet_fused: fused conv-BN-ReLU and BN-add-ReLU kernels for residual networks.

``resnet_fused.functional``: the fused functions (``add_relu``, ``bn_act``, ``conv_bn_act``);
``resnet_fused.nn``: drop-in modules (FusedConvBNReLU, FusedBasicBlock, FusedBottleneck, ...);
``resnet_fused.models``: ResNets built from them; ``fuse_(model)`` / ``unfuse_(model)``: convert
existing torchvision / timm models in place; ``resnet_fused.backends``: which implementation runs
(C++ CPU, C++/CUDA, Triton, PyTorch).
"""

from resnet_fused import backends  # loads the C++ ops; warns once if the extension is missing
from resnet_fused import functional, models, nn, reference
from resnet_fused.convert import FuseReport, fuse_, unfuse_

__version__ = "0.1.0"
__all__ = ["FuseReport", "backends", "functional", "fuse_", "models", "nn", "reference", "unfuse_"]
