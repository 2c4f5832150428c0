#!/usr/bin/env bash
# Builds the CUDA binaries here (no CUDA toolkit needed) and stages everything the GPU
# machine runs into one self-contained folder (default .gpu-bin/, git-ignored): the
# stripped binaries (about 17 MB), scripts/gpu/, configs/, the committed reference outputs
# of the embedded model, the embedded model's header (its tokenizer, 2 MB: the structured
# output benchmark's vocabulary) and the transformers peer script. On the GPU machine, run
# DEST/scripts/gpu/check-and-bench.sh from DEST.
#
#   scripts/gpu/build.sh [DEST]
#
# The device tool sends the checkout a session started in: stage into a git-ignored
# folder of that checkout and name it in the call's `carry`.
set -eu
cd "$(dirname "$0")/../.."
DEST=${1:-.gpu-bin}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release -p heddle-server --features cuda --bin heddle --example engine_throughput
cargo build --release -p heddle-cuda
mkdir -p "$DEST/bin" "$DEST/scripts" "$DEST/configs" "$DEST/reference" "$DEST/peer" "$DEST/model"
for bin in heddle heddle-cuda examples/engine_throughput; do
  strip -o "$DEST/bin/$(basename $bin)" "$TARGET/release/$bin"
done
# The GGUF header and metadata end 1.8 MB in; the tokenizer is read from them alone.
head -c 2097152 "$(bash scripts/fetch-model.sh)" >"$DEST/model/embedded-tokenizer.gguf"
rm -rf "$DEST/scripts/gpu"
cp -r scripts/gpu "$DEST/scripts/"
cp configs/*.json "$DEST/configs/"
cp crates/heddle-model/tests/data/llamacpp_reference.json scripts/embedded-model.sha256 "$DEST/reference/"
# The transformers peer lives in the shared folder beside the repository, where there is one.
PEER=../shared/bench/peers/transformers_cb.py
if [ -f "$PEER" ]; then
  cp "$PEER" "$DEST/peer/"
else
  echo "no $PEER beside the repository: the GPU script will skip the transformers peer" >&2
fi
du -sh "$DEST"/*
