#!/usr/bin/env bash
# NVRTC, NVIDIA's run-time CUDA C compiler, as a library from its PyPI wheel (no GPU or CUDA
# toolkit needed), for the test that compiles heddle's CUDA kernels on machines without a
# GPU (crates/heddle-cuda/tests/kernels_compile.rs). Unpacks it under target/ and prints
# the directory holding libnvrtc.so, which must be on LD_LIBRARY_PATH when the test
# starts; scripts/test.sh does both.
#
# Needs: python3 with pip, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="12.9.86"
DIR="${HEDDLE_NVRTC_DIR:-target/nvrtc-$VERSION}"

if [[ ! -e "$DIR/libnvrtc.so" ]]; then
    download="$(mktemp -d)"
    trap 'rm -rf "$download"' EXIT
    python3 -m pip download --disable-pip-version-check --quiet --no-deps \
        --only-binary=:all: --dest "$download" "nvidia-cuda-nvrtc-cu12==$VERSION" >&2
    mkdir -p "$DIR"
    # The wheel is a zip; its libraries are under nvidia/cuda_nvrtc/lib/.
    python3 - "$download"/*.whl "$DIR" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        # The .alt. builds are an alternative the loader never asks for.
        if name.startswith("nvidia/cuda_nvrtc/lib/lib") and ".alt." not in name:
            with z.open(name) as src, open(os.path.join(dest, os.path.basename(name)), "wb") as out:
                shutil.copyfileobj(src, out)
PY
    # cudarc looks for the unversioned name.
    ln -sf libnvrtc.so.12 "$DIR/libnvrtc.so"
fi
# Absolute: the tests run in their crates' directories.
echo "$(cd "$DIR" && pwd)"
