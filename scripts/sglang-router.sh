#!/usr/bin/env bash
# Installs sglang-router (SGLang Model Gateway, the router that the test
# crates/heddle-server/tests/router_sglang.rs puts in front of two heddle replicas) into a
# virtual environment of its own under target/, and prints the absolute path of that
# environment's interpreter (HEDDLE_ROUTER_PYTHON); the router runs as
# `python -m sglang_router.launch_router`. scripts/test.sh calls this before `cargo test`.
#
# Needs: python3 with venv and pip, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
SGLANG_ROUTER_VERSION="0.3.2"
VENV="${HEDDLE_ROUTER_VENV:-target/router-venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV" >&2
fi
if ! "$VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('sglang-router') != '$SGLANG_ROUTER_VERSION')
" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet \
        "sglang-router==$SGLANG_ROUTER_VERSION" >&2
fi
# Absolute: the test runs in the crate's directory.
echo "$(cd "$VENV" && pwd)/bin/python"
