"""Shared test setup: Triton's interpreter on GPU-less machines, seeds, poisoned allocations."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors (must be set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# RESNET_FUSED_TEST_SEED draws other inputs and weights in every test (the model-level checks are run under
# several seeds and CPU capability caps, see .ci/run); default 0
SEED = int(os.environ.get("RESNET_FUSED_TEST_SEED", "0"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture
def poisoned():
    """Fill every new uninitialized allocation with NaN (integers: their maximum), so an output element a
    kernel forgot to write fails. torch.empty / empty_like / new_empty / at::empty fill on CPU and on CUDA
    alike (also blocks reused from the caching allocator): tests/gpu/test_gpu_ops.py checks both devices."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill_was = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill_was


@pytest.fixture
def no_tf32():
    """fp32 convolutions and matmuls in IEEE fp32, restored after: cuDNN and cuBLAS, and the Triton conv
    (resnet_fused/triton/conv.py picks TF32 when torch.backends.cudnn.allow_tf32). Then an fp32 result
    compares with eager fp32 under the eager-error rule; TF32 has its own tests (test_gpu_tf32.py)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's deterministic algorithms, no benchmark search, restored after: its weight-gradient
    algorithms may reorder their sums between runs (atomics), which opcheck's twice-run comparison and
    the bitwise determinism tests would see."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.fixture
def one_conv_config(monkeypatch):
    """The Triton conv's autotuner restricted to one config (with a cache of its own, so no choice leaks to
    other tests), for numerics tests on a GPU: every config of every kernel specialization is compiled on
    first use, which on a cold cache costs seconds each, and the configs differ only in tile shapes and
    order of the K blocks, not in what the error bounds assume. No effect under the interpreter (one
    config there already)."""
    try:
        from triton.runtime.autotuner import Autotuner

        from resnet_fused.triton import conv
    except ImportError:
        return
    tuner = getattr(conv, "_conv", None)
    if isinstance(tuner, Autotuner) and len(tuner.configs) > 1:
        fits = [c for c in tuner.configs if c.kwargs.get("BLOCK_M") == 64 and c.kwargs.get("BLOCK_N") == 64]
        monkeypatch.setattr(tuner, "configs", fits[:1] or tuner.configs[-1:])
        monkeypatch.setattr(tuner, "cache", {})


def pytest_report_header(config):
    from resnet_fused import backends

    return f"resnet_fused backends available: {backends.available()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
