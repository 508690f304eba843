"""The class fuse_ gives the conv of a conv -> BN (-> activation) run whose order of calls is known: the
conv computes the whole run in one fused call, and the BN (and the activation module, if it is one of its
own) that follow become pass-through twins (resnet_fused.nn.pass_through), their parameters and buffers
where they were."""

from __future__ import annotations

import functools

import torch
from torch import nn

from resnet_fused import backends, tuning
from resnet_fused.activations import Activation
from resnet_fused.nn import plan
from resnet_fused.nn.batchnorm import lowers_to_inductor
from resnet_fused.nn.conv_bn import fused_conv_bn_forward
from resnet_fused.nn.norms import is_frozen_bn, norm_view


class FusedConvBNActHead(nn.Conv2d):
    """act(bn(conv(x))) for a conv whose fuse_-given attributes name the run: `_resnet_fused_bn` (the norm),
    `_resnet_fused_activation` (the Activation: the norm's own, the module's after it, or none),
    `_resnet_fused_act` (that module, or None). Runs a plan per input signature (resnet_fused.nn.plan) as
    FusedConvBNAct does, and is tuned like it with backend="tune" (`_planned` / `_run_fused` / `_run_eager`)."""

    @property
    def act(self) -> Activation:  # what tuning's signature reads
        return self._resnet_fused_activation

    @property
    def process_group(self):  # tuning.run: synchronized BN statistics use the rules
        return self._resnet_fused_group

    def forward(self, x):
        if torch.compiler.is_compiling():  # traced: the routed forward, or the eager one for Inductor to lower
            if lowers_to_inductor(self._resnet_fused_backend, x, self._resnet_fused_bn):
                return self._run_eager(x)
            return tuning.run(self, x) if backends.tuned(self._resnet_fused_backend, x) else self._run_fused(
                x, self._resnet_fused_backend)
        return self._planned(x, self._resnet_fused_backend)

    # the tuner's three ways to run this run: planned or routed on a backend (a Variant in force), or eager
    def _planned(self, x, backend):
        """This run on its plan for x's signature on the backend setting `backend` (resnet_fused.nn.plan)."""
        key = plan.layer_signature(self, x, backend, (self._resnet_fused_bn,))
        return plan.plans_of(self).get(key, lambda: self._make_plan(x, backend))(x)

    def _make_plan(self, x, backend):
        if backends.tuned(backend, x):
            return functools.partial(tuning.run, self)
        bn = norm_view(self._resnet_fused_bn)
        if plan.stage_backend(self, x, backend, [(self, bn)]) is None:  # a timm norm, a Conv2d subclass, ...
            return functools.partial(self._run_fused, backend=backend)
        return plan.conv_bn_plan(self, bn, self._resnet_fused_activation, x, None, cache=self._resnet_fused_folds, name="conv")

    def _run_fused(self, x, backend):
        bn = self._resnet_fused_bn
        return fused_conv_bn_forward(self, norm_view(bn), x, None, self._resnet_fused_activation, backend=backend,
                                     cache=self._resnet_fused_folds, name="conv",
                                     process_group=None if is_frozen_bn(bn) else self._resnet_fused_group)

    def _run_eager(self, x):
        """The run as its modules compute it (a BatchNormAct2d's own activation included)."""
        bn, act = self._resnet_fused_bn, self._resnet_fused_act
        y = bn._resnet_fused_original_class.forward(bn, nn.Conv2d.forward(self, x))
        return act._resnet_fused_original_class.forward(act, y) if act is not None else y
