"""Which implementation runs an op: ``"auto" | "cuda" | "triton" | "cpu" | "torch"``.

Set it globally, for a block of code, or per call (the ``backend=`` argument of every function in
:mod:`resnet_fused.functional`); the innermost setting wins::

    resnet_fused.backends.set_backend("triton")
    with resnet_fused.backends.use("torch"):
        ...

``"auto"`` sends CPU tensors to the C++ CPU kernels and CUDA tensors to the C++/CUDA kernels, else to
Triton, else to plain PyTorch; fp64 tensors (gradcheck) always go to plain PyTorch, the only
backend that computes in fp64. A named backend that cannot take the tensors raises an error that
says why.

``"tune"`` is ``"auto"`` for single ops; the fused blocks and FusedConvBNReLU instead time every
implementation that can run them here, eager PyTorch included, the first time they see a new input
signature, and keep the fastest (:mod:`resnet_fused.tuning`; ``resnet_fused.tuning_report()`` lists the choices).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "tune", "cuda", "triton", "cpu", "torch")

_global_backend = "auto"
_scoped_backend: contextvars.ContextVar[str | None] = contextvars.ContextVar("resnet_fused_backend", default=None)


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"resnet_fused: unknown backend {name!r}; choose one of {BACKENDS}")
    return name


def set_backend(name: str) -> None:
    """Set the backend used when neither a call nor an enclosing ``use(...)`` names one."""
    global _global_backend
    _global_backend = _check_name(name)


def get_backend() -> str:
    """The backend in force here (before ``"auto"`` is resolved for a tensor)."""
    scoped = _scoped_backend.get()
    return scoped if scoped is not None else _global_backend


@dataclasses.dataclass(frozen=True)
class Variant:
    """How a fused layer runs on its backend, where a backend has more than one way (the tuner's
    candidates; None everywhere: the rules). onednn: CPU inference through oneDNN's fused convolution
    (True) or aten's convolution + the fused epilogue (False); cudnn_fused: CUDA inference through cuDNN's
    fused conv + bias + add + ReLU; defer: training, a block's inner BN + ReLU applied by the next
    convolution as it loads (Triton's conv prologue, cuDNN's fused graphs) rather than written (None: on
    Triton, and on CUDA where resnet_fused.ops.cudnn.defers_bn_relu says so); pad_channels: a conv -> BN layer
    whose input channels are not a multiple of cuDNN's vector width runs on its input and weight zero-padded to
    one (resnet_fused.ops.cudnn.padded_channels: the RGB stem, 3 -> 8 channels in fp16 / bf16), so that the
    tensor-core and fused engines take it (MLPerf's ResNet-50 pads its images the same way)."""

    onednn: bool | None = None
    cudnn_fused: bool | None = None
    defer: bool | None = None
    pad_channels: bool | None = None


RULES = Variant()
_variant: contextvars.ContextVar[Variant] = contextvars.ContextVar("resnet_fused_variant", default=RULES)


def variant() -> Variant:
    """The Variant in force here (RULES outside a tuner's call)."""
    return _variant.get()


@contextlib.contextmanager
def use_variant(v: Variant):
    token = _variant.set(v)
    try:
        yield
    finally:
        _variant.reset(token)


@contextlib.contextmanager
def use(name: str):
    """Run the enclosed code with ``name`` as the backend."""
    token = _scoped_backend.set(_check_name(name))
    try:
        yield
    finally:
        _scoped_backend.reset(token)


# ---- what is available on this machine (found once, at import) ----


def _cpu_kernels_module() -> str:
    # the CPU kernels built for the widest instruction set torch allows here (ATEN_CPU_CAPABILITY too)
    capability = torch.backends.cpu.get_cpu_capability()
    return "resnet_fused._cpu_avx2" if capability in ("AVX2", "AVX512") else "resnet_fused._cpu_default"


def _load_extension() -> str | None:
    try:
        from resnet_fused import _C  # noqa: F401  (the op schemas, and the CUDA kernels)

        try:
            importlib.import_module(_cpu_kernels_module())
        except ImportError:  # e.g. an AVX2 build missing on this platform
            importlib.import_module("resnet_fused._cpu_default")
    except ImportError as e:
        warnings.warn(f"resnet_fused: the compiled extension is unavailable ({e}); using Triton or plain PyTorch.", stacklevel=2)
        return str(e)
    from resnet_fused import _kernel_fakes  # the schemas' fake kernels (csrc/ops.cpp: set_python_module)

    _kernel_fakes.register()
    return None


_EXTENSION_ERROR = _load_extension()
_EXTENSION_HAS_CUDA = _EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "resnet_fused::bn_stats", "CUDA"
)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
# Triton reads TRITON_INTERPRET when a kernel is defined: this is the one place resnet_fused reads it
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_error() -> str | None:
    """Why resnet_fused._C could not be loaded, or None when it is loaded."""
    return _EXTENSION_ERROR


def has_extension() -> bool:
    return _EXTENSION_ERROR is None


def extension_has_cuda() -> bool:
    """Whether resnet_fused._C was built with its CUDA kernels."""
    return _EXTENSION_HAS_CUDA


def has_triton() -> bool:
    return _HAS_TRITON


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1 when resnet_fused was imported: Triton kernels run on CPU tensors (tests only)."""
    return _TRITON_INTERPRETED


def available() -> dict[str, bool]:
    """Backend name -> whether it can run on this machine."""
    return {
        "cpu": has_extension(),
        "cuda": extension_has_cuda() and torch.cuda.is_available(),
        "triton": has_triton() and (torch.cuda.is_available() or triton_interpreted()),
        "torch": True,
    }


# ---- choosing one for a call ----


def tuned(backend: str | None, x: torch.Tensor) -> bool:
    """Whether a fused layer with this backend setting picks its implementation by measurement."""
    return (backend if backend is not None else get_backend()) == "tune" and x.dtype != torch.float64


def inductor_lowers(backend: str | None, x: torch.Tensor) -> bool:
    """Whether a fused layer hands itself to torch.compile as the eager composition: while tracing,
    on the CPU, under "auto" / "tune". Inductor lowers conv + BN + ReLU (+ add) to oneDNN with its own
    epilogue fusion; our custom ops are opaque to it and would stop that (compile(fuse_(resnet18)) ran
    8.5 % slower than compile(resnet18) in training, 3 % in eval, on 2 CPU cores). A named backend
    keeps its ops under compile."""
    return (torch.compiler.is_compiling() and x.device.type == "cpu"
            and (backend if backend is not None else get_backend()) in ("auto", "tune"))


def resolve(backend: str | None, *tensors: torch.Tensor | None) -> str:
    """The concrete backend for a call on ``tensors`` (all on one device; None entries are skipped)."""
    ref = tensors[0] if tensors[0] is not None else next(t for t in tensors if t is not None)
    return _resolve(backend if backend is not None else get_backend(), ref.device.type, ref.dtype)


@functools.cache  # decided once per (setting, device type, dtype): what is available does not change after import
def _resolve(name: str, device: str, dtype: torch.dtype) -> str:
    _check_name(name)
    if dtype == torch.float64:
        return "torch"  # the kernels compute in fp32; fp64 (gradcheck) runs the plain-PyTorch path
    if name in ("auto", "tune"):  # "tune" chooses per block (resnet_fused.tuning); single ops take the rules
        if device == "cpu":
            return "cpu" if has_extension() else "torch"
        if device == "cuda":
            if extension_has_cuda():
                return "cuda"
            return "triton" if has_triton() else "torch"
        return "torch"
    why = None
    if name == "cpu" and device != "cpu":
        why = f"it takes CPU tensors, got {device} tensors"
    elif name == "cpu" and not has_extension():
        why = f"the compiled extension is unavailable ({extension_error()})"
    elif name == "cuda" and device != "cuda":
        why = f"it takes CUDA tensors, got {device} tensors"
    elif name == "cuda" and not extension_has_cuda():
        why = "resnet_fused._C was built without CUDA (or failed to load)"
    elif name == "triton" and not has_triton():
        why = "triton is not installed"
    elif name == "triton" and device != "cuda" and not (device == "cpu" and triton_interpreted()):
        why = f"it takes CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device} tensors"
    if why is not None:
        raise RuntimeError(f"resnet_fused: backend {name!r} cannot run this call: {why}")
    return name
