"""The build: CUDA kernels compiled when a toolkit is present and free of register spills; no symbol
shared between the extension modules; the package imports without _C."""

import ctypes
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from resnet_fused import backends
from resnet_fused.ops.kernels import KERNELS


@pytest.mark.skipif(
    shutil.which("nvcc") is None or torch.version.cuda is None or os.environ.get("USE_CUDA") == "0",
    reason="no CUDA toolkit (nvcc) or a CPU-only torch: the extension is built without CUDA",
)
def test_extension_has_cuda_kernels_when_a_toolkit_is_present():
    assert backends.has_extension(), backends.extension_error()
    assert backends.extension_has_cuda(), "nvcc is on PATH but resnet_fused._C has no CUDA kernels"


def test_cpu_kernels_for_this_cpu_are_loaded():
    assert backends.has_extension(), backends.extension_error()
    for op in KERNELS:
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


def test_extension_modules_keep_their_functions_to_themselves():
    """Built with -fvisibility=hidden: _C (nvcc's host pass), _cpu_default and _cpu_avx2 each compile the
    inline checks of csrc/checks.h (and the CPU modules the same kernel names) for their own target, and
    none exports them, so none can bind to another's copy, whatever flags a module is loaded with."""
    assert backends.has_extension(), backends.extension_error()
    cpu_module = backends._cpu_kernels_module()
    for name in ("resnet_fused._C", cpu_module):
        module = importlib.import_module(name)
        lib = ctypes.CDLL(module.__file__)
        assert hasattr(lib, f"PyInit_{name.rsplit('.', 1)[1]}"), name
        for symbol in ("_ZN12resnet_fused16check_activationERKN2at6TensorEPKcS5_",  # resnet_fused::check_activation
                       "_ZN12resnet_fused3cpu8bn_statsERKN2at6TensorE"):  # resnet_fused::cpu::bn_stats
            assert not hasattr(lib, symbol), f"{name} exports {symbol}"


def _cuobjdump() -> str | None:
    """cuobjdump from PATH, the CUDA toolkit (CUDA_HOME), or the copy Triton ships."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, timeout=60).stdout
    short = [re.sub(r"\(anonymous namespace\)::|resnet_fused::gpu::|c10::", "", n) for n in out.splitlines()]
    return short if len(short) == len(names) else names


def kernel_resources(so_path: str, cuobjdump: str) -> list[dict]:
    """Per kernel and architecture, from `cuobjdump --dump-resource-usage`: registers (REG), stack frame
    (STACK, where ptxas puts spilled registers), local memory (LOCAL), static shared memory (SHARED)."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", so_path], capture_output=True, text=True,
                          timeout=300, check=True).stdout
    rows, arch = [], "?"
    lines = iter(text.splitlines())
    for line in lines:
        if m := re.match(r"\s*arch = (\S+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            usage = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", next(lines)))
            counts = {k: int(usage.get(k, 0)) for k in ("REG", "STACK", "LOCAL", "SHARED")}
            rows.append({"arch": arch, "kernel": m.group(1), **counts})
    for row, name in zip(rows, _demangle([r["kernel"] for r in rows])):
        row["kernel"] = name
    return rows


@pytest.mark.skipif(not backends.extension_has_cuda(), reason="resnet_fused._C was built without CUDA")
def test_cuda_kernels_do_not_spill():
    """No kernel of the CUDA extension spills registers or uses local memory, on any architecture built."""
    cuobjdump = _cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME, Triton's copy)")
    rows = kernel_resources(importlib.import_module("resnet_fused._C").__file__, cuobjdump)
    assert rows, "cuobjdump found no kernels in resnet_fused._C"
    table = "\n".join([f"{'arch':7} {'REG':>4} {'STACK':>6} {'LOCAL':>6} {'SHARED':>7}  kernel"] + [
        f"{r['arch']:7} {r['REG']:4d} {r['STACK']:6d} {r['LOCAL']:6d} {r['SHARED']:7d}  {r['kernel']}" for r in rows])
    print(table)
    spilling = [r["kernel"] for r in rows if r["STACK"] or r["LOCAL"]]
    assert not spilling, f"register spills / local memory in {len(spilling)} kernels:\n{table}"
