#!/usr/bin/env bash
# Downloads the wheels a GPU machine without a package index needs for the cuDNN-graph stage of gpu_check.sh
# (cudnn-frontend's Python module, for CPython 3.12 on x86-64 Linux) into wheels/ (ignored by git), to carry
# with the working tree; gpu_check.sh installs them from there.
#
#   benchmarks/fetch_gpu_wheels.sh [PYTHON_VERSION (default 3.12)]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
mkdir -p wheels
python -m pip download --only-binary=:all: --no-deps --python-version "$py" --platform manylinux_2_28_x86_64 \
    --dest wheels nvidia-cudnn-frontend
ls -l wheels
