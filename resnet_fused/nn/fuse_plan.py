"""What fuse_ does to a model, planned before anything changes: FuseReport (what is swapped, what is
left and why, every BatchNorm layer's fate) and Planner, whose actions apply the swaps (resnet_fused.convert
walks the model and asks it: blocks, conv -> BN (-> activation) runs, standalone BN -> activation)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from resnet_fused.activations import IDENTITY, Activation, module_activation
from resnet_fused.nn.batchnorm import is_plain_batchnorm
from resnet_fused.nn.bn_act import FusedBNAct, fused_batchnorm_act_class
from resnet_fused.nn.conv_bn import is_fusable_conv
from resnet_fused.nn.conv_bn_head import FusedConvBNActHead
from resnet_fused.nn.fold import FoldCache
from resnet_fused.nn.norms import KNOWN, describe, internal_activation, is_batchnorm_like, is_bn_act, is_frozen_bn, norm_problem
from resnet_fused.nn.pass_through import pass_through
from resnet_fused.nn.recognized import ACTIVATION_MODULES


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


def is_identity(m) -> bool:
    """No module, or nn.Identity: nothing runs there."""
    return m is None or type(m) is nn.Identity


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
        if not is_identity(getattr(block, name, None)):
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


def _swap_class(m: nn.Module, cls: type, **attrs) -> None:
    """m becomes a cls, with attrs set (plain attributes, never submodules: state_dict keys stay put) and
    recorded, so that unfuse_ removes exactly what fuse_ added."""
    for name, value in attrs.items():
        object.__setattr__(m, name, value)
    m._resnet_fused_attrs = tuple(attrs)
    m._resnet_fused_original_class = type(m)
    m.__class__ = cls


class Planner:
    """Decides what fuse_ does (actions) and what it reports, touching nothing until apply()."""

    def __init__(self, model: nn.Module, backend, group):
        self.backend, self.group = backend, group
        self.report = FuseReport()
        self.used: set[int] = set()  # modules a planned fusion computes
        self.bn_reason: dict[int, str] = {}  # BN module -> why it stays (the most specific reason found)
        self.bn_done: set[int] = set()
        self.actions: list = []
        # modules that are children at more than one place (called from each): a swapped class would change all
        places = Counter(id(c) for m in model.modules() for c in m._modules.values() if c is not None)
        self.shared = {i for i, n in places.items() if n > 1}
        self.followed: list[tuple] = []  # (prefix, bn name, bn, next name, next module): a BN's output goes only there

    def why(self, bn, reason: str, override: bool = True) -> None:
        if bn is not None and is_batchnorm_like(bn) and (override or id(bn) not in self.bn_reason):
            self.bn_reason[id(bn)] = reason

    def _claim(self, mods, swapped: str, apply) -> None:
        self.used.update(id(m) for m in mods if m is not None)
        self.bn_done.update(id(m) for m in mods if is_batchnorm_like(m))
        self.actions.append(apply)
        self.report.swapped.append(swapped)

    def block(self, name: str, m: nn.Module, spec) -> bool:
        fused_cls, frozen_cls, stages = spec
        problem = _block_problem(m, stages)
        if problem:
            self.report.skipped[name] = f"{type(m).__name__}: {problem}"
            for i in range(1, stages + 1):
                self.why(getattr(m, f"bn{i}", None), f"in {type(m).__name__} {name}: {problem}")
            return False
        cls = frozen_cls if any(is_frozen_bn(getattr(m, f"bn{i}")) for i in range(1, stages + 1)) else fused_cls
        backend, group, original = self.backend, self.group, type(m)

        def apply():
            before = set(m.__dict__)
            m.__class__ = cls
            m._init_fused(backend, shortcut=True)
            m.process_group = group
            m._resnet_fused_attrs = tuple(set(m.__dict__) - before)
            m._resnet_fused_original_class = original

        self._claim(_block_consumes(m, stages), name, apply)
        return True

    def _activation_after(self, prefix: str, bn, act_name: str | None, act) -> tuple[Activation, nn.Module | None] | str:
        """What runs on bn's output when it goes only into `act`: (the Activation to fuse, the module it
        replaces, or None when act runs as it is); or why the unit is left alone (an activation the kernels
        do not compute)."""
        if is_identity(act) or id(act) in self.used:
            return IDENTITY, None
        spec = module_activation(act)
        if spec is None:
            if type(act).__module__ in ACTIVATION_MODULES:
                return f"followed by {describe(act)} ({prefix}{act_name}), an activation the fused kernels do not compute ({KNOWN})"
            return IDENTITY, None  # not an activation (pooling, dropout, a model's own module): it runs on the output
        if _has_hooks(act) or id(act) in self.shared:
            return IDENTITY, None  # the hooks see its call; a shared one is called elsewhere too
        return spec, act

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
        if id(conv) in self.shared or id(bn) in self.shared:
            self.why(bn, f"{where} or it is one module at several places of the model (fuse_ leaves shared modules as they are)")
            return False
        inner = internal_activation(bn)
        if inner is not None:
            spec, fuse_act = inner, None
        else:
            after = self._activation_after(prefix, bn, act_name, act if between_ok else None)
            if isinstance(after, str):
                self.why(bn, after)
                self.report.skipped[where] = f"conv -> BN -> {describe(act)}: not an activation the fused kernels compute"
                return False
            spec, fuse_act = after
        backend, group = self.backend, self.group

        def apply():
            _swap_class(conv, FusedConvBNActHead, _resnet_fused_bn=bn, _resnet_fused_act=fuse_act,
                        _resnet_fused_activation=spec, _resnet_fused_backend=backend, _resnet_fused_folds=FoldCache(),
                        _resnet_fused_group=group)
            _swap_class(bn, pass_through(type(bn)))
            if fuse_act is not None:
                _swap_class(fuse_act, pass_through(type(fuse_act)))

        self._claim((conv, bn, fuse_act), where + f"+{bn_name}" + (f"+{act_name}" if fuse_act is not None else ""), apply)
        return True

    def sequence(self, prefix: str, mods: list[tuple[str, nn.Module]], keep=frozenset()) -> None:
        """Every conv -> BN (-> act) run of consecutive modules in `mods`, which run in this order, each
        on the previous one's output; names in `keep` are outputs used elsewhere (not fused past them).
        A BN's next module is remembered for standalone() (a BN -> act with no conv to fold into)."""
        for i in range(len(mods) - 1):
            (cn, conv), (bn_name, bn) = mods[i], mods[i + 1]
            if cn in keep:
                continue
            act_name, act = mods[i + 2] if i + 2 < len(mods) and bn_name not in keep else (None, None)
            self.chain(prefix, cn, conv, bn_name, bn, act_name, act)
        for i, (bn_name, bn) in enumerate(mods):
            if is_batchnorm_like(bn):
                after = mods[i + 1] if i + 1 < len(mods) and bn_name not in keep else (None, None)
                self.followed.append((prefix, bn_name, bn, *after))

    def standalone(self, prefix: str, bn_name: str, bn, act_name: str | None = None, act=None) -> bool:
        """Plan bn (-> act) as one fused bn_act, for a BN no conv -> BN run took: a timm BatchNormAct2d (its
        activation its own), or an nn.BatchNorm2d whose output goes only into `act`, an activation."""
        if id(bn) in self.used:
            return False
        found = self._standalone_activation(prefix, bn, act_name, act)
        if isinstance(found, str):
            self.why(bn, found, override=False)  # a conv -> BN run's reason, if it had one, says more
            return False
        spec, fuse_act = found
        cls, attrs = (FusedBNAct, dict(act=spec, _resnet_fused_act=fuse_act)) if fuse_act is not None else (
            fused_batchnorm_act_class(), {})
        backend, group = self.backend, self.group

        def apply():
            _swap_class(bn, cls, backend=backend, process_group=group, **attrs)
            if fuse_act is not None:
                _swap_class(fuse_act, pass_through(type(fuse_act)))

        self._claim((bn, fuse_act), f"{prefix}{bn_name}" + (f"+{act_name}" if fuse_act is not None else ""), apply)
        return True

    def _standalone_activation(self, prefix: str, bn, act_name: str | None, act) -> tuple[Activation, nn.Module | None] | str:
        """(the Activation a standalone bn_act computes for bn, the activation module it replaces or None), or
        why bn stays as it is."""
        if not (is_plain_batchnorm(bn) or is_bn_act(bn)):
            return norm_problem(bn) or (f"{type(bn).__name__} with no conv before it that fuse_ folds it into (fused "
                                        "without a conv: nn.BatchNorm2d, BatchNormAct2d)")
        problem = norm_problem(bn)
        if problem:
            return problem
        if _any_hooks(bn):
            return "it has hooks"
        if id(bn) in self.shared:
            return "it is one module at several places of the model (fuse_ leaves shared modules as they are)"
        if is_bn_act(bn):
            return internal_activation(bn), None
        after = self._activation_after(prefix, bn, act_name, act)
        if isinstance(after, str) or after[1] is not None:
            return after
        return "no conv right before it that fuse_ folds it into, and no activation module right after it to fuse it with"

    def apply(self) -> None:
        for act in self.actions:
            act()
