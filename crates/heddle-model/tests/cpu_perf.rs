//! Step times of the CPU runner on the embedded model: decode at batch 1 and 16, and a
//! 128-token prefill. A measurement, not a check (timings depend on the machine and its
//! load), so it is ignored by default:
//! `cargo test --release -p heddle-model --test cpu_perf -- --ignored --nocapture`

mod cpu_support;

use std::time::Instant;

use cpu_support::{embedded_runner, Driver, Seq};
use heddle_core::{SamplingParams, TokenId};

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
    start.elapsed().as_secs_f64() / steps as f64
}

#[test]
#[ignore = "a measurement; run with --ignored --nocapture"]
fn step_times() {
    let mut driver = Driver::new(embedded_runner(512));
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

    let one = decode_step(&mut driver, 1, 128, 32);
    let sixteen = decode_step(&mut driver, 16, 128, 16);
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
}
