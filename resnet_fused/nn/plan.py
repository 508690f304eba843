"""A fused layer's plan: how it runs for one input signature, decided once and cached on the layer.

The signature: the input's shape, strides, dtype, device and requires_grad, grad mode, autocast, the backend
setting, the layer's submodules and their train / eval modes. The first call with a new signature makes the
plan; later calls run it. On the cpu and cuda backends a plan is one C++ op per stage, with no backend
resolution, route or fold lookup per call:

  folded  eval, every pair foldable and no parameter needing a gradient: ``resnet_fused::conv_act_stage`` with
          the BN folded into the conv (weights folded, and on the CPU prepacked for oneDNN, when the plan is
          made). Each call checks that what was folded is unchanged (each parameter's and buffer's identity,
          version counter, storage and requires_grad, and bn.eps); if not, the plan is made again.
  staged  otherwise: ``resnet_fused::conv_bn_act_stage`` per stage (``bn_act_stage`` for a BN -> act layer),
          nn.BatchNorm2d's semantics read per call.
  padded  a tuner's Variant(pad_channels=True) on a conv -> BN layer (FusedConvBNAct, a fuse_-given head) whose input
          channels are not a multiple of cuDNN's vector width: folded or staged on input and weight zero-padded to one
          (the input per call, one constant_pad_nd; the weight too where staged, its gradient a slice of the padded
          one's, and once where folded, when the plan is made).
  routed  the layer's routed forward (``_run_fused``): other backends (torch, Triton), synchronized BN,
          autocast, pairs that are not nn.Conv2d -> nn.BatchNorm2d.

The tuner (backend "tune") keeps its own cache of choices (resnet_fused.tuning). Global flags read when a plan
is made and not per call: torch.backends.cudnn.enabled / allow_tf32, the oneDNN size threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from resnet_fused import backends
from resnet_fused._layout import conv_output_shape
from resnet_fused.activations import Activation
from resnet_fused.ops import arena, cudnn, onednn
from resnet_fused.ops.bn_act import STAGE_BACKENDS
from resnet_fused.nn.batchnorm import FrozenBNView, computes_as
from resnet_fused.nn.fold import FoldCache

_MAX_PLANS = 8  # signatures kept per layer (a layer sees few: train / eval, a batch size or two)

# the stage ops (csrc/*_stage.cpp), found once; a plan calls them only on the cpu / cuda backends, which need _C
_conv_act_stage = torch.ops.resnet_fused.conv_act_stage.default if backends.has_extension() else None
_conv_bn_act_stage = torch.ops.resnet_fused.conv_bn_act_stage.default if backends.has_extension() else None
_bn_act_stage = torch.ops.resnet_fused.bn_act_stage.default if backends.has_extension() else None
_conv_bn_defer_stage = torch.ops.resnet_fused.conv_bn_defer_stage.default if backends.has_extension() else None


def plans_of(module: nn.Module) -> PlanCache:
    """module's PlanCache, made on first use: a plain attribute (no submodule, no state_dict key); on a module fuse_
    gave another class, recorded with fuse_'s other attributes, so that unfuse_ removes it."""
    plans = module.__dict__.get("_resnet_fused_plans")
    if plans is None:
        object.__setattr__(module, "_resnet_fused_plans", plans := PlanCache())
        if "_resnet_fused_attrs" in module.__dict__:
            module._resnet_fused_attrs = (*module._resnet_fused_attrs, "_resnet_fused_plans")
    return plans


class PlanCache:
    """signature -> plan, per layer. Not saved: pickling or copying starts it empty."""

    def __init__(self):
        self._plans: dict[tuple, Callable] = {}

    def get(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        plan = self._plans.get(key)
        if plan is None or not getattr(plan, "valid", _always)():
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = self._plans[key] = make()
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def __getstate__(self):
        return {"_plans": {}}

    def __deepcopy__(self, memo):
        return PlanCache()


def _always() -> bool:
    return True


def tensor_signature(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.requires_grad)


def layer_signature(layer: nn.Module, x: torch.Tensor, backend: str | None, modules=None) -> tuple:
    """What a plan of `layer` for input x on the backend setting `backend` (None: the one in force) depends on,
    besides the values of its parameters and buffers; the tuner's Variant in force and the cuDNN graphs' switch
    included, and torch's cuDNN switches that a route reads (cudnn.enabled, allow_tf32). modules: those the layer runs
    (default: its submodules)."""
    modules = tuple(layer._modules.values()) if modules is None else tuple(modules)
    modes = tuple(m is not None and m.training for m in modules)
    return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(),
            torch.is_autocast_enabled(x.device.type), backend if backend is not None else backends.get_backend(),
            backends.variant(), cudnn.graphs_enabled(), torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32,
            layer.process_group, modules, modes)


def stage_backend(layer: nn.Module, x: torch.Tensor, backend: str | None, pairs) -> str | None:
    """The backend the layer's stages run on as stage ops, or None where the layer runs routed."""
    backend = backends.resolve(backend, x)
    plain = all(is_fusable(conv, bn) for conv, bn in pairs)
    if backend in STAGE_BACKENDS and plain and layer.process_group is None and not torch.is_autocast_enabled(x.device.type):
        return backend
    return None


def is_fusable(conv: nn.Module, bn: nn.Module) -> bool:
    """nn.Conv2d with zero padding, then nn.BatchNorm2d (or a FrozenBNView: an eval-mode one): what the stage ops
    compute exactly (a module fuse_ gave another class, a FusedConvBNActHead or a pass-through twin, counts as the
    class it computes)."""
    return (computes_as(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and (isinstance(bn, FrozenBNView) or computes_as(bn) is nn.BatchNorm2d))


def folds(pairs, grad: bool) -> bool:
    """Every pair's BN normalizes with running statistics, and no parameter needs a gradient."""
    return all(not bn.training and bn.running_mean is not None and bn.running_var is not None
               and not (grad and any(p is not None and p.requires_grad
                                     for p in (*conv._parameters.values(), *bn._parameters.values())))
               for conv, bn in pairs)


def conv_bn_plan(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Activation, x: torch.Tensor, residual: torch.Tensor | None,
                 *, cache: FoldCache, name: str) -> Callable:
    """The plan of one conv -> bn (-> + residual) -> act layer on a stage backend, called (x, residual): folded
    where folds() says so, else staged; under a tuner's Variant(pad_channels=True) on input and weight zero-padded
    to cudnn.padded_channels."""
    pair = (conv, bn)
    padded = cudnn.padded_channels(conv.in_channels, conv.groups, x.dtype) if backends.variant().pad_channels else conv.in_channels
    pad = padded - conv.in_channels
    if folds([pair], torch.is_grad_enabled()):
        stage = Folded(conv, bn, act, x.shape, x, residual is not None, cache=cache, name=name,
                       residual_grad=residual is not None and residual.requires_grad, pad=pad)
        return Chain(stage, [stage], x)
    return Chain(Staged(conv, bn, act, pad), [], x)


def pad_channels(t: torch.Tensor, pad: int) -> torch.Tensor:
    """t (N, C, H, W) or a weight (K, C, R, S) with `pad` zero channels appended, in t's memory format."""
    return torch.constant_pad_nd(t, (0, 0, 0, 0, 0, pad)) if pad else t


# ---- staged: one conv_bn_act_stage per stage ----


def _bn_reads(bn: nn.BatchNorm2d):
    """What nn.BatchNorm2d's forward reads per call, as the stage ops take it: (weight, bias, running_mean,
    running_var), whether batch statistics normalize, and num_batches_tracked where the batch is counted in it."""
    bp, bb = bn._parameters, bn._buffers
    running_mean, running_var = bb.get("running_mean"), bb.get("running_var")
    training, tracks = bn.training, bn.track_running_stats
    tracked = not training or tracks
    vectors = (bp.get("weight"), bp.get("bias"), running_mean if tracked else None, running_var if tracked else None)
    return (vectors, training or (running_mean is None and running_var is None),
            bb.get("num_batches_tracked") if training and tracks else None)


def conv_bn_stage(conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Activation, x: torch.Tensor,
                  residual: torch.Tensor | None = None, input_bn: tuple = (), pad: int = 0) -> torch.Tensor:
    """act(bn(conv(x)) (+ residual)) as one resnet_fused::conv_bn_act_stage call, with what nn.BatchNorm2d's forward
    reads per call: training, track_running_stats, momentum (None: the cumulative average), eps; the op counts the
    batch in num_batches_tracked where nn.BatchNorm2d would. input_bn: a Deferring stage's BN + ReLU of x, applied as
    the conv loads x; pad: zero channels appended to x and the conv's weight (their gradients: pad's backward, a
    slice)."""
    p = conv._parameters
    (weight, bias, running_mean, running_var), batch_stats, counted = _bn_reads(bn)
    conv_weight = p["weight"]
    if pad:
        x, conv_weight = pad_channels(x, pad), pad_channels(conv_weight, pad)
    return _conv_bn_act_stage(x, conv_weight, p["bias"], weight, bias, running_mean, running_var, residual, conv.stride,
                              conv.padding, conv.dilation, conv.groups, batch_stats, bn.momentum, None, bn.eps, act.name,
                              act.alpha, counted, *input_bn)


def bn_stage(bn: nn.BatchNorm2d, act: Activation, x: torch.Tensor) -> torch.Tensor:
    """act(bn(x)) as one resnet_fused::bn_act_stage call, reading what conv_bn_stage reads."""
    vectors, batch_stats, counted = _bn_reads(bn)
    return _bn_act_stage(x, *vectors, None, batch_stats, bn.momentum, None, bn.eps, act.name, act.alpha, counted)


class Staged:
    """conv_bn_stage of one conv -> bn pair (pad: zero input channels appended)."""

    __slots__ = ("conv", "bn", "act", "pad")

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Activation, pad: int = 0):
        self.conv, self.bn, self.act, self.pad = conv, bn, act, pad

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, input_bn: tuple = ()) -> torch.Tensor:
        return conv_bn_stage(self.conv, self.bn, self.act, x, residual, input_bn, self.pad)


class Deferring:
    """An inner conv -> bn -> ReLU of a block in training with its BN + ReLU deferred (DESIGN.md, data flow): one
    resnet_fused::conv_bn_defer_stage call writes the conv's raw output y and its batch statistics, and moves the
    running statistics as nn.BatchNorm2d would; relu(bn(y)) is left to the next stage, which applies it as its conv
    loads y (called with input_bn: this stage's own input BN)."""

    __slots__ = ("conv", "bn")

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d):
        self.conv, self.bn = conv, bn

    def __call__(self, x: torch.Tensor, input_bn: tuple = ()) -> tuple[torch.Tensor, tuple]:
        conv, bn = self.conv, self.bn
        (weight, bias, running_mean, running_var), _, counted = _bn_reads(bn)
        y, mean, var = _conv_bn_defer_stage(x, conv._parameters["weight"], running_mean, running_var, conv.stride,
                                            conv.padding, conv.dilation, bn.momentum, None, counted, *input_bn)
        return y, (mean, var, weight, bias, bn.eps)


# ---- folded: one conv_act_stage per stage, BN folded when the plan is made ----


def _fold_inputs(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor | None, ...]:
    # what a fold reads, and num_batches_tracked: aten's batch_norm moves the running statistics without a version
    # bump (pytorch issue 13402), but every forward that moves them counts the batch with an in-place += 1
    p, bp, bb = conv._parameters, bn._parameters, bn._buffers
    return p["weight"], p.get("bias"), bp.get("weight"), bp.get("bias"), bb.get("running_mean"), bb.get("running_var"), \
        bb.get("num_batches_tracked")


def _stamp(tensors) -> tuple:
    # an in-place update (optimizer step, load_state_dict's copy_) bumps _version; `.to()` / `p.data = ...` move storage
    return tuple(None if t is None else (t._version, t.data_ptr(), t.requires_grad) for t in tensors)


class Folded:
    """act(conv(x, W s) + b (+ residual)), bn folded into the conv: one resnet_fused::conv_act_stage call.

    x: the layer's input, standing for this stage's (whose shape is input_shape) in dtype, device, layout and need
    of a gradient; residual: whether one is added, residual_grad: whether it needs a gradient; the fold comes from
    the layer's FoldCache under `name` (one dense copy per conv, whatever the number of plans; a CPU plan holds its
    own oneDNN-prepacked copy, the layout oneDNN picks for its input shape). shift: added to the folded bias (a
    projection shortcut's BN shift joining this stage's output); bias=False: the folded bias left out (this stage
    is that shortcut), kept as `shift`. pad: zero channels appended to the input per call and to the folded weight
    here."""

    __slots__ = ("conv", "bn", "inputs", "stamp", "eps", "weight", "bias", "shift", "args", "pad")

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, act: Activation, input_shape, x: torch.Tensor,
                 residual: bool = False, *, cache: FoldCache, name: str, residual_grad: bool = False, bias: bool = True,
                 shift: torch.Tensor | None = None, pad: int = 0):
        self.conv, self.bn, self.eps, self.pad = conv, bn, bn.eps, pad
        self.inputs = _fold_inputs(conv, bn)
        self.stamp = _stamp(self.inputs)
        weight, folded_bias = cache.get(name, conv, bn)
        if pad:
            weight = pad_channels(weight, pad)
            input_shape = (input_shape[0], input_shape[1] + pad, *input_shape[2:])
        if shift is not None:  # rounded once from fp64
            folded_bias = cache.summed(name, folded_bias, shift)
        self.shift = folded_bias if not bias else None
        folded_bias = folded_bias if bias else None
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or residual_grad)
        fused = _fuses(x, input_shape, weight, act, residual, conv.groups, wants_grad, folded_bias is not None)
        if fused and x.device.type == "cpu":  # reordered for oneDNN once, not per call
            weight = onednn.prepack_conv_weight(weight, conv.stride, conv.padding, conv.dilation, conv.groups, input_shape)
        elif folded_bias is not None and not wants_grad and _bias_in_fp32(x.device, fused, act, residual):
            folded_bias = folded_bias.float()  # once here, not per call
        self.weight, self.bias = weight, folded_bias
        self.args = (conv.stride, conv.padding, conv.dilation, conv.groups, act.name, act.alpha, fused)

    def valid(self) -> bool:
        inputs = _fold_inputs(self.conv, self.bn)
        return (all(a is b for a, b in zip(inputs, self.inputs)) and _stamp(inputs) == self.stamp
                and self.bn.eps == self.eps)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return _conv_act_stage(pad_channels(x, self.pad), self.weight, self.bias, residual, *self.args)


def _bias_in_fp32(device: torch.device, fused: bool, act: Activation, residual: bool) -> bool:
    """Whether conv_act_stage (csrc/conv_act_stage.cpp) adds a folded bias in fp32: in our epilogue pass (CUDA: any
    bias; CPU: beside a residual or an activation) and in our cuDNN graph; not in aten's or oneDNN's fused calls, nor
    in aten's conv (their bias in the input's dtype)."""
    if device.type == "cuda":
        return not (fused and act.name == "relu" and residual)
    return not fused and (residual or not act.is_identity)


def _fuses(x: torch.Tensor, input_shape, weight: torch.Tensor, act: Activation, residual: bool, groups: int,
           wants_grad: bool, bias: bool) -> bool:
    """Whether the convolution takes the epilogue: oneDNN's post-ops on the CPU (a dtype onednn.runs, at least
    onednn.MIN_OUTPUT outputs); on CUDA cuDNN's conv + add + bias + ReLU (cudnn.cudnn_fuses) where a residual joins a
    ReLU, else, with the cuDNN graphs on, our conv + epilogue graph (cudnn.graph_fuses); never where a gradient is
    wanted. A tuner's Variant in force (onednn, cudnn_fused) overrides the size rule / turns cuDNN's one-call paths
    off."""
    if wants_grad:
        return False
    variant = backends.variant()
    if x.device.type == "cpu":
        outputs = input_shape[0] * input_shape[2] * input_shape[3] * weight.shape[0]  # at stride 1, as onednn_inference counts
        pays = outputs >= onednn.MIN_OUTPUT if variant.onednn is None else variant.onednn
        return pays and onednn.runs(x.dtype)
    if not (torch.backends.cudnn.enabled and variant.cudnn_fused is not False):
        return False
    if act.name == "relu" and residual:
        # cuDNN's layout rule, as the routed call reads it (a 1x1 weight or 1x1 map is contiguous in both layouts)
        return cudnn.cudnn_fuses(input_shape, weight.shape, x.dtype, cudnn._channels_last(x, weight), groups,
                                 torch.backends.cudnn.allow_tf32)
    return cudnn.graph_fuses(input_shape, x, weight, act, groups, bias, residual)


class Chain:
    """A layer's plan for inputs like x: its stages run in order, `valid` while every folded stage is. On the CPU they
    run in the memory arena (outputs, and in training the tensors saved for the backward, in blocks earlier calls
    freed: ops/arena.py)."""

    __slots__ = ("run", "stages", "arena")

    def __init__(self, run: Callable, stages: list, x: torch.Tensor):
        self.run, self.stages = run, [s for s in stages if isinstance(s, Folded)]
        self.arena = arena._arena() if x.device.type == "cpu" else None  # resnet_fused._C with the arena installed

    def valid(self) -> bool:
        return all(s.valid() for s in self.stages)

    def __call__(self, *args):
        if self.arena is None:
            return self.run(*args)
        self.arena.cpu_arena_enter()  # CPU: outputs in memory the last call freed (ops/arena.py)
        try:
            return self.run(*args)
        finally:
            self.arena.cpu_arena_exit()


def stage_input_shapes(x_shape, convs) -> list[tuple]:
    """The input shape of each conv of a chain fed x of x_shape."""
    shapes, shape = [], tuple(x_shape)
    for conv in convs:
        shapes.append(shape)
        shape = conv_output_shape(shape, conv.weight.shape, conv.stride, conv.padding, conv.dilation)
    return shapes
