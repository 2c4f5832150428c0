#!/usr/bin/env bash
# The CUDA runner's checks and benchmarks, in one go, on the GPU machine (no Rust there:
# build here first with scripts/gpu/build.sh, which leaves the binaries in .gpu-bin/).
#
#   scripts/gpu/check-and-bench.sh [quick]
#
# Prints the self-test table, heddle's in-process throughput on random Llama-3.2-1B and
# Llama-3.1-8B weights (256 requests × 512 random prompt tokens → 128 output tokens,
# greedy, ignore_eos, all at once), single-stream 8B decode, the same load through
# `heddle serve --device cuda` and `heddle bench` over HTTP, the transformers peer on the
# same load (unless `quick`), and a summary table last.
# Logs go to $OUT (or /tmp/heddle-gpu) for the device tool to bring back.
set -u
cd "$(dirname "$0")/../.."
BIN=${BIN:-.gpu-bin}
LOGS=${OUT:-/tmp/heddle-gpu}
mkdir -p "$LOGS"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export HEDDLE_LOG=${HEDDLE_LOG:-info}
MODE=${1:-full}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader

echo "== self-test"
"$BIN/heddle-cuda" selftest 2>"$LOGS/selftest.log" | tee "$LOGS/selftest.txt"
tail -5 "$LOGS/selftest.log"

for shape in llama-3.2-1b llama-3.1-8b; do
  echo "== heddle in-process bench $shape"
  extra=""
  [ "$shape" = llama-3.1-8b ] && extra="--single-stream"
  "$BIN/heddle-cuda" bench --config "configs/$shape.json" $extra \
    2>"$LOGS/bench-$shape.log" | tee -a "$LOGS/results.txt"
  grep -E "CUDA runner ready|kernels compiled|ERROR|panicked" "$LOGS/bench-$shape.log" | cut -c1-400
done

# `heddle serve` on the GPU, driven over HTTP by `heddle bench` (the same load; prompts are
# text of the stand-in tokenizer's words, exactly 512 tokens each).
"$BIN/heddle-cuda" tokenizer --vocab-size 128256 --out /tmp/heddle-dummy-tokenizer
for shape in llama-3.2-1b llama-3.1-8b; do
  echo "== heddle serve --device cuda --dummy-weights ($shape) + heddle bench"
  "$BIN/heddle" serve --device cuda --dummy-weights --model-config "configs/$shape.json" \
    --port 18080 >"$LOGS/serve-$shape.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 240); do
    curl -sf localhost:18080/ready >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -s localhost:18080/v1/completions -H 'content-type: application/json' \
    -d "{\"model\":\"$shape\",\"prompt\":[128000,791,6864,315,9822,374],\"max_tokens\":8,\"temperature\":0}"
  echo
  "$BIN/heddle" bench --url http://127.0.0.1:18080 --model "$shape" \
    --tokenizer /tmp/heddle-dummy-tokenizer/tokenizer.json --num-prompts 256 \
    --input-len 512 --output-len 128 --ignore-eos --no-progress --warmup-requests 4 \
    >"$LOGS/http-$shape.txt" 2>"$LOGS/http-$shape.log"
  grep -E "throughput|Successful|Failed|Benchmark duration" "$LOGS/http-$shape.txt"
  sed -n 's/.*Output token throughput (tok\/s)[^0-9]*\([0-9.]*\).*/HTTP model='"$shape"' output_tok_s=\1/p' \
    "$LOGS/http-$shape.txt" | head -1 | tee -a "$LOGS/results.txt"
  kill "$SERVE_PID" 2>/dev/null
  wait "$SERVE_PID" 2>/dev/null
  grep -E "CUDA runner ready|ERROR|WARN" "$LOGS/serve-$shape.log" | cut -c1-400
done

if [ "$MODE" != quick ]; then
  for shape in 1b 8b; do
    echo "== peer transformers_cb $shape"
    python3 .peer/transformers_cb.py $shape 256 512 128 2>"$LOGS/peer-$shape.log" \
      | grep -E "RESULT|bandwidth|attn impl" | tee -a "$LOGS/results.txt"
  done
fi

echo
echo "== summary (output tokens/s, 256 × 512 → 128)"
python3 - "$LOGS/results.txt" <<'PY'
import re, sys
heddle, peer, http, single = {}, {}, {}, None
for line in open(sys.argv[1]):
    m = re.search(r"RESULT model=llama-3\.(?:2|1)-(\w+) requests.*?seconds=([\d.]+) output_tok_s=([\d.]+)", line)
    if m: heddle[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    m = re.search(r"HTTP model=llama-3\.(?:2|1)-(\w+) output_tok_s=([\d.]+)", line)
    if m: http[m.group(1)] = float(m.group(2))
    m = re.search(r"single_stream decode_ms_per_token=([\d.]+)", line)
    if m: single = float(m.group(1))
    m = re.search(r"shape=(\w+).*?: ([\d.]+)s, generated \d+ tokens, (\d+) output tok/s", line)
    if m: peer[m.group(1)] = (float(m.group(2)), float(m.group(3)))
floor = {"1b": 0.8, "8b": 4.5}
print(f"{'model':6} {'heddle s':>9} {'heddle tok/s':>13} {'HTTP tok/s':>11} {'peer tok/s':>11} {'vs peer':>8} {'floor s':>8} {'vs floor':>9}")
for k in ["1b", "8b"]:
    if k not in heddle: continue
    s, t = heddle[k]
    p = peer.get(k, (None, None))[1]
    ratio = f"{t/p:.1f}x" if p else "-"
    h = http.get(k)
    hs = f"{h:.0f}" if h else "-"
    print(f"{k:6} {s:9.2f} {t:13.0f} {hs:>11} {p if p else '-':>11} {ratio:>8} {floor[k]:8.1f} {s/floor[k]:8.1f}x")
if single is not None:
    print(f"single-stream 8B decode: {single:.2f} ms/token (weight-read floor 5.4 ms, goal <= 7.0)")
PY
