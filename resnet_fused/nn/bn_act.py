"""BatchNorm2d -> activation as one fused call, for a BN with no conv before it to fold into: the
pre-activation norm of a residual block (timm resnetv2, preact ResNets: it follows the previous block's
residual sum), a final norm, a BN after a conv the fused path cannot compute.

FusedBNAct is the drop-in module (an nn.BatchNorm2d: same arguments, parameters, buffers and state_dict
keys, plus ``act``). fuse_ gives a standalone nn.BatchNorm2d the class FusedBNAct in place, and a timm
BatchNormAct2d (its own act inside) the twin ``fused_batchnorm_act_class()``. Training and eval follow
nn.BatchNorm2d exactly: batch or running statistics, the running-statistics update with momentum (None:
the cumulative average), num_batches_tracked, track_running_stats=False, affine=False.
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch
from torch import nn

from resnet_fused import backends, tuning
from resnet_fused.activations import Activation, activation
from resnet_fused.nn import plan
from resnet_fused.nn.batchnorm import batch_norm_call, lowers_to_inductor
from resnet_fused.ops.bn_act import bn_act


def bn_act_forward(bn: nn.BatchNorm2d, x: torch.Tensor, act, *, backend: str | None = None,
                   process_group=None) -> torch.Tensor:
    """act(bn(x)) with bn's training / eval semantics and side effects (process_group: batch statistics
    over its ranks, as nn.SyncBatchNorm)."""
    call = batch_norm_call(bn)
    return bn_act(x, call.running_mean, call.running_var, call.weight, call.bias, call.use_batch_stats, call.momentum,
                  call.eps, None, act, backend=backend, process_group=process_group)


class _FusedBNActForward:
    """The forward FusedBNAct and the BatchNormAct2d twin share: the eager composition where torch.compile
    lowers it, the tuner's choice with backend="tune" (`_planned` / `_run_fused` / `_run_eager`), else the plan
    for the input's signature (one bn_act_stage call on the cpu and cuda backends)."""

    backend: str | None = None
    process_group = None  # a torch.distributed group: batch statistics over all its ranks (nn.SyncBatchNorm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: the routed forward, or the eager one for Inductor to lower
            if lowers_to_inductor(self.backend, x, self):
                return self._run_eager(x)
            return tuning.run(self, x) if backends.tuned(self.backend, x) else self._run_fused(x, self.backend)
        return self._planned(x, self.backend)

    # the tuner's three ways to run this layer: planned or routed on a backend (a Variant in force), or eager
    def _planned(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        """This layer on its plan for x's signature on the backend setting `backend` (resnet_fused.nn.plan)."""
        act = self._activation()
        key = plan.layer_signature(self, x, backend, ()) + (self.training, act)
        return plan.plans_of(self).get(key, lambda: self._make_plan(x, backend, act))(x)

    def _make_plan(self, x: torch.Tensor, backend: str | None, act: Activation):
        if backends.tuned(backend, x):
            return functools.partial(tuning.run, self)
        if plan.stage_backend(self, x, backend, ()) is None:
            return functools.partial(self._run_fused, backend=backend)
        # one bn_act_stage call (the norm's semantics are nn.BatchNorm2d's)
        return plan.Chain(functools.partial(plan.bn_stage, self, act), [], x)

    def _run_fused(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        return bn_act_forward(self, x, self._activation(), backend=backend, process_group=self.process_group)

    def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward of the norm class this one fuses (the next one in the MRO)."""
        return super(_FusedBNActForward, self).forward(x)


class FusedBNAct(_FusedBNActForward, nn.BatchNorm2d):
    """act(BatchNorm2d(x)) in one fused call (resnet_fused.functional.bn_act). ``act``: a name of
    resnet_fused.activations.ACTIVATIONS, an activation module or None; kept as ``self.act``, an Activation.
    Set ``process_group`` to synchronize the batch statistics across ranks."""

    act: Activation

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, act="relu", backend: str | None = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.act = activation(act)
        self.backend = backend

    def _activation(self) -> Activation:
        return self.act

    def _run_eager(self, x: torch.Tensor) -> torch.Tensor:
        y = self._norm_forward(x)
        # made by fuse_: the activation module after it (now a pass-through) computes the eager activation
        module = self.__dict__.get("_resnet_fused_act")
        return self.act(y) if module is None else module._resnet_fused_original_class.forward(module, y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}, backend={self.backend!r}"


class _FusedBatchNormAct2d(_FusedBNActForward):
    """timm BatchNormAct2d (drop Identity) in one fused call: its own ``act`` module, read at every call."""

    def _activation(self) -> Activation:
        return activation(self.act)  # raises for an activation module the kernels do not know

    def _run_eager(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm_forward(x)  # BatchNormAct2d.forward: the norm, drop (Identity) and act


_TWIN_NAME = "FusedBatchNormAct2d"
_TWIN_OF = ("timm.layers.norm_act", "BatchNormAct2d")


def fused_batchnorm_act_class() -> type:
    """The fused twin of timm's BatchNormAct2d (made on first use, so timm is imported only when a model has
    one; named in this module so that pickle finds it: __getattr__ below makes it by that name)."""
    twin = sys.modules[__name__].__dict__.get(_TWIN_NAME)
    if twin is None:
        module, name = _TWIN_OF
        original = getattr(importlib.import_module(module), name)
        twin = type(_TWIN_NAME, (_FusedBatchNormAct2d, original), {"__module__": __name__, "__qualname__": _TWIN_NAME,
                                                                   "__doc__": _FusedBatchNormAct2d.__doc__})
        setattr(sys.modules[__name__], _TWIN_NAME, twin)
    return twin


def __getattr__(name: str):
    if name == _TWIN_NAME:
        return fused_batchnorm_act_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
