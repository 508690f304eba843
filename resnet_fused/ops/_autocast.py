"""aten's autocast rule for convolutions, for the custom ops that run one: without it an op is a
fallthrough for autocast, and an fp32 model's fused convolutions would run in fp32 under AMP."""

from __future__ import annotations

from collections.abc import Sequence

import torch

_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_lib = torch.library.Library("resnet_fused", "FRAGMENT")


def _cast(t, device: str, dtype: torch.dtype):
    # aten's is_eligible: a floating tensor on the autocast device, float64 excepted
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device and t.dtype != torch.float64:
        return t.to(dtype)
    return t


def _kernel(op, device: str, key: str, cast: frozenset[int]):
    def kernel(_keyset, *args, **kwargs):
        dtype = torch.get_autocast_dtype(device)
        args = [_cast(a, device, dtype) if i in cast else a for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))):
            return op(*args, **kwargs)

    return kernel


def lower_precision_fp(name: str, cast: Sequence[int], device_types: Sequence[str] = ("cpu", "cuda")) -> None:
    """Gives op resnet_fused::name conv2d's autocast behaviour ("lower_precision_fp"): in an autocast region,
    its floating tensor arguments at positions `cast` run in the autocast dtype (torch.get_autocast_dtype, so
    fp16 or bf16 as the region says), and the op below autocast; the casts are recorded by autograd as aten's."""
    op = getattr(torch.ops.resnet_fused, name).default
    for device in device_types:
        _lib.impl(name, _kernel(op, device, _KEYS[device], frozenset(cast)), _KEYS[device], with_keyset=True)
