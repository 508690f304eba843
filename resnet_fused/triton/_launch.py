"""Argument checks and device placement around every Triton launcher: the kernels trust shapes (a
wrong one would read out of bounds), so each launcher's arguments are checked first, and the kernel
launches on its tensors' CUDA device (Triton launches on the current one)."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from ..backends import triton_interpreted

# Triton picks compiled or interpreted kernels when they are defined (at import)
_INTERPRET = triton_interpreted()
_VECTOR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_device(op: str, device: torch.device) -> None:
    if not (device.type == "cuda" or (device.type == "cpu" and _INTERPRET)):
        raise RuntimeError(
            f"{op}: got tensors on {device}; it takes CUDA tensors "
            f"(CPU tensors only when TRITON_INTERPRET=1 was set before resnet_fused was imported)"
        )


def _one_device(op: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    if len({t.device for t in tensors.values()}) > 1:
        raise RuntimeError(f"{op}: expected all tensors on one device, got " + ", ".join(f"`{k}` on {t.device}" for k, t in tensors.items()))
    device = next(iter(tensors.values())).device
    _check_device(op, device)
    return device


def launcher(op: str, like: tuple[str, ...] = (), per_channel: tuple[str, ...] = (), together: tuple[str, ...] = ()):
    """Decorates the launcher of the op named `op`, whose first argument x is an (N, C, H, W) activation.

    Checks the arguments before any kernel runs (the kernels trust shapes: a wrong one would read out
    of bounds) and raises RuntimeError naming the op: x is 4-D fp32, fp16 or bf16; the tensors named
    in `like` have x's shape and dtype, those in `per_channel` are fp32 (C,); those in `together` are
    all given or all None; every tensor is on one device Triton runs on here (CUDA; CPU only under
    TRITON_INTERPRET=1). Then launches on that device: Triton launches on the current CUDA device.
    """

    def wrap(fn):
        bind = _binder(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            device = _check_args(op, bind(args, kwargs), like, per_channel, together)
            with launch_on(device):
                return fn(*args, **kwargs)

        return run

    return wrap


def _binder(fn):
    """(args, kwargs) -> fn's arguments by name, in its signature's order, defaults filled in: what
    inspect.Signature.bind(...).arguments gives, with the signature read once, not per call."""
    params = inspect.signature(fn).parameters
    names = tuple(params)
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}

    def bind(args: tuple, kwargs: dict) -> dict:
        if len(args) > len(names) or any(k not in params for k in kwargs):
            inspect.signature(fn).bind(*args, **kwargs)  # raises the TypeError Python would
        bound = dict(zip(names, args))
        for k in names[len(args):]:
            if k in kwargs:
                bound[k] = kwargs[k]
            elif k in defaults:
                bound[k] = defaults[k]
            else:
                raise TypeError(f"{fn.__qualname__}() missing required argument: '{k}'")
        return bound

    return bind


def launch_on(device: torch.device):
    """The context a kernel launches in: Triton launches on the current CUDA device, so make it the tensors' one
    (no context switch where it already is)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _check_args(op: str, args: dict, like, per_channel, together) -> torch.device:
    """The device of `args` (a launcher's arguments by name), after the checks `launcher` describes."""
    name, x = next(iter(args.items()))
    device = _one_device(op, {k: t for k, t in args.items() if isinstance(t, torch.Tensor)})
    if x.dim() != 4 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise RuntimeError(f"{op}: expected `{name}` to be a 4-D (N, C, H, W) float32, float16 or bfloat16 tensor, "
                           f"got shape {list(x.shape)} and {x.dtype}")
    for k in like:
        t = args[k]
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype):
            raise RuntimeError(f"{op}: `{k}` is {t.dtype} of shape {list(t.shape)} but `{name}` is {x.dtype} of shape {list(x.shape)}")
    for k in per_channel:
        t = args[k]
        if t is not None and (t.shape != x.shape[1:2] or t.dtype != torch.float32):
            raise RuntimeError(f"{op}: expected `{k}` to be float32 of shape [{x.shape[1]}], one per channel of `{name}`, "
                               f"got {t.dtype} of shape {list(t.shape)}")
    if len({args[k] is None for k in together}) > 1:
        raise RuntimeError(f"{op}: {', '.join(f'`{k}`' for k in together)} are given together or not at all")
    return device


def vector_launcher(op: str):
    """Decorates the launcher of a per-channel op whose tensor arguments are all (C,) vectors (None
    where optional), C = the first one's length. Checks them before any kernel runs and raises
    RuntimeError naming the op: 1-D, float32 / float64 / float16 / bfloat16, C elements each, on one
    device Triton runs on here (CUDA; CPU only under TRITON_INTERPRET=1). Then launches on that device."""

    def wrap(fn):
        bind = _binder(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            tensors = {k: t for k, t in bind(args, kwargs).items() if isinstance(t, torch.Tensor)}
            (name, first), device = next(iter(tensors.items())), _one_device(op, tensors)
            for k, t in tensors.items():
                if t.dim() != 1 or t.dtype not in _VECTOR_DTYPES:
                    raise RuntimeError(f"{op}: expected `{k}` to be a 1-D float32, float64, float16 or bfloat16 per-channel "
                                       f"vector, got {t.dtype} of shape {list(t.shape)}")
                if t.numel() != first.numel():
                    raise RuntimeError(f"{op}: `{k}` has shape {list(t.shape)} but `{name}` has shape {list(first.shape)}")
            with launch_on(device):
                return fn(*args, **kwargs)

        return run

    return wrap
