#!/usr/bin/env bash
# The CUDA runner's checks and benchmarks, in one go, on the GPU machine (no Rust there:
# scripts/gpu/build.sh builds here and stages this folder's tree: bin/, scripts/, configs/,
# reference/, peer/). Run from that staged folder:
#
#   scripts/gpu/check-and-bench.sh [quick]
#
# 1. self-test: every kernel against CPU references, the runner against heddle's CPU
#    runner, CUDA graph replay, prompt log-probabilities, two tensor-parallel ranks on one
#    GPU against one rank; then scripts/gpu/tensor-parallel.sh: NCCL, the 8B shape split
#    over 2 ranks against 1, and TP=1 / TP=2 timings when two GPUs are visible;
# 2. reference: heddle's CUDA runner against HF transformers on checkpoints transformers
#    makes (scripts/gpu/reference/check_reference.py);
# 3. batch invariance at the Llama-3.1-8B shape, default and batch-invariant modes;
# 4. the embedded GGUF model on the GPU against the committed float64 reference, and
#    `heddle serve --device cuda` with no model answering a chat request over HTTP
#    (needs the GGUF: $HEDDLE_MODEL_DIR, or its parts, see below);
# 5. structured output: free vs JSON-schema throughput and mask time at 256 requests, and
#    256 sampled outputs under a schema, each checked (1B shape, the embedded tokenizer);
# 6. throughput in process on random Llama-3.2-1B and Llama-3.1-8B weights (256 requests
#    × 512 random prompt tokens → 128 output tokens, greedy, ignore_eos, all at once),
#    each also with overlapped steps (`--overlap`), 8B also in the batch-invariant mode,
#    single-stream decode, and the weight GEMMs alone
#    at decode row counts (`heddle-cuda gemm`); the same load through
#    `heddle serve` and `heddle bench` over HTTP; the transformers peer (unless `quick`).
# A summary table comes last. Logs go to $OUT (or /tmp/heddle-gpu).
set -u
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}
LOGS=${OUT:-/tmp/heddle-gpu}
mkdir -p "$LOGS"
: >"$LOGS/results.txt"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export HEDDLE_LOG=${HEDDLE_LOG:-info}
export NCCL_NVLS_ENABLE=0
MODE=${1:-full}
STATUS=0

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader

echo "== self-test"
"$BIN/heddle-cuda" selftest 2>"$LOGS/selftest.log" | tee "$LOGS/selftest.txt" || STATUS=1
grep -E "ERROR|panicked" "$LOGS/selftest.log" | cut -c1-400

echo "== tensor parallelism (scripts/gpu/tensor-parallel.sh)"
scripts/gpu/tensor-parallel.sh | tee "$LOGS/tensor-parallel.txt" || STATUS=1

echo "== reference: heddle vs HF transformers on checkpoints made by transformers"
PYTHONUNBUFFERED=1 python3 scripts/gpu/reference/check_reference.py \
  --heddle-cuda "$BIN/heddle-cuda" --work /tmp/heddle-reference --out "$LOGS" \
  2>"$LOGS/reference.err" | tee "$LOGS/reference.txt" || STATUS=1
tail -5 "$LOGS/reference.err"

echo "== batch invariance at the Llama-3.1-8B shape (random weights)"
"$BIN/heddle-cuda" invariance --config configs/llama-3.1-8b.json \
  2>"$LOGS/invariance.log" | tee -a "$LOGS/results.txt" || STATUS=1
grep -E "ERROR|panicked" "$LOGS/invariance.log" | cut -c1-400

# The embedded model: in $HEDDLE_MODEL_DIR, or assembled from parts (a call's files are
# limited in size, so the 98 MB file may come in pieces: /tmp/heddle-gguf-part-* left by
# an earlier call on the same machine, then model/part-* of this one).
export HEDDLE_MODEL_DIR=${HEDDLE_MODEL_DIR:-/tmp/heddle-models}
GGUF="$HEDDLE_MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$HEDDLE_MODEL_DIR"
if [ ! -f "$GGUF" ] && ls /tmp/heddle-gguf-part-* model/part-* >/dev/null 2>&1; then
  cat /tmp/heddle-gguf-part-* model/part-* >"$GGUF"
fi
if [ -f "$GGUF" ] && (cd "$HEDDLE_MODEL_DIR" && sha256sum -c --quiet "$OLDPWD/reference/embedded-model.sha256"); then
  echo "== embedded GGUF (SmolLM2-135M-Instruct Q4_1) on the GPU vs the float64 reference"
  for dtype in f32 bf16; do
    "$BIN/heddle-cuda" gguf --model "$GGUF" --reference reference/llamacpp_reference.json \
      --dtype $dtype 2>"$LOGS/gguf-$dtype.log" | tee -a "$LOGS/results.txt" || STATUS=1
    grep -E "ERROR|panicked" "$LOGS/gguf-$dtype.log" | cut -c1-400
  done
  echo "== heddle serve --device cuda (no model: the embedded one) + one chat request"
  "$BIN/heddle" serve --device cuda --port 18081 >"$LOGS/serve-embedded.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 120); do
    curl -sf localhost:18081/ready >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -s localhost:18081/v1/chat/completions -H 'content-type: application/json' -d '{
    "model": "smollm2-135m-instruct", "max_tokens": 32, "temperature": 0,
    "messages": [{"role": "system", "content": "You are a concise assistant."},
                 {"role": "user", "content": "What is the capital of France?"}]}' \
    | tee "$LOGS/chat-embedded.json" | python3 -c '
import json, sys
reply = json.load(sys.stdin)["choices"][0]["message"]["content"]
print("RESULT chat embedded_on_gpu reply=" + json.dumps(reply))' | tee -a "$LOGS/results.txt"
  kill "$SERVE_PID" 2>/dev/null
  wait "$SERVE_PID" 2>/dev/null
  grep -E "CUDA runner ready|WARN|ERROR" "$LOGS/serve-embedded.log" | cut -c1-300
else
  echo "== embedded GGUF: not here (or not the committed file), skipped"
fi

echo "== weight GEMMs alone, decode to prefill row counts, bf16 and FP8 (8B shape, random weights)"
"$BIN/heddle-cuda" gemm --config configs/llama-3.1-8b.json 2>"$LOGS/gemm.log" \
  | tee "$LOGS/gemm.txt" | grep -v "^RESULT"
grep "^RESULT gemm" "$LOGS/gemm.txt" >>"$LOGS/results.txt"

echo "== FP8 on this GPU: quantization vs the CPU, FP8 GEMMs vs f64, FP8 vs bf16 timings (8B shape)"
"$BIN/heddle-cuda" fp8 --config configs/llama-3.1-8b.json 2>"$LOGS/fp8.log" | tee "$LOGS/fp8.txt" \
  || echo "FP8: a check failed (the FP8 path is not used by the runner yet)"

# Then FP8 projections (and the FP8 KV cache), and the 128-in/128-out load at 1,024 requests, 512 at a time (the
# point TensorRT-LLM publishes its FP8 figure at), bf16 and FP8.
MAX_LOAD="--prompt-len 128 --output-len 128 --requests 1024 --max-running 512"
for run in llama-3.2-1b:--single-stream llama-3.1-8b:--single-stream \
  "llama-3.2-1b:--single-stream --overlap" "llama-3.1-8b:--single-stream --overlap" \
  "llama-3.1-8b:--single-stream --batch-invariant" \
  "llama-3.2-1b:--single-stream --quantization fp8" "llama-3.1-8b:--single-stream --quantization fp8" \
  "llama-3.1-8b:--single-stream --quantization fp8 --kv-cache-dtype fp8" \
  "llama-3.1-8b:$MAX_LOAD" "llama-3.1-8b:$MAX_LOAD --quantization fp8" \
  "llama-3.1-8b:$MAX_LOAD --quantization fp8 --kv-cache-dtype fp8" \
  "llama-3.1-8b:$MAX_LOAD --quantization fp8 --kv-cache-dtype fp8 --overlap"; do
  shape=${run%%:*}
  extra=${run#*:}
  echo "== heddle in-process bench $shape $extra"
  "$BIN/heddle-cuda" bench --config "configs/$shape.json" $extra \
    2>"$LOGS/bench-$shape$(echo $extra | tr -d ' -').log" | tee -a "$LOGS/results.txt"
  grep -E "CUDA runner ready|ERROR|panicked" "$LOGS/bench-$shape$(echo $extra | tr -d ' -').log" | cut -c1-300
done

echo "== structured output on the GPU: Llama-3.2-1B shape, random weights, the embedded tokenizer"
# 256 requests x 128 random prompt tokens -> 128 greedy tokens, free then under a JSON schema
# the 128 tokens cannot complete (so both generate as many), then 256 sampled requests under
# a schema they can complete, each output checked.
"$BIN/engine_throughput" model/embedded-tokenizer.gguf --cuda-shape configs/llama-3.2-1b.json \
  --concurrency 256 --json-schema --check-valid 256 2>"$LOGS/structured.log" \
  | tee "$LOGS/structured.txt" || STATUS=1
grep -E "ERROR|panicked" "$LOGS/structured.log" | cut -c1-400
sed -n 's/^| 256 | \([0-9.]*\) | \([0-9.]*\) | \([0-9.]*\) | \([0-9.]*\) | \([0-9.]*\) | .*$/RESULT structured free_tok_s=\1 schema_tok_s=\2 ratio=\3 mask_ms_per_step=\4 wait_ms_per_step=\5/p' \
  "$LOGS/structured.txt" | tee -a "$LOGS/results.txt"
grep "^RESULT structured_valid" "$LOGS/structured.txt" >>"$LOGS/results.txt"

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
  if [ "$shape" = llama-3.2-1b ]; then
    # Prompt log-probabilities over HTTP: `echo` with `logprobs` and `max_tokens: 0` on 300
    # token ids (one prefill chunk, scored in two pieces of 256 rows).
    python3 - "$shape" <<'PY' | tee -a "$LOGS/results.txt"
import json, math, sys, urllib.request
prompt = [(i * 7919) % 128000 + 100 for i in range(300)]
body = {"model": sys.argv[1], "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0}
req = urllib.request.Request("http://127.0.0.1:18080/v1/completions", json.dumps(body).encode(),
                             {"content-type": "application/json"})
r = json.load(urllib.request.urlopen(req))
lp = r["choices"][0]["logprobs"]
values = lp["token_logprobs"]
ok = (len(values) == len(prompt) == r["usage"]["prompt_tokens"] and values[0] is None
      and all(v is not None and math.isfinite(v) and v <= 0 for v in values[1:])
      and all(t is None or len(t) == 2 for t in lp["top_logprobs"]))
print(f"RESULT echo_http ok={int(ok)} scored={len(values) - 1} "
      f"mean_logprob={sum(values[1:]) / (len(values) - 1):.3f}")
PY
  fi
  "$BIN/heddle" bench --url http://127.0.0.1:18080 --model "$shape" \
    --tokenizer /tmp/heddle-dummy-tokenizer/tokenizer.json --num-prompts 256 \
    --input-len 512 --output-len 128 --ignore-eos --no-progress --warmup-requests 4 \
    >"$LOGS/http-$shape.txt" 2>"$LOGS/http-$shape.log"
  grep -E "throughput|Successful|Failed|Benchmark duration" "$LOGS/http-$shape.txt"
  sed -n 's/.*Output token throughput (tok\/s)[^0-9]*\([0-9.]*\).*/HTTP model='"$shape"' output_tok_s=\1/p' \
    "$LOGS/http-$shape.txt" | head -1 | tee -a "$LOGS/results.txt"
  kill "$SERVE_PID" 2>/dev/null
  wait "$SERVE_PID" 2>/dev/null
  grep -E "ERROR|WARN" "$LOGS/serve-$shape.log" | cut -c1-300
done

if [ "$MODE" != quick ] && [ ! -f peer/transformers_cb.py ]; then
  echo "== peer transformers_cb: not staged (scripts/gpu/build.sh found no ../shared), skipped"
elif [ "$MODE" != quick ]; then
  for shape in 1b 8b; do
    echo "== peer transformers_cb $shape"
    python3 peer/transformers_cb.py $shape 256 512 128 2>"$LOGS/peer-$shape.log" \
      | grep -E "RESULT|bandwidth|attn impl" | tee -a "$LOGS/results.txt"
  done
fi

echo
echo "== summary"
tail -n 1 "$LOGS/selftest.txt"
sed -n '/^== heddle CUDA runner vs HF transformers/,$p' "$LOGS/reference.txt"
sed -n '/^== tensor parallelism summary/,$p' "$LOGS/tensor-parallel.txt"
python3 - "$LOGS/results.txt" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
inv = [l for l in lines if l.startswith("RESULT invariance")]
if inv:
    print("batch invariance, Llama-3.1-8B shape, random weights (watched request: 300-token prompt, 32 greedy tokens; logprobs: chosen + top 20):")
    for l in inv:
        m = dict(re.findall(r"(\w+)=(\S+)", l))
        print(f"  {m['mode']:16} batch {m['batch']:>4}: tokens differing {m['tokens_differing']:>6}, "
              f"max |d logprob| {float(m['max_logprob_difference']):9.2e}  {l.split()[-1]}")
for l in lines:
    if l.startswith("RESULT gguf") and "equal=" in l:
        print("embedded GGUF on the GPU vs float64 greedy: " + l[len("RESULT gguf "):])
    if l.startswith("RESULT structured"):
        print("structured output, 1B shape, random weights, in process: " + l[len("RESULT "):])
    if l.startswith("RESULT echo_http"):
        print("heddle serve --device cuda, 1B shape, random weights, echo + prompt logprobs over HTTP: " + l[len("RESULT echo_http "):])
    if l.startswith("RESULT chat"):
        print("heddle serve --device cuda, embedded model, chat reply: " + l.split("reply=", 1)[1])
heddle, peer, http, single = {}, {}, {}, {}
for line in lines:
    m = re.search(r"RESULT model=llama-3\.(?:2|1)-([\w+]+) requests=\d+ prompt=(\d+) output=(\d+).*?seconds=([\d.]+) output_tok_s=([\d.]+)", line)
    if m:
        key = m.group(1) if (m.group(2), m.group(3)) == ("512", "128") else f"{m.group(1)} {m.group(2)}/{m.group(3)}"
        heddle[key] = (float(m.group(4)), float(m.group(5)))
    m = re.search(r"HTTP model=llama-3\.(?:2|1)-(\w+) output_tok_s=([\d.]+)", line)
    if m: http[m.group(1)] = float(m.group(2))
    m = re.search(r"RESULT model=llama-3\.(?:2|1)-([\w+]+) single_stream decode_ms_per_token=([\d.]+)", line)
    if m: single[m.group(1)] = float(m.group(2))
    m = re.search(r"shape=(\w+).*?: ([\d.]+)s, generated \d+ tokens, (\d+) output tok/s", line)
    if m: peer[m.group(1)] = (float(m.group(2)), float(m.group(3)))
print("throughput, output tokens/s, 256 x 512 -> 128 (128/128: 1,024 x 128 -> 128, 512 at a time), random weights (in process: heddle-cuda bench; HTTP: heddle serve + heddle bench):")
print(f"  {'model':20} {'heddle s':>9} {'in-process':>11} {'HTTP':>8} {'peer':>7} {'single-stream ms/token':>23}")
for k in ["1b", "1b+overlap", "1b+fp8", "8b", "8b+overlap", "8b+fp8", "8b+fp8+fp8kv",
          "8b+invariant", "8b 128/128", "8b+fp8 128/128", "8b+fp8+fp8kv 128/128",
          "8b+fp8+fp8kv+overlap 128/128"]:
    if k not in heddle: continue
    s, t = heddle[k]
    p = peer.get(k, (None, None))[1]
    h = http.get(k)
    ss = single.get(k)
    print(f"  {k:20} {s:9.2f} {t:11.0f} {(f'{h:.0f}' if h else '-'):>8} {(p if p else '-'):>7} {(f'{ss:.2f}' if ss else '-'):>23}")
PY
exit $STATUS
