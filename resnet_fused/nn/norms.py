"""The BatchNorm variants the fused conv -> BN (-> activation) computes exactly, besides nn.BatchNorm2d.

- timm's ``BatchNormAct2d`` (BatchNorm + drop + activation in one module): its forward is a copy of
  nn.BatchNorm2d's (same momentum / num_batches_tracked / running-statistics rules), then ``drop`` and
  ``act``; fused when ``drop`` is Identity and ``act`` is an activation the kernels compute
  (resnet_fused.activations.module_activation: ReLU, SiLU, LeakyReLU, GELU, Hardswish, ..., Identity).
- torchvision's ``FrozenBatchNorm2d`` (a fixed affine from buffers, in training and eval alike):
  always foldable; the fused path sees it through ``FrozenBNView``, an eval-mode BatchNorm2d view of the
  live buffers (nothing is copied: `.to()`, `load_state_dict` and in-place edits are seen at once).

Classes are recognized by module and name, so neither timm nor torchvision is imported here.
"""

from __future__ import annotations

import torch
from torch import nn

from resnet_fused.activations import ACTIVATIONS, Activation, module_activation
from resnet_fused.nn.batchnorm import FrozenBNView, computes_as
from resnet_fused.nn.blocks import FusedBasicBlock, FusedBottleneck
from resnet_fused.nn.conv_bn import fused_conv_bn_forward

FROZEN_BN = {("torchvision.ops.misc", "FrozenBatchNorm2d")}
BN_ACT = {("timm.layers.norm_act", "BatchNormAct2d")}
KNOWN = f"known: {', '.join(ACTIVATIONS)}, as torch.nn or timm modules"


def _key(cls) -> tuple[str, str]:
    return cls.__module__, cls.__name__


def is_frozen_bn(m) -> bool:
    return m is not None and _key(computes_as(m)) in FROZEN_BN


def is_bn_act(m) -> bool:
    return m is not None and _key(computes_as(m)) in BN_ACT


def is_batchnorm_like(m) -> bool:
    """Every module the report counts as a BatchNorm layer."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or is_frozen_bn(m)


def norm_problem(bn: nn.Module) -> str | None:
    """Why the fused conv -> BN would not compute exactly what `bn` does (None: it would)."""
    cls = computes_as(bn)
    if cls is nn.BatchNorm2d or _key(cls) in FROZEN_BN:
        return None
    if _key(cls) in BN_ACT:
        if type(bn.drop) is not nn.Identity:
            return f"BatchNormAct2d with drop={type(bn.drop).__name__} (fused: Identity)"
        if module_activation(bn.act) is None:
            return f"BatchNormAct2d with activation {describe(bn.act)}, which the fused kernels do not compute ({KNOWN})"
        return None
    if isinstance(bn, nn.SyncBatchNorm):
        return "SyncBatchNorm (fuse the nn.BatchNorm2d model with sync_bn=True instead)"
    return f"{cls.__name__} is not a norm the fused kernels reproduce (nn.BatchNorm2d, timm BatchNormAct2d, FrozenBatchNorm2d)"


def internal_activation(bn: nn.Module) -> Activation | None:
    """A BatchNormAct2d's own activation (Identity: none; norm_problem says when it is not one the kernels
    compute); None for a norm without one."""
    return module_activation(bn.act) if is_bn_act(bn) else None


def describe(act: nn.Module) -> str:
    """An activation module as a report names it: its class and settings (``Hardtanh(min_val=-1.0, max_val=1.0)``)."""
    return f"{type(act).__name__}({act.extra_repr()})"


def norm_view(bn):
    """What fused_conv_bn_forward reads for `bn`: the module itself, or a FrozenBNView of it."""
    return FrozenBNView(bn) if is_frozen_bn(bn) else bn


class _FrozenBNBlock:
    """Mixin for the fused blocks whose BNs include torchvision FrozenBatchNorm2d (detection backbones):
    every conv -> BN runs fused, frozen ones as an eval-mode BN (folded in eval, frozen affine in training).
    The downsample, when its BN is frozen, runs as its own module (fuse_ fuses it as a conv -> BN run)."""

    def _stage_pair(self, i: int):
        return getattr(self, f"conv{i}"), norm_view(getattr(self, f"bn{i}"))

    def _conv_bn(self, i: int, x: torch.Tensor, backend: str | None, residual: torch.Tensor | None = None,
                 relu: bool = True, input_bn=None) -> torch.Tensor:
        if input_bn is not None:  # only deferred when every BN is a plain nn.BatchNorm2d (_defers)
            x = input_bn.materialize(x, backend=backend)
        return fused_conv_bn_forward(getattr(self, f"conv{i}"), norm_view(getattr(self, f"bn{i}")), x, residual, relu,
                                     backend=backend, cache=self._folds, name=f"conv{i}", process_group=self.process_group)


class FusedFrozenBNBasicBlock(_FrozenBNBlock, FusedBasicBlock):
    """FusedBasicBlock whose BNs may be FrozenBatchNorm2d (torchvision detection / segmentation backbones)."""


class FusedFrozenBNBottleneck(_FrozenBNBlock, FusedBottleneck):
    """FusedBottleneck whose BNs may be FrozenBatchNorm2d (torchvision detection / segmentation backbones)."""
