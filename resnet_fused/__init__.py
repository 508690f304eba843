"""resnet_fused: fused conv-BN-ReLU and BN-add-ReLU kernels for residual networks.

``resnet_fused.functional``: the fused functions (``add_relu``, ``bn_act``, ``conv_bn_act``), whose
ops live in ``resnet_fused.ops``;
``resnet_fused.nn``: drop-in modules (FusedConvBNReLU, FusedBasicBlock, FusedBottleneck, ...);
``resnet_fused.models``: ResNets built from them; ``fuse_(model)`` / ``unfuse_(model)``: convert
existing torchvision / timm models in place; ``resnet_fused.backends``: which implementation runs
(C++ CPU, C++/CUDA, Triton, PyTorch), ``"tune"`` included; ``tuning_report()``: what the tuner chose.
"""

from resnet_fused import backends  # loads the C++ ops; warns once if the extension is missing
from resnet_fused import functional, models, nn, ops, reference
from resnet_fused.convert import FuseReport, fuse_, unfuse_
from resnet_fused.tuning import report as tuning_report

__version__ = "0.1.0"
__all__ = ["FuseReport", "backends", "functional", "fuse_", "models", "nn", "ops", "reference", "tuning_report", "unfuse_"]
