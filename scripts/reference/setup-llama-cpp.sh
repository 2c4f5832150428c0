#!/usr/bin/env bash
# Build llama-cpp-python (and so llama.cpp) from its source distribution into a
# private venv, CPU only. Used only to (re)generate the reference outputs that
# heddle's tests compare against; nothing in the server or CI depends on it.
#
#   scripts/reference/setup-llama-cpp.sh          # venv at <repo>/.venv-ref
#   VENV=/somewhere scripts/reference/setup-llama-cpp.sh
#
# Idempotent: if the venv already imports the pinned version it only checks the small
# Python deps. The C++ build took 17 minutes on 2 (shared) cores.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
GGUF_VERSION=0.19.0 # gguf-py, to dequantize weights for the float64 reference
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv-ref}"
PYTHON="${PYTHON:-python3}"

log() { echo "[setup-llama-cpp] $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

log "installing build requirements (scikit-build-core, cmake, ninja) and runtime deps"
"$VPY" -m pip install --quiet --disable-pip-version-check "scikit-build-core>=0.9.2" cmake ninja \
    numpy typing-extensions diskcache "jinja2>=2.11.3" "gguf==$GGUF_VERSION" >&2

if "$VPY" -c 'import sys, llama_cpp; sys.exit(llama_cpp.__version__ != sys.argv[1])' \
    "$LLAMA_CPP_PYTHON_VERSION" 2>/dev/null; then
    log "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION already in $VENV"
    exit 0
fi

# CPU-only, portable (no -march=native), no BLAS/GPU backends, no OpenMP, no extra
# binaries, no multimodal (mtmd/llava) library: only libggml* + libllama are needed.
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF -DLLAVA_BUILD=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
export FORCE_CMAKE=1

log "building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from sdist (CMAKE_ARGS=$CMAKE_ARGS)"
start=$(date +%s)
"$VPY" -m pip install --no-binary llama-cpp-python --no-build-isolation --no-deps \
    --no-cache-dir --verbose "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2
log "built in $(( $(date +%s) - start )) s"

"$VPY" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)' >&2
