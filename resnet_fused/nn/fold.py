"""Eval-mode BN folding, cached per conv-BN pair and refreshed whenever a folded input changes."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from resnet_fused.ops._bn_math import fold_bn


def _inputs(conv: nn.Conv2d, bn) -> tuple[torch.Tensor | None, ...]:
    """What the fold reads, and num_batches_tracked: aten's batch_norm updates the running statistics in
    place without bumping their version counters (pytorch issue 13402), but nn.BatchNorm2d's forward, and
    the fused path's batch_norm_call, count every batch that moves them with an in-place += 1 (a bump; with
    momentum=None too). A BN whose num_batches_tracked was set to None is not counted: F.batch_norm's updates
    of its statistics go unseen."""
    return (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, getattr(bn, "num_batches_tracked", None))


def _stamp(t: torch.Tensor | None):
    # an in-place update (optimizer step, load_state_dict's copy_, a user's edit under no_grad) bumps _version;
    # .to() / .half() / `p.data = ...` give new storage; edits through `.data` are seen by neither (nor by autograd)
    return None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)


def _ref(t: torch.Tensor | None):
    # the tensor's identity, without keeping it alive: another tensor assigned in its place may have the same
    # storage and version (`bn.running_var = bn.running_var.data` starts a new version counter)
    return None if t is None else weakref.ref(t)


def _same(refs: tuple, tensors: tuple) -> bool:
    return all(t is None if r is None else r() is t for r, t in zip(refs, tensors))


class FoldCache:
    """name -> (identities, stamps, folded weight, folded bias); name -> (folded weight, input shape, the
    weight prepacked for that shape); name -> (folded bias, shift, their sum). Not saved: pickling or copying
    starts it empty."""

    def __init__(self):
        self._entries: dict[str, tuple] = {}
        self._prepacked: dict[str, tuple] = {}
        self._sums: dict[str, tuple] = {}

    def get(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = _inputs(conv, bn)
        stamp = (tuple(_stamp(t) for t in tensors), bn.eps)
        hit = self._entries.get(name)
        if hit is not None and hit[1] == stamp and _same(hit[0], tensors):
            return hit[2], hit[3]
        # plain tensors also when made under inference_mode: a later call with grad enabled may save them for backward
        with torch.inference_mode(False), torch.no_grad():
            weight, bias = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        self._entries[name] = (tuple(_ref(t) for t in tensors), stamp, weight, bias)
        return weight, bias

    def prepacked(self, name: str, input_shape: torch.Size, prepack: Callable[[], torch.Tensor]) -> torch.Tensor:
        """prepack() of name's current folded weight (the last get()) for inputs of input_shape; made
        again when the fold is refreshed or the input shape changes (one shape kept per conv)."""
        folded = self._entries[name][2]
        hit = self._prepacked.get(name)
        if hit is not None and hit[0] is folded and hit[1] == input_shape:
            return hit[2]
        packed = prepack()
        self._prepacked[name] = (folded, input_shape, packed)
        return packed

    def summed(self, name: str, bias: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """bias + shift, rounded once from fp64 (name's folded bias, and the folded BN shift of a projection
        shortcut that joins its output); made again when either is refolded."""
        hit = self._sums.get(name)
        if hit is not None and hit[0] is bias and hit[1] is shift:
            return hit[2]
        total = (bias.double() + shift.double()).to(bias.dtype)
        self._sums[name] = (bias, shift, total)
        return total

    def __getstate__(self):
        return {"_entries": {}, "_prepacked": {}, "_sums": {}}

    def __deepcopy__(self, memo):
        return FoldCache()
