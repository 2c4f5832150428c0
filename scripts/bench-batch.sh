#!/usr/bin/env bash
# Interactive latency with and without a Batch API batch running, and the batch's own
# throughput, on the embedded model (issue 12's measurement):
#
#   1. `heddle serve` (release) with a fresh data dir;
#   2. `heddle bench` alone: INTERACTIVE_PROMPTS completions requests at REQUEST_RATE/s,
#      INPUT_LEN → OUTPUT_LEN tokens (the idle figures);
#   3. a batch of BATCH_LINES completions lines (BATCH_OUTPUT_LEN tokens each, ignore_eos)
#      is uploaded and started, and the same `heddle bench` runs again while it runs;
#   4. the batch is waited for; its throughput is its output tokens over its run time.
#
#   scripts/bench-batch.sh
#   BATCH_LINES=200 INTERACTIVE_PROMPTS=40 scripts/bench-batch.sh
#
# Prints a summary (TTFT and TPOT p50/p90 of both runs, the batch's throughput) and
# writes the JSON reports to OUT_DIR (default target/bench-results/batch-<time>).
# Needs: cargo, curl, python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$PWD"

BATCH_LINES="${BATCH_LINES:-1000}"
BATCH_OUTPUT_LEN="${BATCH_OUTPUT_LEN:-32}"
INTERACTIVE_PROMPTS="${INTERACTIVE_PROMPTS:-60}"
REQUEST_RATE="${REQUEST_RATE:-2}"
INPUT_LEN="${INPUT_LEN:-64}"
OUTPUT_LEN="${OUTPUT_LEN:-32}"
PORT="${PORT:-18090}"
MODEL_ID="smollm2-135m-instruct"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/target/bench-results/batch-$(date +%Y%m%d-%H%M%S)}"
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
HEDDLE="$TARGET_DIR/release/heddle"
BASE="http://127.0.0.1:$PORT"

mkdir -p "$OUT_DIR"
scripts/fetch-model.sh >&2
cargo build --release -p heddle-server --bin heddle >&2

DATA_DIR="$(mktemp -d)"
"$HEDDLE" serve --port "$PORT" --data-dir "$DATA_DIR" >"$OUT_DIR/server.log" 2>&1 &
SERVER_PID=$!
cleanup() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    rm -rf "$DATA_DIR"
}
trap cleanup EXIT
for _ in $(seq 1 120); do
    curl -sf "$BASE/ready" >/dev/null && break
    sleep 0.5
done
curl -sf "$BASE/ready" >/dev/null || { echo "the server did not get ready" >&2; exit 1; }

run_bench() {
    "$HEDDLE" bench --url "$BASE/v1" --model "$MODEL_ID" --endpoint completions \
        --num-prompts "$INTERACTIVE_PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
        --ignore-eos --request-rate "$REQUEST_RATE" --seed "$1" --no-progress \
        --label "$2" --json "$OUT_DIR/$2.json" >&2
}

run_bench 1 idle

python3 - "$BATCH_LINES" "$BATCH_OUTPUT_LEN" "$MODEL_ID" >"$OUT_DIR/batch.jsonl" <<'PY'
import json, sys
lines, output_len, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
for i in range(lines):
    body = {"model": model, "prompt": f"Item {i}: write a short note about weaving.",
            "max_tokens": output_len, "temperature": 0, "ignore_eos": True}
    print(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions", "body": body}))
PY
FILE_ID="$(curl -sf "$BASE/v1/files" -F purpose=batch -F "file=@$OUT_DIR/batch.jsonl" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
BATCH_ID="$(curl -sf "$BASE/v1/batches" -H 'content-type: application/json' \
    -d "{\"input_file_id\": \"$FILE_ID\", \"endpoint\": \"/v1/completions\", \"completion_window\": \"24h\"}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
echo "batch $BATCH_ID started" >&2
# Let the batch fill its slots before measuring.
sleep 2

run_bench 2 with-batch
COMPLETED_DURING="$(curl -sf "$BASE/v1/batches/$BATCH_ID" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["request_counts"]["completed"])')"

while :; do
    STATUS="$(curl -sf "$BASE/v1/batches/$BATCH_ID" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')"
    case "$STATUS" in
        completed) break ;;
        failed|expired|cancelled) echo "the batch ended $STATUS" >&2; exit 1 ;;
    esac
    sleep 2
done
curl -sf "$BASE/v1/batches/$BATCH_ID" >"$OUT_DIR/batch.json"
OUTPUT_ID="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["output_file_id"])' "$OUT_DIR/batch.json")"
curl -sf "$BASE/v1/files/$OUTPUT_ID/content" >"$OUT_DIR/batch-output.jsonl"

python3 - "$OUT_DIR" "$COMPLETED_DURING" <<'PY' | tee "$OUT_DIR/summary.md"
import json, sys, os
out, during = sys.argv[1], int(sys.argv[2])
rows = []
for label in ("idle", "with-batch"):
    r = json.load(open(os.path.join(out, f"{label}.json")))["result"]
    rows.append((label, r["completed"], r["failed"], r["ttft_ms"]["median"], r["ttft_ms"]["p90"],
                 r["tpot_ms"]["median"], r["tpot_ms"]["p90"], r["output_throughput"]))
print("| interactive run | completed | failed | TTFT p50 ms | TTFT p90 ms | TPOT p50 ms | TPOT p90 ms | output tok/s |")
print("|---|---|---|---|---|---|---|---|")
for row in rows:
    print("| {} | {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.1f} | {:.1f} |".format(*row))
batch = json.load(open(os.path.join(out, "batch.json")))
tokens = sum(json.loads(l)["response"]["body"]["usage"]["completion_tokens"]
             for l in open(os.path.join(out, "batch-output.jsonl")))
seconds = max(1, batch["finalizing_at"] - batch["in_progress_at"])
counts = batch["request_counts"]
print()
print(f"batch: {counts['completed']}/{counts['total']} lines, {tokens} output tokens in {seconds} s "
      f"= {tokens / seconds:.1f} output tok/s ({during} lines done while the interactive run ran)")
print(f"interactive TTFT p90 with the batch / idle: {rows[1][4] / rows[0][4]:.2f}x")
PY
