#!/usr/bin/env bash
# heddle's test command: installs what the tests need (the embedded model, the
# official `openai` Python client and the router-side tools), then runs every test of the
# workspace in one cargo invocation. Used as is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# The embedded model, cached where the server and the tests look for it.
bash scripts/fetch-model.sh >/dev/null

# The openai client for the test that drives a live server with it.
HEDDLE_PYTHON="$(bash scripts/python-client.sh)"
export HEDDLE_PYTHON

# sglang-router and the KV-event and manifest readers, for the scale-out tests.
HEDDLE_ROUTER_PYTHON="$(bash scripts/router-tools.sh)"
export HEDDLE_ROUTER_PYTHON

# NVRTC, so that the CUDA kernels are compiled (not run) here too, GPU or not.
LD_LIBRARY_PATH="$(bash scripts/nvrtc.sh)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH

cargo test --workspace --locked "$@"
