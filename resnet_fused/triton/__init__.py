"""Triton kernels for the resnet_fused ops (same math as ``resnet_fused.reference``)."""
