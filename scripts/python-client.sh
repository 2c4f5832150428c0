#!/usr/bin/env bash
# Installs the official `openai` Python client (and `jsonschema`, the independent validator
# of structured outputs) into a virtual environment under target/
# and prints the absolute path of its interpreter, which the test
# crates/heddle-server/tests/api_python_client.rs runs (HEDDLE_PYTHON). scripts/test.sh
# calls this before `cargo test`.
#
# Needs: python3 with venv and pip, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
OPENAI_VERSION="3.54.0"
JSONSCHEMA_VERSION="4.25.1"
VENV="${HEDDLE_PYTHON_VENV:-target/python-venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV" >&2
fi
if ! "$VENV/bin/python" -c "
import importlib.metadata as m, sys
sys.exit(m.version('openai') != '$OPENAI_VERSION' or m.version('jsonschema') != '$JSONSCHEMA_VERSION')
" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet \
        "openai==$OPENAI_VERSION" "jsonschema==$JSONSCHEMA_VERSION" >&2
fi
# Absolute: the test runs in the crate's directory.
echo "$(cd "$VENV" && pwd)/bin/python"
