"""resnet_fused: fused conv-BN-ReLU and BN-add-ReLU kernels for residual networks.

``resnet_fused.functional`` holds the fused functions (``add_relu``, ``bn_act``);
``resnet_fused.backends`` chooses which implementation runs them (C++ CPU, C++/CUDA, Triton, PyTorch).
"""

from resnet_fused import backends  # loads the C++ ops; warns once if the extension is missing
from resnet_fused import functional, reference

__version__ = "0.1.0"
__all__ = ["backends", "functional", "reference"]
