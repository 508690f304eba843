"""Test helpers: random activations, and the tolerance rule (fused error <= ~2x eager's own error)."""

import os

import torch

from resnet_fused import backends

CL, NCHW = torch.channels_last, torch.contiguous_format
FORMATS = [NCHW, CL]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def backend_params(include_triton: bool = True):
    """pytest params for every backend, skipped (visibly) where this machine cannot run it."""
    import pytest

    avail = backends.available()
    names = ["cpu", "cuda", "triton", "torch"] if include_triton else ["cpu", "cuda", "torch"]
    reasons = {
        "cpu": "resnet_fused._C is not built",
        "cuda": "needs a CUDA GPU and the extension built with CUDA",
        "triton": "needs a CUDA GPU or TRITON_INTERPRET=1",
    }
    return [pytest.param(n, marks=pytest.mark.skipif(not avail[n], reason=reasons.get(n, ""))) for n in names]


def activation(shape, dtype, fmt, device="cpu", scale=1.0, offset=0.0):
    """N(offset, scale^2) values, rounded to dtype, laid out in fmt: never zeros, never all equal."""
    x = torch.randn(shape) * scale + offset
    return x.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def is_layout(t: torch.Tensor, fmt) -> bool:
    return t.is_contiguous(memory_format=fmt)


def max_err(a: torch.Tensor, exact: torch.Tensor, norm: str = "max") -> float:
    if not a.numel():
        return 0.0
    d = a.double() - exact.double()
    return d.abs().max().item() if norm == "max" else d.norm().item()


def assert_within_eager_error(fused, eager, exact, what: str, factor: float = 2.0, norm: str = "max"):
    """|fused - exact| <= factor * |eager - exact| + one ulp at max(|exact|, 1).

    `exact` is the float64 result, `eager` plain PyTorch in the fused result's dtype. The tests' inputs
    are O(1), so one ulp at 1 is the resolution of the arithmetic even where a result cancels to ~0.
    norm="max" (elementwise worst case) for ops and blocks; norm="fro" (2-norm) for whole networks.
    """
    assert fused.shape == exact.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    assert fused.dtype == eager.dtype, f"{what}: dtype {fused.dtype} != eager {eager.dtype}"
    assert not torch.isnan(fused).any(), f"{what}: NaN in the fused result (an element left unwritten?)"
    err, eager_err = max_err(fused, exact, norm), max_err(eager, exact, norm)
    scale = (exact.abs().max().item() if norm == "max" else exact.double().norm().item()) if exact.numel() else 0.0
    ulp = torch.finfo(fused.dtype).eps * max(scale, 1.0)
    assert err <= factor * eager_err + ulp, f"{what}: error {err:.3g} > {factor} x eager's {eager_err:.3g} + {ulp:.3g}"


def interpreted_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
