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


def has_gpu() -> bool:
    return torch.cuda.is_available()


def device_backend_params(cpu_variants=("cpu",)):
    """pytest params (device, backend) for the GPU tests: ("cuda", "cuda") and ("cuda", "triton"), each
    skipped visibly where this machine cannot run it, plus CPU variants that run the same test logic on
    CPU tensors ("cpu": the C++ kernels; "triton": Triton's interpreter, only on a machine without GPU)."""
    import pytest

    gpu = has_gpu()
    params = [
        pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.skipif(
            not (gpu and backends.extension_has_cuda()), reason="needs a CUDA GPU and resnet_fused._C built with CUDA")),
        pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.skipif(
            not (gpu and backends.has_triton()), reason="needs a CUDA GPU and triton")),
    ]
    for name in cpu_variants:
        if name == "cpu":
            ok, why = backends.has_extension(), "resnet_fused._C is not built"
        elif name == "triton":
            ok, why = interpreted_triton() and backends.has_triton(), "Triton on CPU tensors runs only under TRITON_INTERPRET=1 (no GPU)"
        else:
            ok, why = True, ""
        params.append(pytest.param("cpu", name, id=f"cpu-{name}", marks=pytest.mark.skipif(not ok, reason=why)))
    return params


def rel_err(a: torch.Tensor, exact: torch.Tensor) -> float:
    """||a - exact||_F / ||exact||_F in float64 (0 for empty or all-zero exact)."""
    d = (a.double() - exact.double()).norm().item()
    n = exact.double().norm().item()
    return d / n if n else d


# The small blocks the GPU tests (compile, CUDA graphs, determinism) share, so that the Triton conv's
# autotuning and compilation for their shapes is paid once per session: stride 2 with a projection
# shortcut (conv1x1 + BN), odd channel counts, input (2, 16, 9, 9) -> (2, C, 5, 5).
BLOCK_INPUT = (2, 16, 9, 9)


def randomize_bn(model: torch.nn.Module, gain=(0.5, 1.5)) -> torch.nn.Module:
    """Non-default BN parameters and running statistics, so that eval mode tests something. Deep networks
    take a smaller gain, so that activations and gradients keep their scale through the blocks."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(*gain)
                    m.bias.uniform_(-0.3, 0.3)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def make_block(kind: str, backend: str, device, dtype, fmt=torch.channels_last) -> torch.nn.Module:
    """FusedBasicBlock(16, 24, stride 2) or FusedBottleneck(16, 8, stride 2) (width 8, 32 out), each with
    a conv1x1 + BN projection shortcut, randomized BN, on `device` in `dtype` and `fmt`."""
    from torch import nn

    from resnet_fused.nn import FusedBasicBlock, FusedBottleneck

    cls, planes = (FusedBasicBlock, 24) if kind == "basic" else (FusedBottleneck, 8)
    out = planes * cls.expansion
    down = nn.Sequential(nn.Conv2d(BLOCK_INPUT[1], out, 1, 2, bias=False), nn.BatchNorm2d(out))
    block = randomize_bn(cls(BLOCK_INPUT[1], planes, 2, down, backend=backend))
    return block.to(device=device, dtype=dtype, memory_format=fmt)


def block_results(model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor | None) -> list[torch.Tensor]:
    """One step of model in its current mode: [output] in eval (no grad); training: [output, grad input,
    all parameter grads as one vector, all float buffers as one vector] (the whole-block 2-norm view:
    single (C,) grads of a small block are a handful of rounding errors, tests/test_nn.py)."""
    if not model.training:
        with torch.no_grad():
            return [model(x)]
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad)
    return [out.detach(), x.grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
            torch.cat([b.reshape(-1) for b in model.buffers() if b.is_floating_point()])]


def counters(model: torch.nn.Module) -> list[int]:
    return [b.item() for b in model.buffers() if not b.is_floating_point()]
