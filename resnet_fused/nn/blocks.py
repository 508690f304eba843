"""FusedBasicBlock and FusedBottleneck: torchvision's constructor arguments, attributes and
state_dict keys; every conv -> BN (-> add) -> ReLU runs as one fused call.

In training on the Triton backend, and on the cuda backend where cuDNN's fused graphs apply, the inner
BN + ReLU are deferred (DESIGN.md, data flow): a conv writes its raw output and takes its BN statistics
in the epilogue, and the next conv applies that BN + ReLU to its input as it loads, so the inner
activations are never written or saved.
"""

from __future__ import annotations

import torch
from torch import nn

import functools

from resnet_fused import backends, tuning
from resnet_fused.activations import Activation
from resnet_fused.ops import cudnn
from resnet_fused.nn import plan
from resnet_fused.nn.batchnorm import is_plain_batchnorm, lowers_to_inductor
from resnet_fused.nn.conv_bn import can_defer, conv_bn_defer_forward, conv_bn_forward, conv_bn_projection_forward, is_fusable_conv
from resnet_fused.nn.fold import FoldCache

_RELU, _NONE = Activation("relu"), Activation("none")


class _FusedBlock(nn.Module):
    """What both blocks share: the shortcut, the fold cache, the backend. Class-level defaults let
    resnet_fused.fuse_ turn a torchvision or timm block into a fused one in place."""

    num_convs: int  # conv{i} -> bn{i} stages, i = 1..num_convs: 2 (BasicBlock) or 3 (Bottleneck)
    backend: str | None = None
    shortcut: bool = True  # False: the paper's plain network (no identity, no projection)
    process_group = None  # a torch.distributed group: BN statistics over all its ranks (nn.SyncBatchNorm)

    def _init_fused(self, backend: str | None, shortcut: bool) -> None:
        self.backend = backend
        self.shortcut = shortcut
        self._folds = FoldCache()
        self._plans = plan.PlanCache()

    def _conv_bn(self, i: int, x: torch.Tensor, backend: str | None, residual: torch.Tensor | None = None,
                 relu: bool = True, input_bn=None) -> torch.Tensor:
        return conv_bn_forward(getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), x, residual, relu, backend=backend,
                               cache=self._folds, name=f"conv{i}", process_group=self.process_group, input_bn=input_bn)

    def _stage_pair(self, i: int) -> tuple[nn.Module, nn.Module]:
        """conv{i} and bn{i} as a plan's stage reads them."""
        return getattr(self, f"conv{i}"), getattr(self, f"bn{i}")

    def _defers(self, x: torch.Tensor, backend: str | None) -> bool:
        """Whether the inner BN + ReLU ride on the next conv's loads (training, no synchronized BN): on the
        Triton backend (its conv's prologue), and on the cuda backend where cuDNN's fused graphs take them
        (cudnn.defers_bn_relu; elsewhere writing the activation once is as cheap as recomputing it). A tuner's
        Variant turns it on (on any backend) or off. The last BN must normalize with batch statistics too (it
        differentiates through the deferred statistics: a frozen last BN runs the plain path)."""
        convs = [getattr(self, f"conv{i}") for i in range(1, self.num_convs + 1)]
        last_bn = getattr(self, f"bn{self.num_convs}")
        if (self.process_group is not None or backends.variant().defer is False
                or not all(can_defer(conv, getattr(self, f"bn{i}")) for i, conv in enumerate(convs[:-1], 1))
                or not is_fusable_conv(convs[-1]) or not is_plain_batchnorm(last_bn) or not last_bn.training):
            return False
        impl = backends.resolve(backend, x)
        return backends.variant().defer is True or impl == "triton" or impl == "cuda" and cudnn.defers_bn_relu(x, convs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: the routed forward, or the eager one for Inductor to lower
            if lowers_to_inductor(self.backend, x, *self._norms()):
                return self._run_eager(x)
            return tuning.run(self, x) if backends.tuned(self.backend, x) else self._run_fused(x, self.backend)
        return self._planned(x, self.backend)

    # the tuner's three ways to run this block: planned or routed on a backend (a Variant in force), or eager
    def _planned(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        """This block on its plan for x's signature on the backend setting `backend` (made on the first call)."""
        ds = self.downsample
        # the shortcut's modules themselves (one replaced inside downsample is another plan) and their modes
        key = plan.layer_signature(self, x, backend) + (
            self.shortcut, ds is not None and tuple((m, m.training) for m in ds._modules.values()))
        return self._plans.get(key, lambda: self._make_plan(x, backend))(x)

    def _make_plan(self, x: torch.Tensor, backend: str | None):
        """This block's plan for inputs like x (resnet_fused.nn.plan): the tuner's choice, one C++ op per stage
        (BN folded in eval), or the routed _run_fused."""
        if backends.tuned(backend, x):
            return functools.partial(tuning.run, self)
        pairs = [self._stage_pair(i) for i in range(1, self.num_convs + 1)]
        ds = self._projection()
        every_pair = pairs + ([tuple(ds)] if ds is not None else [])
        if plan.stage_backend(self, x, backend, every_pair) is None:
            return functools.partial(self._run_fused, backend=backend)
        # the shortcut: the projection pair as a stage, another downsample module as itself, or the identity
        module = self.downsample if ds is None and self.downsample is not None else None
        # training, the inner BN + ReLU on the next conv's loads (cuDNN's fused graphs); the stage ops' deferred
        # convolutions (conv_genstats) are ungrouped and bias-free: other blocks (ResNeXt's) take the plain stages
        if self._defers(x, backend) and all(conv.groups == 1 and conv.bias is None for conv, _ in pairs):
            stages = [plan.Deferring(conv, bn) for conv, bn in pairs[:-1]] + [plan.Staged(*pairs[-1], _RELU)]
            projection = plan.Staged(ds[0], ds[1], _NONE) if ds is not None else None
            identity = None if not self.shortcut else next(f for f in (projection, module, _same) if f is not None)
            return plan.Chain(functools.partial(_run_deferred, stages, identity), [], x)
        if plan.folds(every_pair, torch.is_grad_enabled()):
            stages, projection = self._folded_stages(pairs, ds, module, x)
        else:
            stages = [plan.Staged(conv, bn, _RELU) for conv, bn in pairs]
            projection = plan.Staged(ds[0], ds[1], _NONE) if ds is not None else None
        identity = None if not self.shortcut else next(f for f in (projection, module, _same) if f is not None)
        return plan.Chain(functools.partial(_run_stages, stages, identity), stages + [projection], x)

    def _folded_stages(self, pairs: list, ds, module, x: torch.Tensor) -> tuple[list, plan.Folded | None]:
        """Eval with BN folded: a Folded stage per pair; a projection's BN shift joins the last conv's bias."""
        folds = dict(cache=self._folds)
        projection = plan.Folded(*ds, _NONE, x.shape, x, name="downsample", bias=False, **folds) if ds is not None else None
        shapes = plan.stage_input_shapes(x.shape, [conv for conv, _ in pairs])
        stages = [plan.Folded(conv, bn, _RELU, shape, x, name=f"conv{i}", **folds)
                  for i, ((conv, bn), shape) in enumerate(zip(pairs[:-1], shapes), 1)]
        identity_grad = torch.is_grad_enabled() and (
            x.requires_grad or module is not None and any(p.requires_grad for p in module.parameters()))
        stages.append(plan.Folded(*pairs[-1], _RELU, shapes[-1], x, self.shortcut, residual_grad=identity_grad,
                                  shift=projection.shift if projection is not None else None, name=f"conv{len(pairs)}", **folds))
        return stages, projection

    def _run_fused(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        """conv1 -> bn1 -> relu -> ... -> conv{n} -> bn{n} (+ shortcut) -> relu, deferring the inner
        BN + ReLU to the next conv's loads where _defers says so."""
        defer = self._defers(x, backend)
        out, deferred = x, None
        for i in range(1, self.num_convs):
            if defer:
                out, deferred = conv_bn_defer_forward(getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), out, backend=backend,
                                                      input_bn=deferred)
            else:
                out = self._conv_bn(i, out, backend)
        n, ds = self.num_convs, self._projection()
        conv, bn = getattr(self, f"conv{n}"), getattr(self, f"bn{n}")
        if ds is not None and is_fusable_conv(conv) and is_plain_batchnorm(bn):  # the shortcut's BN shift may join conv{n}'s bias
            return conv_bn_projection_forward(conv, bn, out, ds[0], ds[1], x, backend=backend, cache=self._folds, name=f"conv{n}",
                                              shortcut_name="downsample", process_group=self.process_group, input_bn=deferred)
        return self._conv_bn(n, out, backend, residual=self._identity(x, backend), input_bn=deferred)

    def _norms(self) -> list[nn.Module]:
        ds = self.downsample
        return [getattr(self, f"bn{i}") for i in range(1, self.num_convs + 1)] + [
            m for m in (ds.modules() if ds is not None else ()) if isinstance(m, nn.modules.batchnorm._NormBase)]

    def _run_eager(self, x: torch.Tensor) -> torch.Tensor:
        """The same block as torchvision runs it, module by module (the tuner's "eager" candidate, and
        what torch.compile gets on the CPU): the ReLUs and the add in place on the norm's fresh output,
        as torchvision's nn.ReLU(inplace=True) and `out += identity` (a new tensor each would cost an
        allocation, and page faults, per step)."""
        out = x
        for i in range(1, self.num_convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.num_convs:
                out = torch.relu_(out)
        if self.shortcut:
            out += x if self.downsample is None else self.downsample(x)
        return torch.relu_(out)

    def _projection(self) -> nn.Sequential | None:
        """The downsample when it is a fusable conv -> BN pair (and the shortcut is on)."""
        ds = self.downsample
        fusable = isinstance(ds, nn.Sequential) and len(ds) == 2 and is_fusable_conv(ds[0]) and is_plain_batchnorm(ds[1])
        return ds if self.shortcut and fusable else None

    def _identity(self, x: torch.Tensor, backend: str | None) -> torch.Tensor | None:
        if not self.shortcut:
            return None
        ds = self._projection()
        if ds is not None:
            return conv_bn_forward(ds[0], ds[1], x, act=None, backend=backend, cache=self._folds, name="downsample",
                                   process_group=self.process_group)
        return x if self.downsample is None else self.downsample(x)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _run_deferred(stages: list, identity, x: torch.Tensor) -> torch.Tensor:
    """A deferred plan's block: Deferring stages, each handing its BN + ReLU to the next, then the last Staged one."""
    out, input_bn = x, ()
    for stage in stages[:-1]:
        out, input_bn = stage(out, input_bn)
    return stages[-1](out, identity(x) if identity is not None else None, input_bn)


def _run_stages(stages: list, identity, x: torch.Tensor) -> torch.Tensor:
    """A plan's block: stages[-1](... stages[0](x), identity(x)) (identity None: no shortcut)."""
    out = x
    for stage in stages[:-1]:
        out = stage(out)
    return stages[-1](out, identity(x) if identity is not None else None)


class FusedBasicBlock(_FusedBlock):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), as torchvision.models.resnet.BasicBlock."""

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64, dilation: int = 1, norm_layer=None, *, shortcut: bool = True,
                 backend: str | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_fused(backend, shortcut)

    num_convs = 2


class FusedBottleneck(_FusedBlock):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)), as torchvision's
    Bottleneck (stride on the 3x3 conv, ResNet v1.5)."""

    expansion: int = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, groups: int = 1,
                 base_width: int = 64, dilation: int = 1, norm_layer=None, *, shortcut: bool = True,
                 backend: str | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=dilation, groups=groups, dilation=dilation, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_fused(backend, shortcut)

    num_convs = 3
