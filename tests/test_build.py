"""The build: CUDA kernels compiled when a toolkit is present; the package imports without _C."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from resnet_fused import backends


@pytest.mark.skipif(
    shutil.which("nvcc") is None or torch.version.cuda is None or os.environ.get("USE_CUDA") == "0",
    reason="no CUDA toolkit (nvcc) or a CPU-only torch: the extension is built without CUDA",
)
def test_extension_has_cuda_kernels_when_a_toolkit_is_present():
    assert backends.has_extension(), backends.extension_error()
    assert backends.extension_has_cuda(), "nvcc is on PATH but resnet_fused._C has no CUDA kernels"


def test_cpu_kernels_for_this_cpu_are_loaded():
    assert backends.has_extension(), backends.extension_error()
    for op in backends.KERNELS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fused::{op}", "CPU"), op


def test_imports_and_runs_without_the_extension():
    """With resnet_fused._C unloadable: import works, warns once, and the ops run on plain PyTorch."""
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "resnet_fused._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import resnet_fused
            from resnet_fused import backends, functional
        import torch
        messages = [str(w.message) for w in caught if "compiled extension is unavailable" in str(w.message)]
        assert len(messages) == 1, messages
        x = torch.randn(2, 3, 4, 4)
        assert backends.resolve(None, x) == "torch"
        out = functional.bn_act(x, torch.zeros(3), torch.ones(3), training=True, residual=x)
        assert out.shape == x.shape and (out >= 0).all()
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr
