#!/usr/bin/env bash
# Installs the router-side tools the scale-out tests use into a virtual environment of its
# own under target/, and prints the absolute path of its interpreter
# (HEDDLE_ROUTER_PYTHON):
# - sglang-router (SGLang Model Gateway), which crates/heddle-server/tests/router_sglang.rs
#   puts in front of two heddle replicas (`python -m sglang_router.launch_router`);
# - pyzmq and msgspec, with which tests/python/kv_events_subscriber.py reads heddle's KV
#   events as vLLM's consumers read vLLM's (crates/heddle-server/tests/kv_events.rs);
# - PyYAML, with which tests/python/check_deploy_manifests.py reads deploy/
#   (crates/heddle-server/tests/deploy_manifests.rs).
# scripts/test.sh calls this before `cargo test`.
#
# Needs: python3 with venv and pip, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
PINS=("sglang-router==0.3.2" "pyzmq==27.3.0" "msgspec==0.22.0" "PyYAML==6.0.4")
VENV="${HEDDLE_ROUTER_VENV:-target/router-venv}"

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV" >&2
fi
if ! "$VENV/bin/python" -c "
import importlib.metadata as m, sys
pins = [p.split('==') for p in sys.argv[1:]]
sys.exit(any(m.version(name) != version for name, version in pins))
" "${PINS[@]}" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --disable-pip-version-check --quiet "${PINS[@]}" >&2
fi
# Absolute: the tests run in the crate's directory.
echo "$(cd "$VENV" && pwd)/bin/python"
