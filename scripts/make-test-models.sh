#!/usr/bin/env bash
# Make the GGUF test models heddle's CPU kernels are checked and measured on, with
# llama.cpp's own quantizer (`llama-quantize`, built from the same llama-cpp-python sdist
# as the peer server by scripts/peers/build-llama-server.sh):
#
#   $TEST_MODELS_DIR (default ~/.cache/heddle/models/test)/
#     SmolLM2-135M-Instruct.{Q4_K_M,Q5_K_M,Q6_K,Q4_0}.gguf   the embedded model requantized
#                                                           (real weights, --allow-requantize)
#     random-llama-3.2-1b-shape.Q4_K_M.gguf                 random weights at the 1B shape,
#                                                           the embedded model's tokenizer
#
# Requantizing starts from the embedded Q4_1 file, so the weights are Q4_1's values
# rounded again; what matters here is that the files are what llama.cpp makes of a
# model, tensor types and all. With a hidden size of 576 the embedded model's matrices
# are not whole K-quant super-blocks (256), so llama-quantize stores those as Q5_0/Q5_1/
# Q8_0 (its fallback) and only the 1536-wide ffn_down and the embeddings as K-quants; the
# 1B-shape file is K-quants throughout.
#
# Existing files are kept (delete one to remake it). Needs what build-llama-server.sh
# needs, plus PyPI for numpy and gguf (into target/test-models-venv).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
TEST_MODELS_DIR="${TEST_MODELS_DIR:-${HEDDLE_MODEL_DIR:-$HOME/.cache/heddle/models}/test}"
PYTHON="${PYTHON:-python3}"
VENV="${TEST_MODELS_VENV:-$REPO_ROOT/target/test-models-venv}"
GGUF_VERSION=0.19.0 # gguf-py as vendored in llama-cpp-python 0.3.36

log() { echo "[make-test-models] $*" >&2; }

SOURCE="$(bash scripts/fetch-model.sh | tail -n 1)"
[[ -f "$SOURCE" ]] || { log "fetch-model.sh gave no file ($SOURCE)"; exit 1; }
SERVER="$(bash scripts/peers/build-llama-server.sh | tail -n 1)"
QUANTIZE="$(dirname "$SERVER")/llama-quantize"
[[ -x "$QUANTIZE" ]] || { log "no $QUANTIZE after the peer build"; exit 1; }
mkdir -p "$TEST_MODELS_DIR"

THREADS="$(nproc 2>/dev/null || echo 2)"
requantize() { # <input> <output> <type>
    local out="$2"
    if [[ -s "$out" ]]; then
        log "kept $out"
        return
    fi
    log "$3: $out"
    "$QUANTIZE" --allow-requantize "$1" "$out.part" "$3" "$THREADS" >"$out.log" 2>&1 ||
        { tail -n 20 "$out.log" >&2; exit 1; }
    mv "$out.part" "$out"
}

for type in Q4_K_M Q5_K_M Q6_K Q4_0; do
    requantize "$SOURCE" "$TEST_MODELS_DIR/SmolLM2-135M-Instruct.$type.gguf" "$type"
done

RANDOM_1B="$TEST_MODELS_DIR/random-llama-3.2-1b-shape.Q4_K_M.gguf"
if [[ ! -s "$RANDOM_1B" ]]; then
    if [[ ! -x "$VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$VENV" >&2
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check numpy "gguf==$GGUF_VERSION" >&2
    F16="$TEST_MODELS_DIR/random-llama-3.2-1b-shape.f16.gguf"
    log "random weights at the Llama-3.2-1B shape: $F16 (2.2 GB, removed afterwards)"
    "$VENV/bin/python" scripts/test-models/random_llama_gguf.py --tokenizer-from "$SOURCE" --out "$F16"
    # Not a requantization: the f16 weights are the source.
    log "Q4_K_M: $RANDOM_1B"
    "$QUANTIZE" "$F16" "$RANDOM_1B.part" Q4_K_M "$THREADS" >"$RANDOM_1B.log" 2>&1 ||
        { tail -n 20 "$RANDOM_1B.log" >&2; exit 1; }
    mv "$RANDOM_1B.part" "$RANDOM_1B"
    rm -f "$F16"
fi

ls -l "$TEST_MODELS_DIR"/*.gguf >&2
