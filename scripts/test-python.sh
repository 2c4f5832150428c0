#!/usr/bin/env bash
# The OpenAI Python client test: installs the official `openai` package into a virtual
# environment under target/, then runs the Rust test that starts the server and runs
# tests/python/test_openai_client.py against it. Expects the embedded model to be
# fetched already (scripts/test.sh does that first).
#
# Needs: python3 with venv and pip, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
OPENAI_VERSION="3.54.0"
VENV="${HEDDLE_PYTHON_VENV:-target/python-venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "openai==$OPENAI_VERSION"
fi

# Absolute: the test runs in the crate's directory.
HEDDLE_PYTHON="$(cd "$VENV" && pwd)/bin/python" cargo test -p heddle-server --locked \
    --test api_python_client -- --ignored --nocapture
