"""fuse_ / unfuse_: swap fused blocks into an existing torchvision or timm model, and back.

A block is converted in place by changing its class to the fused twin: every submodule, parameter,
buffer and state_dict key stays the very same object, and unfuse_ restores the class. A block with
anything the fused block would not reproduce exactly is left alone and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from resnet_fused.nn.batchnorm import is_plain_batchnorm
from resnet_fused.nn.blocks import FusedBasicBlock, FusedBottleneck
from resnet_fused.nn.conv_bn import fused_conv_bn_act, is_fusable_conv
from resnet_fused.nn.fold import FoldCache

log = logging.getLogger("resnet_fused")

# (module path, class name) of the blocks we know -> the fused class and its number of conv-bn stages
_KNOWN_BLOCKS = {
    ("torchvision.models.resnet", "BasicBlock"): (FusedBasicBlock, 2),
    ("torchvision.models.resnet", "Bottleneck"): (FusedBottleneck, 3),
    ("timm.models.resnet", "BasicBlock"): (FusedBasicBlock, 2),
    ("timm.models.resnet", "Bottleneck"): (FusedBottleneck, 3),
}


@dataclass
class FuseReport:
    """What fuse_ swapped (module names) and what it left alone, with the reason."""

    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"resnet_fused.fuse_: {len(self.swapped)} modules fused, {len(self.skipped)} left as they were"]
        lines += [f"  left {name or '<model>'}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None))


def _is_identity(m) -> bool:
    return m is None or type(m) is nn.Identity


def _block_problem(block: nn.Module, stages: int) -> str | None:
    """Why the fused twin would not compute exactly what `block` does (None: it would)."""
    if _has_hooks(block):
        return "it has hooks of its own"
    for i in range(1, stages + 1):
        conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if not is_fusable_conv(conv):
            return f"conv{i} is {type(conv).__name__} (fused: nn.Conv2d with zero padding)"
        if not is_plain_batchnorm(bn):
            return f"bn{i} is {type(bn).__name__} (fused: nn.BatchNorm2d)"
        if _has_hooks(conv) or _has_hooks(bn):
            return f"conv{i} or bn{i} has hooks"
    # timm's extras: the fused block reproduces them only when they do nothing
    for name in ("drop_block", "aa", "se", "drop_path"):
        if not _is_identity(getattr(block, name, None)):
            return f"{name} is {type(getattr(block, name)).__name__}"
    for name in ("act1", "act2", "act3"):
        act = getattr(block, name, None)
        if act is not None and type(act) is not nn.ReLU:
            return f"{name} is {type(act).__name__} (fused: ReLU)"
    return None


def _fuse_block(block: nn.Module, fused_cls, backend: str | None, group) -> None:
    block._resnet_fused_original_class = type(block)
    block.__class__ = fused_cls
    block._init_fused(backend, shortcut=True)
    block.process_group = group


class _FusedConvBNReLUHead(nn.Conv2d):
    """The conv of a Conv2d -> BatchNorm2d (-> ReLU) run inside nn.Sequential, computing all three; the
    BN and ReLU that follow become pass-through (their parameters and buffers stay where they are)."""

    def forward(self, x):
        return fused_conv_bn_act(self, self._resnet_fused_bn, x, relu=self._resnet_fused_relu,
                                 backend=self._resnet_fused_backend, cache=self._resnet_fused_folds, name="conv",
                                 process_group=self._resnet_fused_group)


class _PassThroughBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return x


class _PassThroughReLU(nn.ReLU):
    def forward(self, x):
        return x


def _swap_class(m: nn.Module, cls) -> None:
    m._resnet_fused_original_class = type(m)
    m.__class__ = cls


# models whose stem runs conv -> bn -> relu children in this order, and uses that relu nowhere else
_KNOWN_STEMS = {
    ("torchvision.models.resnet", "ResNet"): ("conv1", "bn1", "relu"),
    ("timm.models.resnet", "ResNet"): ("conv1", "bn1", "act1"),
}


def _fuse_chain(mods: list[tuple[str, nn.Module]], prefix: str, backend: str | None, group, report: FuseReport) -> None:
    """Fuse every Conv2d -> BatchNorm2d (-> ReLU) run of consecutive modules in `mods`, which run in
    this order, each on the previous one's output (an nn.Sequential, or a known stem)."""
    i = 0
    while i + 1 < len(mods):
        (conv_name, conv), (bn_name, bn) = mods[i], mods[i + 1]
        if not (is_fusable_conv(conv) and is_plain_batchnorm(bn)):
            i += 1
            continue
        if _has_hooks(conv) or _has_hooks(bn):
            report.skipped[f"{prefix}{conv_name}"] = "conv -> bn chain with hooks"
            i += 2
            continue
        relu = i + 2 < len(mods) and type(mods[i + 2][1]) is nn.ReLU and not _has_hooks(mods[i + 2][1])
        object.__setattr__(conv, "_resnet_fused_bn", bn)  # a reference, not a submodule: keys stay put
        conv._resnet_fused_relu, conv._resnet_fused_backend, conv._resnet_fused_folds = relu, backend, FoldCache()
        conv._resnet_fused_group = group
        _swap_class(conv, _FusedConvBNReLUHead)
        _swap_class(bn, _PassThroughBatchNorm2d)
        if relu:
            _swap_class(mods[i + 2][1], _PassThroughReLU)
        report.swapped.append(f"{prefix}{conv_name}" + (f"+{bn_name}+{mods[i + 2][0]}" if relu else f"+{bn_name}"))
        i += 3 if relu else 2


def fuse_(model: nn.Module, backend: str | None = "auto", *, sync_bn: bool = False, process_group=None) -> nn.Module:
    """Swap, in place, every torchvision / timm BasicBlock and Bottleneck and every Conv2d -> BatchNorm2d
    (-> ReLU) chain inside nn.Sequential for fused modules holding the same parameters and buffers.

    Blocks with anything the fused ones would not reproduce exactly (attention / squeeze-excitation,
    drop-path, anti-aliasing, other activations or norms, hooks) are left alone. Returns the model; the
    report (`model.resnet_fused_report`, a FuseReport) is also logged at INFO on logger "resnet_fused".

    sync_bn=True: in training, batch statistics are taken over all ranks of `process_group` (default:
    the world), nn.SyncBatchNorm's semantics, by all-reducing the fused per-channel sums; for models
    wrapped in DistributedDataParallel afterwards.
    """
    backend = None if backend == "auto" else backend
    group = (process_group or torch.distributed.group.WORLD) if sync_bn else None
    report = FuseReport()
    # blocks first: their convs (downsample included) are theirs, not the Sequential rule's
    claimed: set[int] = set()
    for name, m in model.named_modules():
        key = (type(m).__module__, type(m).__name__)
        if key not in _KNOWN_BLOCKS:
            continue
        claimed.update(id(c) for c in m.modules())  # fused or left alone, its insides are settled
        fused_cls, stages = _KNOWN_BLOCKS[key]
        problem = _block_problem(m, stages)
        if problem:
            report.skipped[name] = f"{type(m).__name__}: {problem}"
            continue
        _fuse_block(m, fused_cls, backend, group)
        report.swapped.append(name)
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        stem = _KNOWN_STEMS.get((type(m).__module__, type(m).__name__))
        if stem is not None and all(isinstance(getattr(m, a, None), nn.Module) for a in stem):
            _fuse_chain([(a, getattr(m, a)) for a in stem], prefix, backend, group, report)
        if type(m) is nn.Sequential and id(m) not in claimed:
            _fuse_chain(list(m._modules.items()), prefix, backend, group, report)
    model.resnet_fused_report = report
    log.info("%s", report)
    return model


def unfuse_(model: nn.Module) -> nn.Module:
    """Undo fuse_: every swapped module gets its original class back."""
    for m in model.modules():
        original = m.__dict__.pop("_resnet_fused_original_class", None)
        if original is None:
            continue
        for attr in ("_folds", "backend", "shortcut", "process_group", "_resnet_fused_relu", "_resnet_fused_backend",
                     "_resnet_fused_folds", "_resnet_fused_group"):
            m.__dict__.pop(attr, None)
        m.__dict__.pop("_resnet_fused_bn", None)
        m.__class__ = original
    model.__dict__.pop("resnet_fused_report", None)
    return model
