"""CPU outputs of the fused layers from a memory arena (csrc/cpu_arena.cpp): the blocks a fused layer's
outputs (in training also the tensors its stages save for the backward) lived in are kept when freed
and reused for the same sizes in the next call, so a forward pass writes into memory already mapped
instead of page-faulting fresh pages from the system. With glibc, a ResNet-50 forward at batch 8 spends
about a sixth of its time there (ONNX Runtime's arena avoids it); in training the arena takes most of a
step's page faults and system time away.

The arena becomes the process's CPU allocator on the first fused CPU call and passes every
allocation made outside ``scope()`` straight to the allocator it replaced; only the fused layers'
own allocations are pooled. It keeps at most ``RESNET_FUSED_CPU_ARENA_MB`` (default 1024) of freed
blocks; ``RESNET_FUSED_CPU_ARENA_MB=0`` leaves the allocator alone. ``empty_cache()`` returns them.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from resnet_fused import backends


@functools.cache
def _arena():
    """resnet_fused._C with the arena installed, or None (no extension, turned off, or another
    library's allocator holds a higher priority)."""
    if not backends.has_extension() or os.environ.get("RESNET_FUSED_CPU_ARENA_MB", "1024").strip() == "0":
        return None
    from resnet_fused import _C

    return _C if _C.cpu_arena_install() else None


@contextlib.contextmanager
def scope(x: torch.Tensor):
    """Allocations on this thread come from the arena inside the block, for CPU tensors outside tracing."""
    arena = _arena() if x.device.type == "cpu" and not torch.compiler.is_compiling() else None
    if arena is None:
        yield
        return
    arena.cpu_arena_enter()
    try:
        yield
    finally:
        arena.cpu_arena_exit()


def cached_bytes() -> int:
    """Bytes of freed blocks the arena holds for reuse."""
    arena = _arena()
    return arena.cpu_arena_cached_bytes() if arena is not None else 0


def empty_cache() -> None:
    """Give the arena's free blocks back to the system."""
    arena = _arena()
    if arena is not None:
        arena.cpu_arena_empty_cache()
