"""Builds resnet_fused._C: the C++ CPU kernels always, the CUDA kernels when a toolkit is found.

Environment:
  USE_CUDA=0               build without the CUDA sources
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default: the visible GPUs', else "9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup


def _real_cuda_home() -> str | None:
    """The toolkit directory behind `nvcc`, also when `nvcc` on PATH is a wrapper script.

    torch guesses CUDA_HOME from nvcc's path; for a wrapper such as /usr/local/bin/nvcc that guess is
    /usr/local and the link fails ("cannot find -lcudart"). nvcc's dry run prints its own TOP directory.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-v", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, flags=re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


cuda_home = _real_cuda_home() if os.environ.get("USE_CUDA", "1") != "0" else None
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

if cuda_home:
    cpp_extension.CUDA_HOME = cuda_home

with_cuda = bool(cuda_home) and torch.version.cuda is not None
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
    # No GPU to read the architecture from: build for Hopper, the chip the kernels are tuned on.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"

sources = ["csrc/ops.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
cxx_flags = ["-O3", "-fopenmp"]
extension_cls = cpp_extension.CppExtension
extra_compile_args = {"cxx": cxx_flags}
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extension_cls = cpp_extension.CUDAExtension
    extra_compile_args["nvcc"] = ["-O3", "-lineinfo"]

setup(
    ext_modules=[
        extension_cls(
            name="resnet_fused._C",
            sources=sources,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
