"""ResNets built from the fused blocks: the ImageNet family (torchvision-compatible) and the CIFAR
family of the paper; plain=True gives each one's plain twin (no shortcuts)."""

from resnet_fused.models.cifar import CifarResNet, cifar_resnet
from resnet_fused.models.resnet import ResNet, resnet18, resnet34, resnet50, resnet101, resnet152

__all__ = ["CifarResNet", "ResNet", "cifar_resnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
