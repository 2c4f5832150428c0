#!/usr/bin/env bash
# heddle against llama.cpp's llama-server on this machine's CPU, same model (the embedded
# SmolLM2-135M-Instruct Q4_1 GGUF), same workloads, measured by `heddle bench`:
#
#   - random prompts of INPUT_LEN tokens, OUTPUT_LEN output tokens (ignore_eos), all sent
#     at once (request rate inf) under max concurrency N, for N in LEVELS;
#   - a shared-prefix workload (PREFIX_LEN shared tokens + INPUT_LEN random ones) at the
#     highest level.
#
# Both servers compute with THREADS threads. One heddle process serves every level;
# llama-server is started per level with --parallel N slots (its batch width is fixed at
# start). The two are measured back to back at each level, REPEATS times over, so that
# both see much the same machine load (other processes' load hurts both, and
# llama.cpp's spinning thread barriers most); the summary keeps each one's best repeat.
# Every (repeat, level) has its own seed, so no run finds an earlier run's prompts in a
# cache; both servers get the same prompts.
#
#   scripts/bench-cpu-vs-llamacpp.sh
#   LEVELS="1 4 16" THREADS=2 REPEATS=2 OUT_DIR=target/bench-results/mine scripts/bench-cpu-vs-llamacpp.sh
#   MODEL=/path/to/SmolLM2-135M-Instruct.Q8_0.gguf scripts/bench-cpu-vs-llamacpp.sh
#   MODELS="embedded random-1b" scripts/bench-cpu-vs-llamacpp.sh
#
# MODELS runs the whole benchmark once per model, each in OUT_DIR/<name>: `embedded` (the
# embedded Q4_1 file), `random-1b` (the random Llama-3.2-1B-shape Q4_K_M of
# scripts/make-test-models.sh, made if missing), or a GGUF path. Every run first measures
# the machine's streaming-read bandwidth with THREADS threads and the decode floor of the
# model (its file read once per step), in meta.txt and under the summary.
#
# JSON reports land in OUT_DIR (default target/bench-results/cpu-vs-llamacpp-<time>),
# named SERVER-WORKLOAD-cN-rREPEAT.json; the summary table is printed and written to
# OUT_DIR/summary.md.
# Needs: cargo, python3 with pip (the model and llama.cpp's sources come from PyPI).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO_ROOT="$PWD"

LEVELS="${LEVELS:-1 4 16}"
INPUT_LEN="${INPUT_LEN:-128}"
OUTPUT_LEN="${OUTPUT_LEN:-128}"
PREFIX_LEN="${PREFIX_LEN:-256}"
THREADS="${THREADS:-$(nproc)}"
REPEATS="${REPEATS:-2}"
HEDDLE_PORT="${HEDDLE_PORT:-18080}"
LLAMA_PORT="${LLAMA_PORT:-18081}"
MODEL_ID="smollm2-135m-instruct"
OUT_DIR="${OUT_DIR:-$REPO_ROOT/target/bench-results/cpu-vs-llamacpp-$(date +%Y%m%d-%H%M%S)}"
# KV positions per llama-server slot (-c is shared evenly by the --parallel slots):
# twice the longest sequence, prefix + prompt + output, so no slot ever runs out.
SLOT_CTX=$((2 * (PREFIX_LEN + INPUT_LEN + OUTPUT_LEN)))
TOP_LEVEL="${LEVELS##* }"
HEDDLE_URL="http://127.0.0.1:$HEDDLE_PORT"
LLAMA_URL="http://127.0.0.1:$LLAMA_PORT"

log() { echo "[bench-cpu] $*" >&2; }
load_average() { cut -d' ' -f1-3 /proc/loadavg; }
# The kernel family heddle picks at run time (crates/heddle-model/src/weights).
kernel_family() {
    local flags
    flags="$(grep -m1 '^flags' /proc/cpuinfo)"
    if [[ " $flags " == *" avx512_vnni "* && " $flags " == *" avx512bw "* ]]; then
        echo "AVX-512 VNNI"
    elif [[ " $flags " == *" avx2 "* && " $flags " == *" fma "* ]]; then
        echo "AVX2"
    else
        echo "portable"
    fi
}
mkdir -p "$OUT_DIR"

if [[ -n "${MODELS:-}" ]]; then
    for name in $MODELS; do
        case "$name" in
        embedded) model="$(bash scripts/fetch-model.sh | tail -n 1)" ;;
        random-1b)
            bash scripts/make-test-models.sh >&2
            model="${TEST_MODELS_DIR:-${HEDDLE_MODEL_DIR:-$HOME/.cache/heddle/models}/test}"
            model="$model/random-llama-3.2-1b-shape.Q4_K_M.gguf"
            ;;
        *) model="$name" ;;
        esac
        log "model $name: $model"
        MODELS="" MODEL="$model" OUT_DIR="$OUT_DIR/$(basename "$name" .gguf)" "$0"
    done
    exit 0
fi

log "building heddle (release)"
cargo build --release -p heddle-server >&2
# A private copy: another build in the same tree may replace target/release/heddle while
# the benchmark runs.
TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
cp "$TARGET_DIR/release/heddle" "$OUT_DIR/heddle"
HEDDLE="$OUT_DIR/heddle"
# MODEL: another GGUF of the same model to serve (default: the embedded Q4_1 file).
MODEL="${MODEL:-$(bash scripts/fetch-model.sh | tail -n 1)}"
LLAMA_SERVER="$(bash scripts/peers/build-llama-server.sh | tail -n 1)"

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse --short HEAD)"
    echo "uncommitted changes: $(git status --porcelain --untracked-files=no | wc -l) tracked files"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
    echo "threads: $THREADS"
    echo "model: $MODEL"
    echo "llama-server: $("$LLAMA_SERVER" --version 2>&1 | head -n 1)"
    echo "levels: $LEVELS; input $INPUT_LEN, output $OUTPUT_LEN, prefix $PREFIX_LEN; repeats $REPEATS"
    echo "heddle kernels: $(kernel_family)"
} >"$OUT_DIR/meta.txt"
cat "$OUT_DIR/meta.txt" >&2

log "streaming-read bandwidth with $THREADS threads"
cargo build --release -p heddle-model --example stream_read >&2
RAYON_NUM_THREADS="$THREADS" "$TARGET_DIR/release/examples/stream_read" "$MODEL" |
    tee "$OUT_DIR/bandwidth.txt" >&2

# bench NAME URL N SEED [extra flags...]: one `heddle bench` run, its JSON in
# OUT_DIR/NAME.json, the load average before and after in OUT_DIR/load.txt.
bench() {
    local name="$1" url="$2" level="$3" seed="$4"
    shift 4
    local prompts=$((2 * level > 8 ? 2 * level : 8))
    log "$name: $prompts prompts, concurrency $level (load average $(load_average))"
    echo "$name start: $(load_average)" >>"$OUT_DIR/load.txt"
    "$HEDDLE" bench --url "$url" --model "$MODEL_ID" --tokenizer "$MODEL" \
        --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --ignore-eos \
        --request-rate inf --max-concurrency "$level" --num-prompts "$prompts" \
        --seed "$seed" --warmup-requests 2 --wait-ready 300 \
        --label "$name" --json "$OUT_DIR/$name.json" "$@" >"$OUT_DIR/$name.txt"
    echo "$name end: $(load_average)" >>"$OUT_DIR/load.txt"
}

# Two servers at once: heddle idles (its engine thread sleeps) while llama-server runs.
HEDDLE_PID=""
LLAMA_PID=""
stop() {
    if [[ -n "$1" ]]; then
        kill "$1" 2>/dev/null || true
        wait "$1" 2>/dev/null || true
    fi
}
trap 'stop "$LLAMA_PID"; stop "$HEDDLE_PID"' EXIT

log "starting heddle serve on port $HEDDLE_PORT with $THREADS threads"
RAYON_NUM_THREADS="$THREADS" HEDDLE_LOG=warn "$HEDDLE" serve --host 127.0.0.1 \
    --port "$HEDDLE_PORT" --model "$MODEL_ID=$MODEL" --pin "$MODEL_ID" \
    >"$OUT_DIR/heddle-serve.log" 2>&1 &
HEDDLE_PID=$!

for repeat in $(seq 1 "$REPEATS"); do
    for level in $LEVELS; do
        seed=$((1000 * repeat + level))
        run="c$level-r$repeat"
        bench "heddle-random-$run" "$HEDDLE_URL" "$level" "$seed"
        if [[ "$level" == "$TOP_LEVEL" ]]; then
            bench "heddle-prefix-$run" "$HEDDLE_URL" "$level" "$seed" \
                --dataset prefix --prefix-len "$PREFIX_LEN"
        fi

        log "starting llama-server with $level slots on port $LLAMA_PORT"
        "$LLAMA_SERVER" -m "$MODEL" --host 127.0.0.1 --port "$LLAMA_PORT" \
            -t "$THREADS" -tb "$THREADS" --parallel "$level" -c $((level * SLOT_CTX)) \
            --cont-batching --no-webui >"$OUT_DIR/llama-server-$run.log" 2>&1 &
        LLAMA_PID=$!
        bench "llamacpp-random-$run" "$LLAMA_URL" "$level" "$seed"
        if [[ "$level" == "$TOP_LEVEL" ]]; then
            bench "llamacpp-prefix-$run" "$LLAMA_URL" "$level" "$seed" \
                --dataset prefix --prefix-len "$PREFIX_LEN"
        fi
        stop "$LLAMA_PID"
        LLAMA_PID=""
    done
done
stop "$HEDDLE_PID"
HEDDLE_PID=""

python3 - "$OUT_DIR" "$TOP_LEVEL" "$REPEATS" $LEVELS <<'PY' | tee "$OUT_DIR/summary.md"
import json, os, sys

out_dir, top, repeats, levels = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]

def runs(server, workload):
    """Every repeat's result, best output throughput first."""
    results = []
    for repeat in range(1, repeats + 1):
        with open(os.path.join(out_dir, f"{server}-{workload}-r{repeat}.json")) as f:
            results.append(json.load(f)["result"])
    return sorted(results, key=lambda r: r["output_throughput"], reverse=True)

def median(run, figure):
    summary = run[figure]
    return summary["median"] if summary else float("nan")

def tok_s(results):
    rest = ", ".join(f"{r['output_throughput']:.1f}" for r in results[1:])
    return f"**{results[0]['output_throughput']:.1f}**" + (f" ({rest})" if rest else "")

workloads = [(f"random c={n}", f"random-c{n}") for n in levels]
workloads.append((f"prefix c={top}", f"prefix-c{top}"))
print("Output tok/s: the best repeat in bold, the others in brackets; latencies of the best.")
print()
print("| workload | heddle tok/s | llama.cpp tok/s | heddle / llama.cpp "
      "| TTFT median ms (heddle / llama.cpp) | TPOT median ms (heddle / llama.cpp) | failed |")
print("|---|---|---|---|---|---|---|")
best = {}
for label, key in workloads:
    h, l = runs("heddle", key), runs("llamacpp", key)
    best[key] = (h[0]["output_throughput"], l[0]["output_throughput"])
    failed = (sum(r["failed"] for r in h), sum(r["failed"] for r in l))
    print(f"| {label} | {tok_s(h)} | {tok_s(l)} | {best[key][0] / best[key][1]:.2f}x "
          f"| {median(h[0], 'ttft_ms'):.0f} / {median(l[0], 'ttft_ms'):.0f} "
          f"| {median(h[0], 'tpot_ms'):.1f} / {median(l[0], 'tpot_ms'):.1f} "
          f"| {failed[0]} / {failed[1]} |")
print()
print(f"Scaling: best output tok/s at each level over the best at c={levels[0]}.")
print()
print("| level | heddle | llama.cpp |")
print("|---|---|---|")
base = best[f"random-c{levels[0]}"]
for n in levels:
    h, l = best[f"random-c{n}"]
    print(f"| c={n} | {h / base[0]:.2f}x | {l / base[1]:.2f}x |")
PY
echo | tee -a "$OUT_DIR/summary.md"
sed 's/^/    /' "$OUT_DIR/bandwidth.txt" | tee -a "$OUT_DIR/summary.md"
log "results in $OUT_DIR"
