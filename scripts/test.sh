#!/usr/bin/env bash
# heddle's test command: installs what the tests need (the embedded model), then runs
# every test of the workspace. Used as is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# The embedded model, cached where the server and the tests look for it.
bash scripts/fetch-model.sh >/dev/null

cargo test --workspace --locked "$@"

# The official `openai` Python client against a live `heddle serve` (installs the client
# into a venv under target/).
bash scripts/test-python.sh
