"""fuse_ / unfuse_: swap fused blocks into an existing torchvision or timm model, and back.

A block is converted in place by changing its class to the fused twin: every submodule, parameter,
buffer and state_dict key stays the very same object, and unfuse_ restores the class. A block with
anything the fused block would not reproduce exactly is left alone and reported.

What is recognized (a module's class by its module path and name, so neither library is imported):

- whole blocks: torchvision's and timm's ResNet BasicBlock / Bottleneck (FusedBasicBlock /
  FusedBottleneck; with torchvision FrozenBatchNorm2d, their FrozenBN variants);
- conv -> BN (-> ReLU) runs whose order of calls is known: nn.Sequential and its subclasses that keep
  its forward (torchvision Conv2dNormActivation, RegNet's BottleneckTransform, FCNHead, ...), the
  ResNet stems (timm's deep stems included), torchvision's IntermediateLayerGetter (segmentation /
  detection backbones), timm ConvNormAct / ConvBnAct (ByobNet, RegNet, CSPNet, SKNet, ...), the
  conv -> BN pairs inside blocks that are left whole (squeeze-excitation, anti-aliasing, drop-path...),
  and inside timm's pre-activation blocks (resnetv2: conv_k -> norm_{k+1});
- norms: nn.BatchNorm2d, timm BatchNormAct2d (drop Identity, act ReLU or Identity), torchvision
  FrozenBatchNorm2d. Activations other than ReLU after the norm leave the unit alone.

Such a run is fused by giving its conv a class that computes conv + BN (+ ReLU) and its BN (and
ReLU) pass-through classes; the report names every BatchNorm layer left unfused and why.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from resnet_fused import backends, tuning
from resnet_fused.nn.batchnorm import is_plain_batchnorm, lowers_to_inductor
from resnet_fused.nn.conv_bn import fused_conv_bn_forward, is_fusable_conv
from resnet_fused.nn.fold import FoldCache
from resnet_fused.nn.norms import internal_relu, is_batchnorm_like, is_frozen_bn, norm_problem, norm_view
from resnet_fused.nn.recognized import ACTIVATION_MODULES, CHAINS, KNOWN_BLOCKS, KNOWN_STEMS, PREACT_BLOCKS

log = logging.getLogger("resnet_fused")


@dataclass
class FuseReport:
    """What fuse_ swapped (module names), what it left alone (module -> reason), and every BatchNorm
    layer of the model: fused, or left with the reason (path -> reason)."""

    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bn_fused: list[str] = field(default_factory=list)
    bn_left: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def bn_total(self) -> int:
        return len(self.bn_fused) + len(self.bn_left)

    @property
    def bn_fused_fraction(self) -> float:
        return len(self.bn_fused) / self.bn_total if self.bn_total else 1.0

    def __str__(self) -> str:
        verb = "would fuse (dry run)" if self.dry_run else "fused"
        lines = [f"resnet_fused.fuse_: {len(self.swapped)} modules {verb}, {len(self.skipped)} left as they were; "
                 f"BatchNorm layers: {len(self.bn_fused)} of {self.bn_total} fused ({100 * self.bn_fused_fraction:.0f} %)"]
        if not self.bn_total:
            lines.append("  the model has no BatchNorm layer: nothing to fuse")
        lines += [f"  left {name or '<model>'}: {why}" for name, why in self.skipped.items()]
        lines += [f"  BatchNorm {name} not fused: {why}" for name, why in self.bn_left.items()]
        return "\n".join(lines)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None))


def _any_hooks(m: nn.Module) -> bool:
    return any(_has_hooks(s) for s in m.modules())


def _is_identity(m) -> bool:
    return m is None or type(m) is nn.Identity


def _key(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__name__


def _is_activation(m) -> bool:
    return m is not None and type(m).__module__ in ACTIVATION_MODULES and type(m) is not nn.Identity


def _runs_sequentially(m: nn.Module) -> bool:
    """An nn.Sequential whose forward is nn.Sequential's: its children run in order, each on the last output."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _block_problem(block: nn.Module, stages: int) -> str | None:
    """Why the fused twin would not compute exactly what `block` does (None: it would)."""
    if _has_hooks(block):
        return "it has hooks of its own"
    for i in range(1, stages + 1):
        conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if not is_fusable_conv(conv):
            return f"conv{i} is {type(conv).__name__} (fused: nn.Conv2d with zero padding)"
        if not (is_plain_batchnorm(bn) or is_frozen_bn(bn)):
            return f"bn{i} is {type(bn).__name__} (fused: nn.BatchNorm2d, FrozenBatchNorm2d)"
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


def _block_consumes(block: nn.Module, stages: int) -> list[nn.Module]:
    """The modules a fused block computes itself: its convs and BNs, and a conv -> BN downsample."""
    mods = [getattr(block, f"{p}{i}") for i in range(1, stages + 1) for p in ("conv", "bn")]
    ds = block.downsample
    if isinstance(ds, nn.Sequential) and len(ds) == 2 and is_fusable_conv(ds[0]) and is_plain_batchnorm(ds[1]):
        mods += [ds, ds[0], ds[1]]
    return mods


class _FusedConvBNReLUHead(nn.Conv2d):
    """The conv of a conv -> BN (-> ReLU) run whose order of calls is known, computing all of it; the
    BN and ReLU that follow become pass-through (their parameters and buffers stay where they are).
    Tuned like FusedConvBNReLU with backend="tune" (`_run_fused` / `_run_eager`)."""

    @property
    def process_group(self):  # tuning.run: synchronized BN statistics use the rules
        return self._resnet_fused_group

    def forward(self, x):
        if lowers_to_inductor(self._resnet_fused_backend, x, self._resnet_fused_bn):
            return self._run_eager(x)
        if backends.tuned(self._resnet_fused_backend, x):
            return tuning.run(self, x)
        return self._run_fused(x, self._resnet_fused_backend)

    def _run_fused(self, x, backend):
        bn = self._resnet_fused_bn
        return fused_conv_bn_forward(self, norm_view(bn), x, act=self._resnet_fused_relu, backend=backend,
                                     cache=self._resnet_fused_folds, name="conv",
                                     process_group=None if is_frozen_bn(bn) else self._resnet_fused_group)

    def _run_eager(self, x):
        bn, act = self._resnet_fused_bn, self._resnet_fused_act
        y = bn._resnet_fused_original_class.forward(bn, nn.Conv2d.forward(self, x))
        return act._resnet_fused_original_class.forward(act, y) if act is not None else y


class _PassThroughBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x):
        return x


class _PassThroughReLU(nn.ReLU):
    def forward(self, x):
        return x


def _pass_through_forward(self, x, *args, **kwargs):
    return x


_PASS_THROUGH = {nn.BatchNorm2d: _PassThroughBatchNorm2d, nn.ReLU: _PassThroughReLU}
# lazily made pass-through twins of other libraries' norms, by name (module __getattr__ makes them on unpickling)
_LAZY = {"_PassThroughBatchNormAct2d": ("timm.layers.norm_act", "BatchNormAct2d"),
         "_PassThroughFrozenBatchNorm2d": ("torchvision.ops.misc", "FrozenBatchNorm2d")}


def _pass_through(cls: type) -> type:
    if cls not in _PASS_THROUGH:
        name = f"_PassThrough{cls.__name__}"
        _PASS_THROUGH[cls] = type(name, (cls,), {"forward": _pass_through_forward, "__module__": __name__,
                                                 "__qualname__": name, "__doc__": f"{cls.__name__}, computed by the conv before it"})
        if _LAZY.get(name) == (cls.__module__, cls.__name__):
            setattr(sys.modules[__name__], name, _PASS_THROUGH[cls])
    return _PASS_THROUGH[cls]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, cls = _LAZY[name]
        return _pass_through(getattr(importlib.import_module(module), cls))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swap_class(m: nn.Module, cls) -> None:
    m._resnet_fused_original_class = type(m)
    m.__class__ = cls


class _Planner:
    """Decides what fuse_ does (actions) and what it reports, touching nothing until apply()."""

    def __init__(self, backend, group):
        self.backend, self.group = backend, group
        self.report = FuseReport()
        self.used: set[int] = set()  # modules a planned fusion computes
        self.bn_reason: dict[int, str] = {}  # BN module -> why it stays (the most specific reason found)
        self.bn_done: set[int] = set()
        self.actions: list = []

    def why(self, bn, reason: str, override: bool = True) -> None:
        if bn is not None and is_batchnorm_like(bn) and (override or id(bn) not in self.bn_reason):
            self.bn_reason[id(bn)] = reason

    def block(self, name: str, m: nn.Module, spec) -> bool:
        fused_cls, frozen_cls, stages = spec
        problem = _block_problem(m, stages)
        if problem:
            self.report.skipped[name] = f"{type(m).__name__}: {problem}"
            for i in range(1, stages + 1):
                self.why(getattr(m, f"bn{i}", None), f"in {type(m).__name__} {name}: {problem}")
            return False
        consumed = _block_consumes(m, stages)
        cls = frozen_cls if any(is_frozen_bn(getattr(m, f"bn{i}")) for i in range(1, stages + 1)) else fused_cls
        self.used.update(id(c) for c in consumed)
        self.bn_done.update(id(c) for c in consumed if is_batchnorm_like(c))
        backend, group = self.backend, self.group

        def act():
            m._resnet_fused_original_class = type(m)
            m.__class__ = cls
            m._init_fused(backend, shortcut=True)
            m.process_group = group

        self.actions.append(act)
        self.report.swapped.append(name)
        return True

    def chain(self, prefix: str, conv_name: str, conv, bn_name: str, bn, act_name: str | None = None, act=None,
              between_ok: bool = True) -> bool:
        """Plan conv -> bn (-> act): conv's output goes straight into bn, bn's (if act is given and
        between_ok) into act, and nowhere else."""
        if not is_batchnorm_like(bn) or any(id(x) in self.used for x in (conv, bn)):
            return False
        where = f"{prefix}{conv_name}"
        if not isinstance(conv, nn.Conv2d):
            return False  # not a conv -> BN run at all
        if not is_fusable_conv(conv):
            self.why(bn, f"the conv before it ({where}) is {type(conv).__name__}"
                         f"{'' if type(conv) is not nn.Conv2d else ' with padding ' + repr(conv.padding) + ' / ' + conv.padding_mode}"
                         " (fused: nn.Conv2d, zero padding)")
            return False
        problem = norm_problem(bn)
        if problem:
            self.why(bn, problem)
            return False
        if _has_hooks(conv) or _any_hooks(bn):
            self.why(bn, f"hooks on {where} or on it")
            self.report.skipped[where] = "conv -> bn run with hooks"
            return False
        inner = internal_relu(bn)
        if inner is None and act is not None and between_ok and not _is_identity(act) and id(act) not in self.used:
            if type(act) is nn.ReLU:
                relu, fuse_act = (False, None) if _has_hooks(act) else (True, act)
            elif _is_activation(act):  # ReLU6, SiLU, LeakyReLU, Hardswish, GELU...: left alone, said so
                self.why(bn, f"followed by {type(act).__name__} ({prefix}{act_name}); fused: ReLU or none")
                self.report.skipped[where] = f"conv -> bn -> {type(act).__name__}: fused activations are ReLU and none"
                return False
            else:
                relu, fuse_act = False, None  # not an activation (pooling, dropout, a hooked ReLU): runs as it is
        else:
            relu, fuse_act = bool(inner), None
        self.used.update(id(x) for x in (conv, bn, fuse_act) if x is not None)
        self.bn_done.add(id(bn))
        backend, group = self.backend, self.group

        def apply():
            object.__setattr__(conv, "_resnet_fused_bn", bn)  # a reference, not a submodule: keys stay put
            object.__setattr__(conv, "_resnet_fused_act", fuse_act)
            conv._resnet_fused_relu, conv._resnet_fused_backend, conv._resnet_fused_folds = relu, backend, FoldCache()
            conv._resnet_fused_group = group
            _swap_class(conv, _FusedConvBNReLUHead)
            _swap_class(bn, _pass_through(type(bn)))
            if fuse_act is not None:
                _swap_class(fuse_act, _PassThroughReLU)

        self.actions.append(apply)
        self.report.swapped.append(where + f"+{bn_name}" + (f"+{act_name}" if fuse_act is not None else ""))
        return True

    def sequence(self, prefix: str, mods: list[tuple[str, nn.Module]], keep=frozenset()) -> None:
        """Every conv -> BN (-> act) run of consecutive modules in `mods`, which run in this order, each
        on the previous one's output; names in `keep` are outputs used elsewhere (not fused past them)."""
        for i in range(len(mods) - 1):
            (cn, conv), (bn_name, bn) = mods[i], mods[i + 1]
            if cn in keep:
                continue
            act_name, act = mods[i + 2] if i + 2 < len(mods) and bn_name not in keep else (None, None)
            self.chain(prefix, cn, conv, bn_name, bn, act_name, act)

    def apply(self) -> None:
        for act in self.actions:
            act()


def _flatten(name: str, m: nn.Module) -> list[tuple[str, nn.Module]]:
    if _runs_sequentially(m):
        return [(f"{name}.{k}", v) for k, v in m._modules.items() if v is not None]
    return [(name, m)]


def fuse_(model: nn.Module, backend: str | None = "auto", *, sync_bn: bool = False, process_group=None,
          dry_run: bool = False):
    """Swap, in place, every torchvision / timm BasicBlock and Bottleneck and every conv -> BatchNorm
    (-> ReLU) run whose order of calls is known (see the module's docstring) for fused modules holding
    the same parameters and buffers.

    Units with anything the fused ones would not reproduce exactly (attention / squeeze-excitation,
    drop-path, anti-aliasing, activations other than ReLU, other norms, hooks) are left alone. Returns
    the model; the report (`model.resnet_fused_report`, a FuseReport: every BatchNorm layer left
    unfused, with its path and the reason) is also logged at INFO on logger "resnet_fused".

    dry_run=True: changes nothing (not even an attribute) and returns the FuseReport of what fuse_
    would do.

    sync_bn=True: in training, batch statistics are taken over all ranks of `process_group` (default:
    the world), nn.SyncBatchNorm's semantics, by all-reducing the fused per-channel sums; for models
    wrapped in DistributedDataParallel afterwards.
    """
    backend = None if backend == "auto" else backend
    group = (process_group or torch.distributed.group.WORLD) if sync_bn else None
    plan = _Planner(backend, group)
    plan.report.dry_run = dry_run
    named = list(model.named_modules())
    # whole blocks first: their convs (and a conv -> BN downsample) are theirs
    left_blocks = []
    for name, m in named:
        spec = KNOWN_BLOCKS.get(_key(m))
        if spec is not None and not plan.block(name, m, spec):
            left_blocks.append(name)
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
            between_ok = all(_is_identity(getattr(m, b, None)) for b in between)
            plan.chain(prefix, conv, getattr(m, conv), bn, getattr(m, bn), act, getattr(m, act, None) if act else None,
                       between_ok)
        if key in PREACT_BLOCKS:
            plan.why(getattr(m, "norm1", None), "pre-activation norm of the block's input (it follows the previous "
                     "block's residual sum, not a conv: nothing to fold it into)", override=False)
        if _runs_sequentially(m):
            plan.sequence(prefix, list(m._modules.items()))
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
            "its own forward (known: nn.Sequential, ResNet stems and blocks, timm ConvNormAct, pre-activation blocks)")
    if dry_run:
        log.info("%s", plan.report)
        return plan.report
    plan.apply()
    model.resnet_fused_report = plan.report
    log.info("%s", plan.report)
    return model


def unfuse_(model: nn.Module) -> nn.Module:
    """Undo fuse_: every swapped module gets its original class back."""
    for m in model.modules():
        original = m.__dict__.pop("_resnet_fused_original_class", None)
        if original is None:
            continue
        for attr in ("_folds", "backend", "shortcut", "process_group", "_resnet_fused_relu", "_resnet_fused_backend",
                     "_resnet_fused_folds", "_resnet_fused_group", "_resnet_fused_bn", "_resnet_fused_act",
                     "_tuned_choices"):
            m.__dict__.pop(attr, None)
        m.__class__ = original
    model.__dict__.pop("resnet_fused_report", None)
    return model
