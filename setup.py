"""Builds the compiled parts of resnet_fused:

  resnet_fused._C             the op schemas (csrc/ops.cpp), the stage ops (csrc/*_stage.cpp), and the CUDA
                              kernels when a toolkit is found
  resnet_fused._cpu_default   the C++ CPU kernels, generic vector code
  resnet_fused._cpu_avx2      the same kernels for AVX2 + FMA (x86-64); chosen at run time

Environment:
  USE_CUDA=0               build without the CUDA sources
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default: the visible GPUs', else "9.0")
  MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os
import platform
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

def _wheel_cuda_includes() -> list[str]:
    """Header folders of the nvidia-* wheels (cusparse.h and friends that ATen's CUDA headers include
    and a slim toolkit may lack); searched after the toolkit's own headers."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted({d for root in roots for d in glob.glob(os.path.join(root, "*", "include")) if os.path.isdir(d)})


def _cudnn_frontend_include() -> str | None:
    """cudnn-frontend's header folder (the `gpu` extra: PyPI nvidia-cudnn-frontend, whose wheel carries the C++
    headers), or CUDNN_FRONTEND_INCLUDE; None without it (the cuDNN-graph kernels are then not built)."""
    import importlib.metadata

    path = os.environ.get("CUDNN_FRONTEND_INCLUDE")
    if path:
        return path if os.path.exists(os.path.join(path, "cudnn_frontend.h")) else None
    try:
        files = importlib.metadata.files("nvidia-cudnn-frontend") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    header = next((f for f in files if f.name == "cudnn_frontend.h" and f.parent.name == "include"), None)
    return str(header.locate().parent) if header is not None else None


def _cudnn_wheel() -> str | None:
    """The nvidia-cudnn wheel's folder (include/cudnn.h, lib/libcudnn.so.9: the cuDNN torch loads), for the graph
    kernels' compile and link."""
    found = [os.path.dirname(inc) for inc in _wheel_cuda_includes()
             if os.path.exists(os.path.join(inc, "cudnn.h")) and os.path.exists(os.path.join(inc, "..", "lib", "libcudnn.so.9"))]
    return found[0] if found else None


def _nvrtc_lib() -> str | None:
    """The folder holding libnvrtc.so.<major> for the graph kernels' link: the nvidia wheels' (the NVRTC torch loads),
    else the toolkit's. cudnn-frontend's headers call NVRTC (its experimental engines); torch loads NVRTC without
    exporting its symbols to later modules (torch 2.11), so _C links it itself or fails to import."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    folders = sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", "lib")))
    folders += [os.path.join(cuda_home, "lib64")] if cuda_home else []
    return next((d for d in folders if glob.glob(os.path.join(d, "libnvrtc.so.[0-9]*"))), None)


# Hidden visibility: the three modules compile the same inline functions (csrc/checks.h, the kernel
# wrappers of torch/library.h) for different targets (nvcc's host pass, generic, AVX2); each keeps its own,
# and exports nothing but PyInit_*, so that no module can bind to another's copy however it is loaded.
VISIBILITY_FLAGS = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", *VISIBILITY_FLAGS]
# The CPU kernels build once per instruction set: at::vec picks its vector width at compile time.
CPU_CAPABILITY_FLAGS = {"default": []}
if platform.machine() in ("x86_64", "AMD64"):
    CPU_CAPABILITY_FLAGS["avx2"] = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]

ext_modules = [
    cpp_extension.CppExtension(
        name=f"resnet_fused._cpu_{capability}",
        sources=sorted(glob.glob("csrc/cpu/*.cpp")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": CXX_FLAGS + flags},
        extra_link_args=["-fopenmp"],
    )
    for capability, flags in CPU_CAPABILITY_FLAGS.items()
]
if with_cuda:
    # -Xptxas=-v: ptxas prints each kernel's registers, stack, spill stores / loads and shared memory
    # into the build log (tests/test_build.py checks the built kernels for spills with cuobjdump)
    nvcc_flags = ["-O3", "-lineinfo", "-Xptxas=-v", f"-Xcompiler={','.join(VISIBILITY_FLAGS)}"] + [
        f"-Xcompiler=-idirafter,{d}" for d in _wheel_cuda_includes()]
    sources = [*sorted(glob.glob("csrc/*.cpp")), *sorted(glob.glob("csrc/cuda/*.cpp")), *sorted(glob.glob("csrc/cuda/*.cu"))]
    include_dirs, link_args, cxx_flags = [os.path.abspath("csrc")], [], list(CXX_FLAGS)
    # the cuDNN graphs (csrc/cudnn/): where cudnn-frontend's headers and the cuDNN wheel's library are found
    frontend, cudnn_wheel = _cudnn_frontend_include(), _cudnn_wheel()
    if frontend and cudnn_wheel:
        cudnn_lib = os.path.join(cudnn_wheel, "lib")
        sources += [*sorted(glob.glob("csrc/cudnn/*.cpp")), *sorted(glob.glob("csrc/cudnn/*.cu"))]
        include_dirs += [frontend, os.path.join(cudnn_wheel, "include")]
        # ATen's CUDA headers the graph kernels include want cusparse.h and friends: the wheels' headers, after the toolkit's
        cxx_flags += ["-DRF_WITH_CUDNN_FRONTEND", *(f"-idirafter{d}" for d in _wheel_cuda_includes())]
        nvcc_flags.append("-DRF_WITH_CUDNN_FRONTEND")
        link_args += [f"-L{cudnn_lib}", "-l:libcudnn.so.9", f"-Wl,-rpath,{cudnn_lib}"]
        nvrtc_lib = _nvrtc_lib()
        if nvrtc_lib:
            nvrtc = os.path.basename(sorted(glob.glob(os.path.join(nvrtc_lib, "libnvrtc.so.[0-9]*")))[0])
            link_args += [f"-L{nvrtc_lib}", f"-l:{nvrtc}", f"-Wl,-rpath,{nvrtc_lib}"]
        print(f"setup.py: cuDNN graphs built (cudnn-frontend headers {frontend}, libcudnn {cudnn_lib})")
    else:
        print("setup.py: cuDNN graphs not built (no cudnn-frontend headers: pip install nvidia-cudnn-frontend, "
              "or set CUDNN_FRONTEND_INCLUDE)" if not frontend else "setup.py: cuDNN graphs not built (no libcudnn.so.9 found)")
    ext_modules.append(
        cpp_extension.CUDAExtension(
            name="resnet_fused._C",
            sources=sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_args,
        )
    )
else:
    ext_modules.append(
        cpp_extension.CppExtension(
            name="resnet_fused._C",
            sources=sorted(glob.glob("csrc/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": CXX_FLAGS},
        )
    )

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
