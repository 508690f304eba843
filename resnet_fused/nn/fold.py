"""Eval-mode BN folding, cached per conv-BN pair and refreshed whenever a parameter or buffer changes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from resnet_fused.ops._bn_math import fold_bn


def _stamp(t: torch.Tensor | None):
    # an in-place update (optimizer step, load_state_dict's copy_) bumps _version; .to() / .half() give new storage
    return None if t is None else (t.data_ptr(), t._version, t.dtype, t.device)


class FoldCache:
    """name -> (stamp, folded weight, folded bias), and name -> (folded weight, input shape, the weight
    prepacked for that shape). Not saved: pickling or copying starts it empty."""

    def __init__(self):
        self._entries: dict[str, tuple] = {}
        self._prepacked: dict[str, tuple] = {}

    def get(self, name: str, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        stamp = (tuple(_stamp(t) for t in tensors), bn.eps)
        hit = self._entries.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[1], hit[2]
        with torch.no_grad():
            weight, bias = fold_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        self._entries[name] = (stamp, weight, bias)
        return weight, bias

    def prepacked(self, name: str, input_shape: torch.Size, prepack: Callable[[], torch.Tensor]) -> torch.Tensor:
        """prepack() of name's current folded weight (the last get()) for inputs of input_shape; made
        again when the fold is refreshed or the input shape changes (one shape kept per conv)."""
        folded = self._entries[name][1]
        hit = self._prepacked.get(name)
        if hit is not None and hit[0] is folded and hit[1] == input_shape:
            return hit[2]
        packed = prepack()
        self._prepacked[name] = (folded, input_shape, packed)
        return packed

    def __getstate__(self):
        return {"_entries": {}, "_prepacked": {}}

    def __deepcopy__(self, memo):
        return FoldCache()
