"""fuse_ / unfuse_: swap fused modules into an existing torchvision, timm or transformers model, and back.

A module is converted in place by changing its class to a fused twin: every submodule, parameter,
buffer and state_dict key stays the very same object, and unfuse_ restores the class. A unit with
anything the fused one would not reproduce exactly is left alone and reported.

What is recognized (a module's class by its module path and name, so no library is imported):

- whole blocks: torchvision's and timm's ResNet BasicBlock / Bottleneck (FusedBasicBlock /
  FusedBottleneck; with torchvision FrozenBatchNorm2d, their FrozenBN variants);
- conv -> BN (-> activation) runs whose order of calls is known: nn.Sequential and its subclasses that
  keep its forward (torchvision Conv2dNormActivation, RegNet's BottleneckTransform, FCNHead, ...), the
  ResNet stems (timm's deep stems included), torchvision's IntermediateLayerGetter (segmentation /
  detection backbones), timm ConvNormAct / ConvBnAct (ByobNet, RegNet, CSPNet, SKNet, ...), the
  conv -> BN pairs inside blocks that are left whole (squeeze-excitation, anti-aliasing, drop-path...),
  inside timm's pre-activation blocks (resnetv2: conv_k -> norm_{k+1}), transformers' ResNetConvLayer /
  ResNetShortCut (nn/recognized.py);
- BN -> activation with no conv to fold into (a pre-activation norm after a residual sum, a final norm):
  every timm BatchNormAct2d no run took, and an nn.BatchNorm2d whose output goes only into an activation
  module (nn.Sequential, the stems, the chains above), fused as one bn_act (nn/bn_act.py);
- norms: nn.BatchNorm2d, timm BatchNormAct2d (drop Identity), torchvision FrozenBatchNorm2d;
  activations: those of resnet_fused.activations (ReLU, ReLU6, LeakyReLU, SiLU, GELU, Hardswish,
  Hardsigmoid, as torch.nn or timm modules). Another activation after the norm (PReLU, ELU, a Hardtanh
  other than (0, 6), or one inside a BatchNormAct2d) leaves the unit alone, named in the report.

A run is fused by giving its conv a class that computes conv + BN (+ activation) (nn/conv_bn_head.py)
and its BN (and activation module) pass-through classes (nn/pass_through.py); the report names every
BatchNorm layer left unfused and why.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from resnet_fused.nn.conv_bn_head import FusedConvBNActHead
from resnet_fused.nn.fuse_plan import FuseReport, Planner, is_identity
from resnet_fused.nn.norms import is_batchnorm_like, is_bn_act
from resnet_fused.nn.recognized import CHAINS, KNOWN_BLOCKS, KNOWN_STEMS, PREACT_BLOCKS

log = logging.getLogger("resnet_fused")

__all__ = ["FuseReport", "fuse_", "unfuse_"]

# the head's former name, which pickles of models fused before other activations name
_FusedConvBNReLUHead = FusedConvBNActHead


def _key(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__name__


def _runs_sequentially(m: nn.Module) -> bool:
    """An nn.Sequential whose forward is nn.Sequential's: its children run in order, each on the last output."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _flatten(name: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
    if _runs_sequentially(m):
        return [(f"{name}.{k}", v) for k, v in m._modules.items() if v is not None]
    return [(name, m)]


def fuse_(model: nn.Module, backend: str | None = "auto", *, sync_bn: bool = False, process_group=None,
          dry_run: bool = False):
    """Swap, in place, every torchvision / timm BasicBlock and Bottleneck, every conv -> BatchNorm
    (-> activation) run whose order of calls is known, and every BatchNorm -> activation with no conv
    before it (see the module's docstring) for fused modules holding the same parameters and buffers.

    Units with anything the fused ones would not reproduce exactly (attention / squeeze-excitation,
    drop-path, anti-aliasing, activations the kernels do not compute, other norms, hooks) are left alone.
    Returns the model; the report (`model.resnet_fused_report`, a FuseReport: every BatchNorm layer left
    unfused, with its path and the reason) is also logged at INFO on logger "resnet_fused".

    dry_run=True: changes nothing (not even an attribute) and returns the FuseReport of what fuse_
    would do.

    sync_bn=True: in training, batch statistics are taken over all ranks of `process_group` (default:
    the world), nn.SyncBatchNorm's semantics, by all-reducing the fused per-channel sums; for models
    wrapped in DistributedDataParallel afterwards.
    """
    backend = None if backend == "auto" else backend
    group = (process_group or torch.distributed.group.WORLD) if sync_bn else None
    plan = Planner(model, backend, group)
    plan.report.dry_run = dry_run
    named = list(model.named_modules())
    # whole blocks first: their convs (and a conv -> BN downsample) are theirs
    for name, m in named:
        spec = KNOWN_BLOCKS.get(_key(m))
        if spec is not None:
            plan.block(name, m, spec)
    for name, m in named:
        prefix = f"{name}." if name else ""
        key = _key(m)
        stem = KNOWN_STEMS.get(key)
        if stem is not None and all(isinstance(getattr(m, a, None), nn.Module) for a in stem):
            conv, bn, act = stem
            plan.sequence(prefix, [*_flatten(conv, getattr(m, conv)), (bn, getattr(m, bn)), (act, getattr(m, act))])
        if key == ("torchvision.models._utils", "IntermediateLayerGetter"):
            plan.sequence(prefix, list(m._modules.items()), keep=frozenset(getattr(m, "return_layers", {})))
        for conv, bn, between, act in CHAINS.get(key, ()):
            if not (isinstance(getattr(m, conv, None), nn.Module) and isinstance(getattr(m, bn, None), nn.Module)):
                continue
            between_ok = all(is_identity(getattr(m, b, None)) for b in between)
            plan.chain(prefix, conv, getattr(m, conv), bn, getattr(m, bn), act, getattr(m, act, None) if act else None,
                       between_ok)
            if act and between_ok:
                plan.followed.append((prefix, bn, getattr(m, bn), act, getattr(m, act, None)))
        if key in PREACT_BLOCKS:
            plan.why(getattr(m, "norm1", None), "pre-activation norm of the block's input, a plain BN without an "
                     "activation (fused standalone: a BatchNormAct2d, or a BN before an activation)", override=False)
        if _runs_sequentially(m):
            plan.sequence(prefix, list(m._modules.items()))
    # BNs no conv took: BN -> act where a BN's output goes only into an activation, and every BatchNormAct2d
    for prefix, bn_name, bn, act_name, act in plan.followed:
        plan.standalone(prefix, bn_name, bn, act_name, act)
    for name, m in named:
        if is_bn_act(m):
            plan.standalone("", name, m)
    # every BatchNorm layer: fused, or why not
    for name, m in named:
        if not is_batchnorm_like(m):
            continue
        if id(m) in plan.bn_done:
            plan.report.bn_fused.append(name)
            continue
        parent = name.rpartition(".")[0]
        owner = model.get_submodule(parent) if parent else model
        plan.report.bn_left[name] = plan.bn_reason.get(id(m)) or (
            f"no conv -> BN order fuse_ knows: its parent {type(owner).__name__} ({parent or '<model>'}) runs it in "
            "its own forward (known: nn.Sequential, ResNet stems and blocks, timm ConvNormAct, pre-activation blocks, "
            "transformers ResNetConvLayer)")
    if dry_run:
        log.info("%s", plan.report)
        return plan.report
    plan.apply()
    model.resnet_fused_report = plan.report
    log.info("%s", plan.report)
    return model


def unfuse_(model: nn.Module) -> nn.Module:
    """Undo fuse_: every swapped module gets its original class back, without the attributes fuse_ (and the
    tuner) added."""
    for m in model.modules():
        original = m.__dict__.pop("_resnet_fused_original_class", None)
        if original is None:
            continue
        for attr in (*m.__dict__.pop("_resnet_fused_attrs", ()), "_tuned_choices", "_tuned_ms"):
            m.__dict__.pop(attr, None)
        m.__class__ = original
    model.__dict__.pop("resnet_fused_report", None)
    return model
