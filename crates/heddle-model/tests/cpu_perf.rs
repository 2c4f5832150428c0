//! Step times of the CPU runner on the embedded model: decode at batch 1 and 16, and a
//! 128-token prefill. A measurement, not a check (timings depend on the machine and its
//! load), so it is ignored by default:
//! `cargo test --release -p heddle-model --test cpu_perf -- --ignored --nocapture`
//!
//! `HEDDLE_PERF_MODEL=path/to/file.gguf` times another GGUF instead (for instance the
//! random Llama-3.2-1B-shape Q4_K_M of scripts/make-test-models.sh), and `step_times`
//! then also prints the machine's streaming-read bandwidth and the decode floor it
//! implies: one decode step must read every weight once.

mod cpu_support;

use std::path::PathBuf;
use std::time::Instant;

use cpu_support::{Driver, Seq, BLOCK_SIZE};
use heddle_core::{SamplingParams, TokenId};
use heddle_model::kv_cache::KvDtype;
use heddle_model::llama::Llama;
use heddle_model::{embedded_model_path, CpuRunner};

fn prompt(i: u32, len: usize) -> Vec<TokenId> {
    (0..len as u32)
        .map(|j| 300 + (j * 7919 + i * 104_729) % 20_000)
        .collect()
}

/// Mean seconds of a decode step of `batch` sequences whose contexts hold `context`
/// tokens, over `steps` steps.
fn decode_step(driver: &mut Driver, batch: u32, context: usize, steps: usize) -> f64 {
    let mut seqs: Vec<Seq> = (0..batch)
        .map(|i| Seq::new(i as u64, &prompt(i, context), SamplingParams::greedy()))
        .collect();
    driver.generate(&mut seqs, usize::MAX, 2);
    let start = Instant::now();
    driver.generate(&mut seqs, usize::MAX, 2 + steps);
    let seconds = start.elapsed().as_secs_f64() / steps as f64;
    driver.release(seqs);
    seconds
}

fn runner(kv: KvDtype) -> CpuRunner {
    let path = embedded_model_path().unwrap_or_else(|e| panic!("{e}"));
    let (model, _) = Llama::load(&path).unwrap();
    CpuRunner::new(model, 4096, BLOCK_SIZE, kv).unwrap()
}

/// The model timed: `HEDDLE_PERF_MODEL`, else the embedded one.
fn perf_model_path() -> PathBuf {
    match std::env::var_os("HEDDLE_PERF_MODEL") {
        Some(path) => PathBuf::from(path),
        None => embedded_model_path().unwrap_or_else(|e| panic!("{e}")),
    }
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn step_times() {
    let path = perf_model_path();
    let (model, _) = Llama::load(&path).unwrap();
    let weight_bytes = model.weight_bytes() as f64;
    eprintln!(
        "{} on {} threads: {:.0} MB of weights in heddle's formats",
        path.display(),
        rayon::current_num_threads(),
        weight_bytes / 1e6
    );
    let mut driver = Driver::new(CpuRunner::new(model, 512, BLOCK_SIZE, KvDtype::F16).unwrap());
    // Warm up: page in the weights, size the buffers.
    decode_step(&mut driver, 1, 32, 4);

    let mut times = Vec::new();
    for _ in 0..3 {
        let mut seq = [Seq::new(99, &prompt(99, 128), SamplingParams::greedy())];
        let start = Instant::now();
        driver.generate(&mut seq, usize::MAX, 1);
        times.push(start.elapsed().as_secs_f64());
    }
    let prefill = times.iter().cloned().fold(f64::INFINITY, f64::min);
    eprintln!(
        "prefill 128 tokens: {:.1} ms ({:.0} tokens/s)",
        prefill * 1e3,
        128.0 / prefill
    );
    // The served benchmark's prefill: 16 prompts of 128 tokens admitted in one step.
    let batch_prefill = (0..2)
        .map(|round| {
            let mut seqs: Vec<Seq> = (0..16)
                .map(|i| {
                    let id = 100 + 16 * round + i;
                    Seq::new(id, &prompt(id as u32, 128), SamplingParams::greedy())
                })
                .collect();
            let start = Instant::now();
            driver.generate(&mut seqs, usize::MAX, 1);
            let seconds = start.elapsed().as_secs_f64();
            driver.release(seqs);
            seconds
        })
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "prefill 16 x 128 tokens in one step: {:.1} ms",
        batch_prefill * 1e3
    );

    // The fastest of three rounds: other processes on the machine only ever slow a
    // round down.
    let fastest = |driver: &mut Driver, batch: u32, steps: usize| {
        (0..3)
            .map(|_| decode_step(driver, batch, 128, steps))
            .fold(f64::INFINITY, f64::min)
    };
    let one = fastest(&mut driver, 1, 32);
    let sixteen = fastest(&mut driver, 16, 16);
    eprintln!(
        "decode step, batch 1, context 128: {:.2} ms ({:.0} tokens/s)",
        one * 1e3,
        1.0 / one
    );
    eprintln!(
        "decode step, batch 16, context 128: {:.2} ms ({:.0} tokens/s, {:.1}x batch 1)",
        sixteen * 1e3,
        16.0 / sixteen,
        16.0 * one / sixteen
    );
    let bandwidth = heddle_model::membw::stream_read_bandwidth(1 << 30, 5);
    let file_bytes = std::fs::metadata(&path).unwrap().len() as f64;
    eprintln!(
        "streaming read: {:.1} GB/s; reading the file's {:.0} MB once takes {:.2} ms, \
         decode batch 1 is {:.2}x that floor",
        bandwidth / 1e9,
        file_bytes / 1e6,
        file_bytes / bandwidth * 1e3,
        one / (file_bytes / bandwidth)
    );
    eprintln!(
        "reading heddle's {:.0} MB of weights once takes {:.2} ms",
        weight_bytes / 1e6,
        weight_bytes / bandwidth * 1e3
    );
}

/// Decode at batch 16 with an f16 or an f32 cache, the fastest of five rounds. Run one
/// at a time under `perf stat -e cycles` to compare them on a busy machine.
fn kv_dtype_decode_times(kv: KvDtype) {
    let mut driver = Driver::new(runner(kv));
    for context in [128, 256] {
        let best = (0..5)
            .map(|_| decode_step(&mut driver, 16, context, 8))
            .fold(f64::INFINITY, f64::min);
        eprintln!(
            "decode step, batch 16, context {context}, {kv:?} cache: {:.2} ms",
            best * 1e3
        );
    }
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn decode_times_with_an_f16_cache() {
    kv_dtype_decode_times(KvDtype::F16);
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn decode_times_with_an_f32_cache() {
    kv_dtype_decode_times(KvDtype::F32);
}

/// Multiply-adds per second of each native kernel on the embedded model's matrix shapes,
/// at 1, 16 and 128 activation rows, on the pool's threads: how far the kernels are from
/// the machine's peak, and how much a batch gains from each weight being read once for
/// all its rows. "hot" multiplies one matrix over and over (its weights stay in the
/// caches); "cold" cycles through copies of it filling 256 MB, so that every product
/// streams its weights from memory, as a model's decode step does.
/// `HEDDLE_KERNEL_RATES=pattern,...` keeps only the lines whose label (as printed, e.g.
/// `Q4_1 49152x576 hot`) contains one of the patterns.
#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn kernel_rates() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use heddle_model::qmatmul::{Input, Linear, QuantizedRows};

    let shapes: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (49_152, 576)];
    let patterns = std::env::var("HEDDLE_KERNEL_RATES").unwrap_or_default();
    let wanted =
        |label: &str| patterns.is_empty() || patterns.split(',').any(|p| label.contains(p.trim()));
    for dtype in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        for (n, k) in shapes {
            let k = k.next_multiple_of(dtype.block_size());
            let labels = ["hot", "cold"].map(|l| format!("{dtype:?} {n}x{k} {l}"));
            if !labels.iter().any(|l| wanted(l)) {
                continue;
            }
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            let t = QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype)
                .unwrap();
            let one = Linear::from_qtensor("w", &t).unwrap();
            let copies = if wanted(&labels[1]) {
                (256 << 20) / one.bytes() + 1
            } else {
                1
            };
            let mats: Vec<Linear> = (0..copies)
                .map(|_| Linear::from_qtensor("w", &t).unwrap())
                .collect();
            for (label, cycle) in labels.iter().zip([1, copies]) {
                if !wanted(label) {
                    continue;
                }
                let mut line = format!("{label}:");
                for rows in [1, 16, 128] {
                    let x: Vec<f32> = (0..rows * k)
                        .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0)
                        .collect();
                    let mut q = QuantizedRows::default();
                    q.quantize(&x, rows);
                    let input = Input::new(&x, rows, Some(&q));
                    let mut out = vec![0f32; rows * n];
                    let macs = (rows * n * k) as f64;
                    let reps = ((2e9 / macs) as usize).clamp(cycle.max(3), 2000);
                    let best = (0..3)
                        .map(|_| {
                            let start = Instant::now();
                            for i in 0..reps {
                                mats[i % cycle].forward(&input, &mut out);
                            }
                            start.elapsed().as_secs_f64() / reps as f64
                        })
                        .fold(f64::INFINITY, f64::min);
                    line += &format!(
                        "  {rows} rows {:.1} us = {:.0} GMAC/s",
                        best * 1e6,
                        macs / best / 1e9
                    );
                }
                eprintln!("{line}");
            }
        }
    }
}
