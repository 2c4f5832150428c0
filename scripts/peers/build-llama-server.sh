#!/usr/bin/env bash
# Build llama.cpp's `llama-server`, heddle's CPU peer, and its quantizer `llama-quantize`
# (scripts/make-test-models.sh) from the llama.cpp sources vendored in the PyPI source
# distribution of llama-cpp-python (pinned below), and cache both beside each other:
#
#   ${PEER_DIR:-<repo>/target/peers}/llama-server-<version>-native-noamx/llama-server
#   ${PEER_DIR:-<repo>/target/peers}/llama-server-<version>-native-noamx/llama-quantize
#
# A cached binary that runs is reused, so a rerun is instant; the cold build takes about
# 10-15 minutes on 2 cores. Set JOBS to change the build parallelism (default: nproc).
#
# stdout: the binary's path, alone on the last line. Everything else goes to stderr.
# Needs: python3 with pip and venv, a C++ compiler, access to PyPI. cmake and ninja come
# from PyPI into a private venv when they are not on PATH.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEER_DIR="${PEER_DIR:-$REPO_ROOT/target/peers}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

DEST_DIR="$PEER_DIR/llama-server-$LLAMA_CPP_PYTHON_VERSION-native-noamx"
DEST="$DEST_DIR/llama-server"
QUANTIZE="$DEST_DIR/llama-quantize"
WORK="$PEER_DIR/work-llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
TOOLS_VENV="$PEER_DIR/build-tools-venv"

log() { echo "[build-llama-server] $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ -x "$DEST" && -x "$QUANTIZE" ]] && "$DEST" --version >/dev/null 2>&1; then
    log "cached: $DEST"
    echo "$DEST"
    exit 0
fi

mkdir -p "$PEER_DIR" "$WORK"

# The build tools live in their own venv: `pip download` of an sdist prepares its
# metadata, which needs the project's build backend (scikit-build-core) importable when
# build isolation is off, and cmake/ninja may be missing from the system.
if [[ ! -x "$TOOLS_VENV/bin/python" ]]; then
    log "creating the build-tools venv $TOOLS_VENV"
    "$PYTHON" -m venv "$TOOLS_VENV"
fi
TOOLS_PY="$TOOLS_VENV/bin/python"
"$TOOLS_PY" -m pip install --quiet --disable-pip-version-check "scikit-build-core>=0.9.2" cmake ninja >&2
export PATH="$TOOLS_VENV/bin:$PATH"

SDIST_DIR="$WORK/sdist"
SRC_DIR="$WORK/src"
if [[ ! -f "$SRC_DIR/vendor/llama.cpp/CMakeLists.txt" ]]; then
    if ! compgen -G "$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" >/dev/null; then
        log "downloading the llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist from PyPI"
        "$TOOLS_PY" -m pip download --no-deps --no-binary :all: --no-build-isolation \
            --disable-pip-version-check --no-input --dest "$SDIST_DIR" \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" >&2 ||
            die "pip download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed"
    fi
    SDIST="$SDIST_DIR/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
    [[ -f "$SDIST" ]] || die "expected $SDIST after the download"
    log "unpacking $(basename "$SDIST")"
    rm -rf "$SRC_DIR" "$WORK/unpack"
    mkdir -p "$WORK/unpack"
    tar -xzf "$SDIST" -C "$WORK/unpack"
    mv "$WORK/unpack/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" "$SRC_DIR"
    rmdir "$WORK/unpack"
fi

# Static libraries make a self-contained binary that can be copied into the cache.
# GGML_NATIVE=ON: the peer uses the instructions the CPU has (AVX-512/VNNI here), as
# heddle's own kernels do, so the comparison is like for like; all but AMX: where the
# CPU reports AMX (this project's Sapphire Rapids VM does), ggml's AMX matmul kernel dies
# with SIGILL on its first `tilezero` in llama.cpp 0.3.36's vendored ggml, and heddle
# has no AMX kernels either. (GCC honours an explicit -mno-* over -march=native.)
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
BUILD_DIR="$WORK/build"
log "configuring (cmake, Release, GGML_NATIVE=ON without AMX)"
cmake -S "$SRC_DIR/vendor/llama.cpp" -B "$BUILD_DIR" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$NO_AMX" \
    -DCMAKE_CXX_FLAGS="$NO_AMX" \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF >&2

log "building llama-server and llama-quantize with $JOBS jobs"
start=$(date +%s)
cmake --build "$BUILD_DIR" --target llama-server llama-quantize -j "$JOBS" >&2
log "built in $(($(date +%s) - start)) s"

mkdir -p "$DEST_DIR"
for tool in llama-quantize llama-server; do
    cp "$BUILD_DIR/bin/$tool" "$DEST_DIR/$tool.part"
    mv -f "$DEST_DIR/$tool.part" "$DEST_DIR/$tool"
done
"$DEST" --version >&2 || die "$DEST does not run"
echo "$DEST"
