#!/usr/bin/env bash
# Builds the extension for the GPU machine here, on the CPU, so that a GPU run spends its device minutes on tests
# and benchmarks instead of compiling (the H200 runs spent 210 s of their 900 building). The modules go to prebuilt/
# (ignored by git; carry it: `carry: ["prebuilt", "wheels"]`), with a MANIFEST that gpu_check.sh compares against the
# GPU machine before using them: the torch version, the Python extension suffix, the CUDA architectures and a hash of
# the sources (csrc/, setup.py). On any mismatch gpu_check.sh builds there as before.
#
#   benchmarks/prebuild_gpu.sh
#
# Environment: TORCH_VERSION (default 2.11.0: the GPU image's torch, 2.11.0+cu130 on PyPI), PYTHON312 (an interpreter
# of the GPU image's Python minor version, default python3.12, else pyenv's 3.12), TORCH_CUDA_ARCH_LIST (default 9.0:
# H100 / H200), PREBUILD_VENV (default /tmp/resnet_fused_prebuild_venv; reused while it holds TORCH_VERSION),
# MAX_JOBS (default: the cores here). Takes ~7 minutes on 2 cores, plus ~3 GB of downloads for a fresh venv.
# The modules' RUNPATH names this venv's cuDNN and NVRTC folders; there `import torch` has loaded both (and cudart)
# before resnet_fused imports _C, so their sonames resolve to the GPU machine's own.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_version=${TORCH_VERSION:-2.11.0}
arch=${TORCH_CUDA_ARCH_LIST:-9.0}
venv=${PREBUILD_VENV:-/tmp/resnet_fused_prebuild_venv}
command -v nvcc >/dev/null || { echo "prebuild_gpu: no nvcc here: the CUDA sources cannot be compiled" >&2; exit 3; }

py=${PYTHON312:-}
if [[ -z $py ]]; then
    py=$(command -v python3.12 || ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null | tail -1 || true)
fi
[[ -n $py && -x $py ]] || { echo "prebuild_gpu: no Python 3.12 found (set PYTHON312)" >&2; exit 2; }

if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$torch_version" ninja pybind11 "setuptools<82" wheel nvidia-cudnn-frontend
fi

# the tree that travels (tracked and untracked-not-ignored files), built apart from this checkout's own modules
commit="$(git rev-parse HEAD)$(git diff --quiet HEAD -- csrc setup.py || echo ' (with uncommitted changes to csrc/ or setup.py)')"
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$src"
t0=$SECONDS
(cd "$src" && TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-$(nproc)} "$venv/bin/python" setup.py build_ext --inplace) \
    >"$src/prebuild.log" 2>&1 || { tail -40 "$src/prebuild.log" >&2; echo "prebuild_gpu: build failed" >&2; exit 1; }
grep "^setup.py: cuDNN graphs" "$src/prebuild.log" || true
grep -q "^setup.py: cuDNN graphs built" "$src/prebuild.log" || { echo "prebuild_gpu: built without the cuDNN graphs" >&2; exit 1; }

rm -rf prebuilt
mkdir prebuilt
for so in "$src"/resnet_fused/*.so; do
    strip --strip-debug -o "prebuilt/$(basename "$so")" "$so"  # the debug sections: 60 of _C's 72 MB
done
"$venv/bin/python" benchmarks/prebuilt.py write prebuilt --arch "$arch" --root "$src" --commit "$commit" \
    --compiler "$(c++ --version | head -1); $(nvcc --version | tail -1)" --seconds $((SECONDS - t0))
du -sh prebuilt
