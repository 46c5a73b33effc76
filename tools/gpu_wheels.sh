#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a GPU machine that has Python 3.12 and torch (CUDA 13) but
# not DALI, simplejpeg or webdataset, downloaded here for that interpreter, the DALI wheel (~190 MiB)
# split into parts of at most 60 MiB so that each fits one transfer of a machine lent by the call.
#
#   tools/gpu_wheels.sh [DIR]            # default DIR: .whl (ignored by git)
#
# On the GPU machine, from the checkout (see docs/gpus.md):
#   cat .whl/nvidia_dali_cuda130-*.whl.part-* > /tmp/dali.whl && rm -rf /tmp/pydeps && \
#   python -m pip install --no-deps --target /tmp/pydeps /tmp/dali.whl .whl/*.whl && \
#   PYTHONPATH=/tmp/pydeps python bench/gpu_check.py --quick
#
# --no-deps: the list is complete for torch 2.11 + accelerate (which bring numpy, packaging, pyyaml,
# typing-extensions); DALI 2.4's own Requires-Dist pins nvidia-libnvcomp-cu13==5.3.0.16 and its
# nvimgcodec needs nvidia-nvjpeg for nvJPEG. PYTHON_VERSION overrides 3.12.
set -euo pipefail
DIR=${1:-.whl}
PY=${PYTHON:-python3}
PYV=${PYTHON_VERSION:-3.12}
WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
        nvidia-nvjpeg==13.3.2.43 simplejpeg webdataset braceexpand libcst astunparse gast makefun nvtx
        six optree)
mkdir -p "$DIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" "${WHEELS[@]}"
for whl in "$DIR"/nvidia_dali_cuda130-*.whl; do
    [ -e "$whl" ] || continue
    split --bytes=60M --numeric-suffixes=1 --suffix-length=2 "$whl" "$whl.part-"
    (cd "$(dirname "$whl")" && sha256sum "$(basename "$whl")" > "$(basename "$whl").sha256")
    rm "$whl"  # the parts replace it; `cat` puts it back together (check it with the .sha256)
done
ls -l "$DIR"
