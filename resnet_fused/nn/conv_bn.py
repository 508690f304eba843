"""Conv2d -> BatchNorm2d (-> + residual) (-> activation) as one fused call: FusedConvBNAct, FusedConvBNReLU."""

from __future__ import annotations

import functools

import torch
from torch import nn

from resnet_fused import backends, tuning
from resnet_fused.activations import activation
from resnet_fused.ops import arena
from resnet_fused.ops.conv_bn_act import BnSpec, ConvSpec, conv_act, conv_bn_act, conv_bn_act_stage, route, stage_applies
from resnet_fused.ops.conv_stats import DeferredBnReLU, conv_bn_defer
from resnet_fused.ops.onednn import onednn_inference, prepack_conv_weight
from resnet_fused.nn.batchnorm import batch_norm_call, is_plain_batchnorm, lowers_to_inductor, uses_batch_stats
from resnet_fused.nn import plan
from resnet_fused.nn.fold import FoldCache


def is_fusable_conv(conv: nn.Module) -> bool:
    """An nn.Conv2d with zero padding: what the fused path computes exactly."""
    return type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)


def conv_bn_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None = None,
                    act="relu", *, backend: str | None = None, cache: FoldCache | None = None, name: str = "",
                    process_group=None, input_bn: DeferredBnReLU | None = None) -> torch.Tensor:
    """act(bn(conv(x)) + residual), with bn's exact training / eval semantics (act: anything
    resnet_fused.activations.activation takes; process_group: batch statistics synchronized across
    ranks, as nn.SyncBatchNorm; input_bn: a BN + ReLU deferred by conv_bn_defer, which conv applies to
    x as it loads). An unfused pair runs module by module."""
    if not (is_fusable_conv(conv) and is_plain_batchnorm(bn)):  # a correct unfused path
        if input_bn is not None:
            x = input_bn.materialize(x, backend=backend)
        y = bn(conv(x))
        return activation(act)(y + residual if residual is not None else y)
    return fused_conv_bn_forward(conv, bn, x, residual, act, backend=backend, cache=cache, name=name,
                                 process_group=process_group, input_bn=input_bn)


def fused_conv_bn_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None = None,
                          act="relu", *, backend: str | None = None, cache: FoldCache | None = None, name: str = "",
                          process_group=None, input_bn: DeferredBnReLU | None = None) -> torch.Tensor:
    """conv_bn_forward for a pair known to have nn.Conv2d (zero padding) and nn.BatchNorm2d semantics
    (bn may be a view with BatchNorm2d's attributes). On route()'s "fold" path the folded weights
    come from `cache` (computed once, refreshed when a parameter or buffer changes; on the CPU also
    prepacked for oneDNN once per input shape)."""
    impl = backends.resolve(backend, x)
    if input_bn is None and stage_applies(x, impl, process_group):  # cpu / cuda: one C++ op, or the folded conv
        if uses_batch_stats(bn) or cache is None or torch.compiler.is_compiling() or _params_need_grad(conv, bn):
            call = batch_norm_call(bn)  # bn may be a view (a FrozenBatchNorm2d as an eval nn.BatchNorm2d)
            return conv_bn_act_stage(x, ConvSpec(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups),
                                     BnSpec(call.running_mean, call.running_var, call.weight, call.bias, call.use_batch_stats,
                                            call.momentum, call.eps), residual, activation(act))
        weight, bias = cache.get(name, conv, bn)
        return _folded_conv_act(conv, x, weight, bias, residual, act, impl, cache, name)
    call = batch_norm_call(bn)
    if folds(conv, bn, x, residual, backend=backend, cache=cache, process_group=process_group, input_bn=input_bn):
        weight, bias = cache.get(name, conv, bn)
        return _folded_conv_act(conv, x, weight, bias, residual, act, backend, cache, name)
    return conv_bn_act(x, conv.weight, conv.bias, call.running_mean, call.running_var, call.weight, call.bias,
                       training=call.use_batch_stats, momentum=call.momentum, eps=call.eps, residual=residual, act=act,
                       input_bn=input_bn, backend=backend, process_group=process_group, stride=conv.stride,
                       padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def _params_need_grad(conv: nn.Conv2d, bn) -> bool:
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (conv.weight, conv.bias, bn.weight, bn.bias))


def folds(conv: nn.Conv2d, bn, x: torch.Tensor, residual: torch.Tensor | None = None, *, backend: str | None,
          cache: FoldCache | None, process_group=None, input_bn: DeferredBnReLU | None = None) -> bool:
    """Whether fused_conv_bn_forward runs this pair on route()'s "fold" path (the folded weights from `cache`):
    route() can answer "fold" only with running statistics, so training goes straight to conv_bn_act."""
    if cache is None or input_bn is not None or uses_batch_stats(bn) or torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    params_need_grad = _params_need_grad(conv, bn)
    return route(x, conv.groups, False, backends.resolve(backend, x), conv_bias=conv.bias, process_group=process_group,
                 params_need_grad=params_need_grad, any_needs_grad=params_need_grad or grad and any(
                     t is not None and t.requires_grad for t in (x, residual))) == "fold"


def _folded_conv_act(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     residual: torch.Tensor | None, act, backend: str | None, cache: FoldCache, name: str) -> torch.Tensor:
    if onednn_inference(x, weight, bias, residual, backend):  # reordered for oneDNN once, not per call
        weight = cache.prepacked(name, x.shape, lambda: prepack_conv_weight(
            weight, conv.stride, conv.padding, conv.dilation, conv.groups, x.shape))
    with arena.scope(x):  # CPU: the output in memory the last call freed (no page faults)
        return conv_act(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, residual, act, backend=backend)


def conv_bn_projection_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, a: torch.Tensor, shortcut_conv: nn.Conv2d,
                               shortcut_bn: nn.BatchNorm2d, x: torch.Tensor, *, backend: str | None, cache: FoldCache,
                               name: str, shortcut_name: str, process_group=None,
                               input_bn: DeferredBnReLU | None = None) -> torch.Tensor:
    """relu(bn(conv(a)) + shortcut_bn(shortcut_conv(x))): a block's last stage and its projection shortcut, both
    pairs fusable. Where both fold, relu(conv(a, W s) + b + conv(x, W_d s_d) + b_d) runs as
    relu(conv(a, W s) + conv(x, W_d s_d) + (b + b_d)): the shortcut's conv without a bias (on cuDNN a bias is a
    pass of its own) feeds the residual, and its BN shift b_d rides on the last conv's bias."""
    # the shortcut's output needs a gradient exactly when x does (its parameters need none where it folds)
    if folds(shortcut_conv, shortcut_bn, x, backend=backend, cache=cache, process_group=process_group) and folds(
            conv, bn, a, x, backend=backend, cache=cache, process_group=process_group, input_bn=input_bn):
        shortcut_weight, shortcut_shift = cache.get(shortcut_name, shortcut_conv, shortcut_bn)
        identity = _folded_conv_act(shortcut_conv, x, shortcut_weight, None, None, False, backend, cache, shortcut_name)
        weight, bias = cache.get(name, conv, bn)
        return _folded_conv_act(conv, a, weight, cache.summed(name, bias, shortcut_shift), identity, True, backend, cache, name)
    identity = fused_conv_bn_forward(shortcut_conv, shortcut_bn, x, act=None, backend=backend, cache=cache,
                                     name=shortcut_name, process_group=process_group)
    return fused_conv_bn_forward(conv, bn, a, identity, backend=backend, cache=cache, name=name, process_group=process_group,
                                 input_bn=input_bn)


def can_defer(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether conv_bn_defer computes this pair exactly: a bias-free nn.Conv2d, then nn.BatchNorm2d in training."""
    return is_fusable_conv(conv) and conv.bias is None and is_plain_batchnorm(bn) and bn.training


def conv_bn_defer_forward(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor, *, backend: str | None = None,
                          input_bn: DeferredBnReLU | None = None) -> tuple[torch.Tensor, DeferredBnReLU]:
    """(conv(x), bn's BN + ReLU deferred to the next convolution) with bn's training side effects
    (running statistics, num_batches_tracked); see resnet_fused.ops.conv_stats.conv_bn_defer. Requires can_defer(conv, bn)."""
    call = batch_norm_call(bn)
    return conv_bn_defer(x, conv.weight, call.running_mean, call.running_var, call.weight, call.bias,
                             stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                             momentum=call.momentum, eps=call.eps, input_bn=input_bn, backend=backend)


class FusedConvBNAct(nn.Module):
    """Conv2d -> BatchNorm2d (-> activation) in one fused call; submodules `conv` and `bn` are the ordinary
    nn.Conv2d and nn.BatchNorm2d, so optimizers, initializers and checkpoints see what they expect.
    ``act``: a name of resnet_fused.activations.ACTIVATIONS, an activation module or None (see
    activations.activation); kept as ``self.act``, an Activation. forward(x, residual=None) also takes a
    residual added before the activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = False, act="relu", eps: float = 1e-5, momentum: float | None = 0.1,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, **factory)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, **factory)
        self.act = activation(act)
        self.backend = backend
        self.process_group = None  # set to synchronize BN statistics across ranks (nn.SyncBatchNorm)
        self._folds = FoldCache()
        self._plans = plan.PlanCache()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: the routed forward, or the eager one for Inductor to lower
            if lowers_to_inductor(self.backend, x, self.bn):
                return self._run_eager(x, residual)
            return tuning.run(self, x, residual) if backends.tuned(self.backend, x) else self._run_fused(x, self.backend, residual)
        return self._planned(x, self.backend, residual)

    # the tuner's three ways to run this layer: planned or routed on a backend (a Variant in force), or eager
    def _planned(self, x: torch.Tensor, backend: str | None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """This layer on its plan for the signature of (x, residual) on the backend setting `backend`."""
        key = plan.layer_signature(self, x, backend) + (self.act, plan.tensor_signature(residual))
        return self._plans.get(key, lambda: self._make_plan(x, backend, residual))(x, residual)

    def _make_plan(self, x: torch.Tensor, backend: str | None, residual: torch.Tensor | None):
        """This layer's plan for inputs like (x, residual) (resnet_fused.nn.plan)."""
        if backends.tuned(backend, x):
            return functools.partial(tuning.run, self)
        if plan.stage_backend(self, x, backend, [(self.conv, self.bn)]) is None:
            return lambda x, residual: self._run_fused(x, backend, residual)
        return plan.conv_bn_plan(self.conv, self.bn, self.act, x, residual, cache=self._folds, name="conv")

    def _run_fused(self, x: torch.Tensor, backend: str | None, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv_bn_forward(self.conv, self.bn, x, residual, self.act, backend=backend, cache=self._folds, name="conv",
                               process_group=self.process_group)

    def _run_eager(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(self.conv(x))  # a fresh tensor: the add (and a ReLU) in place, as an eager model would
        if residual is not None:
            y += residual
        return torch.relu_(y) if self.act.name == "relu" else self.act(y)

    def extra_repr(self) -> str:
        return f"act={self.act}, backend={self.backend!r}"


class FusedConvBNReLU(FusedConvBNAct):
    """FusedConvBNAct with ReLU (``relu=True``) or no activation (``relu=False``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
                 bias: bool = False, relu: bool = True, eps: float = 1e-5, momentum: float | None = 0.1,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         "relu" if relu else "none", eps, momentum, backend, device, dtype)

    @property
    def relu(self) -> bool:
        return self.act.name == "relu"
