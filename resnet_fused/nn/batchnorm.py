"""nn.BatchNorm2d's forward semantics, as arguments for the fused functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resnet_fused import backends


@dataclass
class BatchNormCall:
    """What nn.BatchNorm2d.forward would pass to F.batch_norm, in the same order of side effects."""

    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    use_batch_stats: bool
    momentum: float | torch.Tensor
    eps: float


def batch_norm_call(bn: nn.BatchNorm2d) -> BatchNormCall:
    """Counts the batch (num_batches_tracked += 1) exactly when bn's own forward would, and returns
    the arguments its F.batch_norm call would get: momentum (1 / num_batches_tracked for momentum=None),
    whether batch statistics normalize, and which running buffers (if any) are updated or used."""
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average; a 0-dim tensor keeps torch.compile graphs whole
            momentum = 1.0 / bn.num_batches_tracked
    use_batch_stats = uses_batch_stats(bn)
    tracked = not bn.training or bn.track_running_stats
    return BatchNormCall(
        bn.running_mean if tracked else None,
        bn.running_var if tracked else None,
        bn.weight,
        bn.bias,
        use_batch_stats,
        momentum,
        bn.eps,
    )


def uses_batch_stats(bn) -> bool:
    """Whether bn's forward normalizes with batch statistics (training, or no running statistics kept)."""
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def is_plain_batchnorm(module: nn.Module) -> bool:
    """A BatchNorm2d whose forward is nn.BatchNorm2d's own (SyncBatchNorm, frozen or custom norms are not)."""
    return type(module) is nn.BatchNorm2d


def computes_as(module: nn.Module) -> type:
    """The class whose computation `module` stands for: its own, or for a module fuse_ gave another class (a
    FusedConvBNActHead, a pass-through twin) the class fuse_ found."""
    return module.__dict__.get("_resnet_fused_original_class", type(module))


class FrozenBNView:
    """An eval-mode nn.BatchNorm2d as the fused functions read it, over a FrozenBatchNorm2d's buffers.
    F.batch_norm in eval computes (x - mean) / sqrt(var + eps) * weight + bias: the frozen affine."""

    training = False
    track_running_stats = True
    num_batches_tracked = None
    momentum = 0.0

    def __init__(self, module: nn.Module):
        self.module = module

    weight = property(lambda self: self.module.weight)
    bias = property(lambda self: self.module.bias)
    running_mean = property(lambda self: self.module.running_mean)
    running_var = property(lambda self: self.module.running_var)
    eps = property(lambda self: self.module.eps)
    # as a plan's stages read a norm (resnet_fused.nn.plan): the affine and the statistics, all buffers here
    _parameters = property(lambda self: {"weight": self.module.weight, "bias": self.module.bias})
    _buffers = property(lambda self: {"running_mean": self.module.running_mean, "running_var": self.module.running_var})


def lowers_to_inductor(backend: str | None, x: torch.Tensor, *norms: nn.Module) -> bool:
    """Whether a fused layer runs its eager composition for torch.compile to lower (backends.inductor_lowers),
    which it does only where that composition traces whole: not nn.BatchNorm2d's momentum=None in training
    (1 / num_batches_tracked read on the host), which the fused path computes on the device instead."""
    return backends.inductor_lowers(backend, x) and all(
        not (bn.training and getattr(bn, "momentum", 0.0) is None) for bn in norms)
