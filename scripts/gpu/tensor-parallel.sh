#!/usr/bin/env bash
# Tensor parallelism (issue 14) on the GPU machine, from the folder scripts/gpu/build.sh
# staged (check-and-bench.sh runs it after the self-test, whose checks already include two
# ranks on one GPU against one rank on small checkpoints):
#
#   scripts/gpu/tensor-parallel.sh
#
# 1. NCCL on its own (`heddle-cuda nccl`): all-reduces in f32 and bf16, direct and from
#    CUDA graphs, and the logits gather, checked exactly: one rank per GPU over every GPU
#    visible, with the peer-to-peer all-reduce fused with the norm checked exactly too and
#    both timed on one decode row; with one GPU, one rank, and two ranks on that GPU, which
#    NCCL is expected to refuse (reported, not judged);
# 2. the Llama-3.1-8B shape on random weights split over 2 ranks against 1 rank
#    (`heddle-cuda tensor-parallel`): greedy tokens identical in f32, logits errors in bf16,
#    CUDA graph replay against direct launches; over NCCL with two GPUs, else both ranks on
#    the one GPU (the test placement); with two GPUs also `heddle serve
#    --tensor-parallel-size 2` answering a completion over HTTP;
# 3. timings at the 8B shape (the load of docs/PERFORMANCE_GPU.md: 256 requests x 512
#    random prompt tokens -> 128, and single-stream decode) at TP=1, and at TP=2 when two
#    GPUs are visible: peer-to-peer sums for every step (the default with two ranks), for
#    steps of up to 512 tokens only (prefill through NCCL), NCCL for every step, and no
#    sums at all (wrong tokens: what the collectives cost); TP=1 and peer-to-peer TP=2
#    also with overlapped steps (`--overlap`). Goals: TP=2 throughput >= 1.7x TP=1's,
#    single-stream decode <= 0.6x TP=1's time;
# 4. with two GPUs of 120 GB or more, the Llama-3.1-70B shape at TP=2 (about 70 GB of
#    weights a GPU): throughput and single-stream decode.
# TP_SKIP="serve checks 70b" leaves those parts out. A summary comes last. Logs go to $OUT
# (or /tmp/heddle-gpu).
set -u
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}
LOGS=${OUT:-/tmp/heddle-gpu}
mkdir -p "$LOGS"
: >"$LOGS/tensor-parallel-results.txt"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export HEDDLE_LOG=${HEDDLE_LOG:-info}
# NVLink multicast stays off (heddle sets this itself when it is unset).
export NCCL_NVLS_ENABLE=0
STATUS=0
# Each step is bounded, so that a collective that never completes costs minutes, not the
# whole run.
T="timeout --kill-after=10"
RESULTS="$LOGS/tensor-parallel-results.txt"

# NCCL: this machine has none under /usr/local/cuda; PyTorch's nvidia-nccl wheel ships
# libnccl.so.2. cudarc opens libnccl.so (or .so.1, .so.13, ...), never .so.2, so a link
# named libnccl.so goes in a folder of our own on LD_LIBRARY_PATH.
NCCL_DIR=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0] + "/lib")' 2>/dev/null)
if [ ! -f "${NCCL_DIR:-}/libnccl.so.2" ]; then
  NCCL_DIR=
  for d in $(python3 -c 'import site; print(*site.getsitepackages())' 2>/dev/null); do
    found=$(find "$d" -name libnccl.so.2 2>/dev/null | head -1)
    if [ -n "$found" ]; then
      NCCL_DIR=$(dirname "$found")
      break
    fi
  done
fi
if [ -n "$NCCL_DIR" ]; then
  mkdir -p /tmp/heddle-nccl
  ln -sf "$NCCL_DIR/libnccl.so.2" /tmp/heddle-nccl/libnccl.so
  export LD_LIBRARY_PATH=/tmp/heddle-nccl:$NCCL_DIR:$LD_LIBRARY_PATH
  echo "NCCL: $NCCL_DIR/libnccl.so.2"
else
  echo "NCCL: no libnccl.so.2 in python's site-packages; relying on the system's"
fi
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
echo "GPUs visible: $GPUS"
skipped() { case " ${TP_SKIP:-} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

echo "== NCCL on its own"
if [ "$GPUS" -ge 2 ]; then
  $T 120 "$BIN/heddle-cuda" nccl --ranks "$GPUS" 2>"$LOGS/nccl.log" | tee -a "$RESULTS" || STATUS=1
else
  $T 120 "$BIN/heddle-cuda" nccl --ranks 1 2>"$LOGS/nccl.log" | tee -a "$RESULTS" || STATUS=1
  $T 120 "$BIN/heddle-cuda" nccl --ranks 2 --ranks-on-first-gpu \
    >"$LOGS/nccl-one-gpu.txt" 2>"$LOGS/nccl-one-gpu.log"
  code=$?
  why=$(grep -h -E "^Error|RESULT" "$LOGS/nccl-one-gpu.log" "$LOGS/nccl-one-gpu.txt" | tail -1 | cut -c1-240)
  echo "RESULT nccl_two_ranks_on_one_gpu exit=$code $why" | tee -a "$RESULTS"
fi
grep -h -E "ERROR|panicked|NCCL communicators ready|^Error" "$LOGS/nccl.log" | cut -c1-300

PLACEMENT=
[ "$GPUS" -ge 2 ] || PLACEMENT=--ranks-on-first-gpu
if ! skipped checks; then
  echo "== Llama-3.1-8B shape, random weights: 2 ranks against 1"
  $T 400 "$BIN/heddle-cuda" tensor-parallel --config configs/llama-3.1-8b.json --size 2 $PLACEMENT \
    2>"$LOGS/tensor-parallel.log" | tee -a "$RESULTS" || STATUS=1
  grep -E "ERROR|panicked|^Error|peer-to-peer" "$LOGS/tensor-parallel.log" | cut -c1-400
fi

if [ "$GPUS" -ge 2 ] && ! skipped serve; then
  echo "== heddle serve --device cuda --tensor-parallel-size 2 (random 8B weights) + one completion"
  $T 240 "$BIN/heddle" serve --device cuda --dummy-weights --model-config configs/llama-3.1-8b.json \
    --tensor-parallel-size 2 --port 18082 >"$LOGS/serve-tp2.log" 2>&1 &
  SERVE_PID=$!
  for _ in $(seq 1 240); do
    curl -sf localhost:18082/ready >/dev/null 2>&1 && break
    sleep 0.5
  done
  curl -s localhost:18082/v1/completions -H 'content-type: application/json' \
    -d '{"model": "llama-3.1-8b", "prompt": [128000, 791, 6864, 315, 9822, 374], "max_tokens": 16, "temperature": 0}' \
    | python3 -c '
import json, sys
try:
    r = json.load(sys.stdin)
    n, text = r["usage"]["completion_tokens"], r["choices"][0]["text"]
    print(f"RESULT serve_tp2 ok={int(n == 16)} completion_tokens={n} text={json.dumps(text[:60])}")
except Exception as e:
    print(f"RESULT serve_tp2 ok=0 error={e!r}")' | tee -a "$RESULTS"
  kill "$SERVE_PID" 2>/dev/null
  wait "$SERVE_PID" 2>/dev/null
  grep -E "CUDA runner ready|NCCL communicators|ERROR|WARN" "$LOGS/serve-tp2.log" | cut -c1-300
fi

echo "== timings, Llama-3.1-8B shape: TP=1 and TP=2"
for overlap in "" --overlap; do
  $T 300 "$BIN/heddle-cuda" bench --config configs/llama-3.1-8b.json --single-stream $overlap \
    2>"$LOGS/bench-tp1$overlap.log" | tee -a "$RESULTS"
  grep -E "CUDA runner ready|ERROR|panicked" "$LOGS/bench-tp1$overlap.log" | cut -c1-300
done
if [ "$GPUS" -ge 2 ]; then
  for sums in peer-to-peer "peer-to-peer --overlap" peer-to-peer-small-steps nccl skip-for-timing; do
    log="$LOGS/bench-tp2-$(echo $sums | tr -d ' ').log"
    $T 300 "$BIN/heddle-cuda" bench --config configs/llama-3.1-8b.json --single-stream \
      --tensor-parallel-size 2 --all-reduce $sums 2>"$log" | tee -a "$RESULTS"
    grep -E "CUDA runner ready|NCCL|peer-to-peer|ERROR|WARN|panicked" "$log" | cut -c1-300
  done
fi
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sort -n | head -1)
if [ "$GPUS" -ge 2 ] && [ "${GPU_MIB:-0}" -ge 120000 ] && ! skipped 70b; then
  echo "== timings, Llama-3.1-70B shape: TP=2"
  $T 400 "$BIN/heddle-cuda" bench --config configs/llama-3.1-70b.json --single-stream \
    --tensor-parallel-size 2 2>"$LOGS/bench-70b-tp2.log" | tee -a "$RESULTS"
  grep -E "CUDA runner ready|peer-to-peer|ERROR|WARN|panicked" "$LOGS/bench-70b-tp2.log" | cut -c1-300
fi

echo
echo "== tensor parallelism summary"
python3 - "$RESULTS" "$GPUS" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
gpus = int(sys.argv[2])
for l in lines:
    if l.startswith("RESULT nccl"):
        print("  " + l[len("RESULT "):])
for l in lines:
    if l.startswith("RESULT tensor_parallel") or l.startswith("RESULT serve_tp2"):
        print("  " + l[len("RESULT "):])
runs, single = {}, {}
for l in lines:
    m = re.search(r"RESULT model=(llama-3\.1-\d+b\S*) requests.*?seconds=([\d.]+) output_tok_s=([\d.]+).*?mean_decode_step_ms=([\d.]+) \(runner host ([\d.]+).*?packing ([\d.]+)", l)
    if m: runs[m.group(1)] = tuple(float(m.group(i)) for i in range(2, 7))
    m = re.search(r"RESULT model=(llama-3\.1-\d+b\S*) single_stream decode_ms_per_token=([\d.]+)", l)
    if m: single[m.group(1)] = float(m.group(2))
print("timings, random weights, 256 x 512 -> 128 (in process):")
names = [("llama-3.1-8b", "8B TP=1"), ("llama-3.1-8b+tp2", "8B TP=2 (peer-to-peer)"),
         ("llama-3.1-8b+overlap", "8B TP=1, overlapped steps"),
         ("llama-3.1-8b+tp2+overlap", "8B TP=2 (peer-to-peer), overlapped"),
         ("llama-3.1-8b+tp2+p2psmall", "8B TP=2 (peer-to-peer <= 512 tokens)"),
         ("llama-3.1-8b+tp2+nccl", "8B TP=2 (NCCL)"), ("llama-3.1-8b+tp2+nosums", "8B TP=2 (no sums, timing only)"),
         ("llama-3.1-70b+tp2", "70B TP=2 (peer-to-peer)")]
for k, name in names:
    if k in runs:
        s, t, step, host, pack = runs[k]
        print(f"  {name:36} {s:7.2f} s {t:9.0f} output tok/s  decode step {step:6.2f} ms (host {host:.2f}, packing {pack:.2f})  single-stream {single.get(k, float('nan')):.2f} ms/token")
for one, k, name in [("llama-3.1-8b", k, name) for k, name in names[1:2] + names[4:7]] + [
        ("llama-3.1-8b+overlap", "llama-3.1-8b+tp2+overlap", "8B TP=2 (peer-to-peer), overlapped")]:
    if one in runs and k in runs:
        speedup = runs[k][1] / runs[one][1]
        ratio = single[k] / single[one]
        print(f"  {name} / TP=1: throughput {speedup:.2f}x (goal >= 1.7x), single-stream time {ratio:.2f}x (goal <= 0.6x)")
if gpus < 2:
    print("  TP=2 timing not run: one GPU visible (NCCL needs a GPU per rank)")
PY
exit $STATUS
