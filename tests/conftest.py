"""Shared test setup: Triton's interpreter on GPU-less machines, seeds, poisoned allocations."""

import os

import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors (must be set before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned():
    """Fill every new uninitialized allocation with NaN, so an output element a kernel forgot to write fails."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)


def pytest_report_header(config):
    from resnet_fused import backends

    return f"resnet_fused backends available: {backends.available()}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
