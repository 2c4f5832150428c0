#!/usr/bin/env bash
# Runs README.md's quick start as a newcomer types it, taken from the README itself so the
# two cannot drift apart: the commands of its first `sh` block (the serve command first
# with --help, then for real in the background), then its curl example and its Python
# example against that server. Used by CI (.ci/run), after scripts/test.sh has made the
# Python venv with the openai client (HEDDLE_PYTHON, or scripts/python-client.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# The README's fenced blocks of one language, NUL-separated.
blocks() {
    python3 - "$1" <<'EOF'
import re, sys
text = open("README.md", encoding="utf-8").read()
for body in re.findall(r"^```" + re.escape(sys.argv[1]) + r"\n(.*?)^```", text, re.S | re.M):
    sys.stdout.write(body + "\0")
EOF
}

mapfile -d '' sh_blocks < <(blocks sh)
mapfile -d '' python_blocks < <(blocks python)
quick_start="${sh_blocks[0]}"
curl_example="${sh_blocks[1]}"
python_example="${python_blocks[0]}"
[[ "$curl_example" == curl* ]] || { echo "README: the second sh block is not the curl example" >&2; exit 1; }

server_pid=""
stop_server() {
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid"
        wait "$server_pid" || true
    fi
}
trap stop_server EXIT

while IFS= read -r line; do
    command="${line%%#*}"                      # the README's comments are not typed
    command="${command%"${command##*[![:space:]]}"}"
    [[ -z "$command" ]] && continue
    echo "+ $command" >&2
    if [[ "$command" == *" serve" ]]; then
        eval "$command --help" >/dev/null
        # exec: the background job becomes the server itself (cargo run execs it too),
        # so stopping it stops the server rather than only a wrapping shell.
        eval "exec $command" &
        server_pid=$!
    else
        eval "$command" >/dev/null
    fi
done <<<"$quick_start"
[[ -n "$server_pid" ]] || { echo "README: the quick start starts no server" >&2; exit 1; }

for _ in $(seq 1 120); do
    curl -sf http://127.0.0.1:8080/ready >/dev/null && break
    kill -0 "$server_pid" 2>/dev/null || { echo "the server exited" >&2; exit 1; }
    sleep 1
done

echo "+ the curl example" >&2
reply="$(eval "$curl_example")"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); assert r["choices"][0]["message"]["content"], r' "$reply"

echo "+ the Python example" >&2
python="${HEDDLE_PYTHON:-$(bash scripts/python-client.sh)}"
printed="$("$python" -c "$python_example")"
[[ -n "$printed" ]] || { echo "the Python example printed nothing" >&2; exit 1; }
echo "README quick start: ok" >&2
