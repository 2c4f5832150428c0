#!/usr/bin/env bash
# Builds the CUDA binaries here (no CUDA toolkit needed) into .gpu-bin/ (git-ignored),
# stripped so that they travel to the GPU machine (about 17 MB), and copies the peer script
# into .peer/. Then run scripts/gpu/check-and-bench.sh there, carrying .gpu-bin and .peer.
set -eu
cd "$(dirname "$0")/../.."
cargo build --release -p heddle-server --features cuda
cargo build --release -p heddle-cuda
mkdir -p .gpu-bin .peer
for bin in heddle heddle-cuda; do
  strip -o ".gpu-bin/$bin" "target/release/$bin"
done
cp /work/shared/bench/peers/transformers_cb.py .peer/ 2>/dev/null || true
ls -la .gpu-bin .peer
