//! The CPU runner against llama.cpp on the embedded model (SmolLM2-135M-Instruct Q4_1),
//! using the reference outputs in tests/data/llamacpp_reference.json (made by
//! scripts/reference/make_reference.py).

mod cpu_support;

use cpu_support::{embedded_runner, Driver, Seq};
use heddle_core::{SamplingParams, TokenId};
use heddle_model::sampling::log_softmax;
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt_ids: Vec<TokenId>,
    greedy_ids: Vec<TokenId>,
    /// Teacher-forced over prompt + greedy: entry i is the distribution after token i.
    positions: Vec<Position>,
}

#[derive(Deserialize)]
struct Position {
    /// The 10 most likely ids and their log-probabilities.
    top: Vec<(TokenId, f32)>,
}

fn reference() -> Reference {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/llamacpp_reference.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

/// Log-probabilities over llama.cpp's top-10 ids at every teacher-forced position.
///
/// Both sides multiply the same Q4_1/Q8_0 weight bits by activations quantized the same
/// way (ggml's Q8_1/Q8_0, 8 bits per value, per block of 32), so the systematic part of
/// the quantization error is shared. What remains differs: llama.cpp keeps K and V in
/// f16 (relative rounding 2^-11 ≈ 5e-4 on every cached value) while heddle keeps f32,
/// its batched path uses other kernels and accumulation orders, and every such
/// difference can flip an activation across an 8-bit rounding boundary in the next
/// layer (one step of a block's scale, up to 1/127 of the block's largest value).
/// Through 30 layers this small model amplifies those flips: llama.cpp disagrees with
/// itself by 0.78 to 1.66 nats between its batched and one-token-at-a-time passes over
/// the same tokens (`max_abs_logprob_diff_incremental_vs_batch` in the reference file).
/// A difference of that size between two implementations is therefore noise, not a
/// bug; a wrong RoPE layout, a missing bias or a broken cache shifts log-probabilities
/// by several nats on most positions. So the bounds: the mean difference must be small
/// (0.1 nats), the worst one no larger than llama.cpp's own spread (2 nats).
#[test]
fn teacher_forced_logprobs_match_llama_cpp() {
    const MAX_DIFF: f32 = 2.0;
    const MEAN_DIFF: f64 = 0.1;
    let reference = reference();
    let runner = embedded_runner(1);
    let (mut sum, mut count, mut worst) = (0f64, 0usize, (0f32, String::new()));
    for case in &reference.cases {
        let tokens = [case.prompt_ids.as_slice(), &case.greedy_ids].concat();
        let rows = runner.model().forward_all_logits(&tokens).unwrap();
        assert_eq!(rows.len(), case.positions.len(), "{}", case.name);
        let mut case_max = 0f32;
        for (i, (row, pos)) in rows.iter().zip(&case.positions).enumerate() {
            let lp = log_softmax(row);
            for &(id, want) in &pos.top {
                let d = (lp[id as usize] - want).abs();
                sum += d as f64;
                count += 1;
                case_max = case_max.max(d);
                if d > worst.0 {
                    worst = (d, format!("{} position {i} token {id}", case.name));
                }
            }
        }
        eprintln!(
            "{:>22}: max |Δ logprob| over llama.cpp's top 10: {case_max:.3}",
            case.name
        );
    }
    let mean = sum / count as f64;
    eprintln!(
        "mean |Δ logprob| {mean:.4}, max {:.3} at {}",
        worst.0, worst.1
    );
    assert!(mean <= MEAN_DIFF, "mean |Δ logprob| {mean} > {MEAN_DIFF}");
    assert!(
        worst.0 <= MAX_DIFF,
        "|Δ logprob| {} at {} > {MAX_DIFF}",
        worst.0,
        worst.1
    );
}

/// heddle's greedy decoding through the batched `step` (all cases in the same steps,
/// prompts prefilled in chunks of 64, then 32 decode steps) against llama.cpp's.
/// Greedy decoding follows the arg-max, so near-ties between the two best tokens decide
/// where two implementations may part; a case may diverge only where llama.cpp's own
/// top two were close (within twice the log-probability tolerance above), and at most
/// one case may.
#[test]
fn greedy_generation_matches_llama_cpp() {
    let reference = reference();
    let mut driver = Driver::new(embedded_runner(256));
    let mut seqs: Vec<Seq> = reference
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| Seq::new(i as u64, &c.prompt_ids, SamplingParams::greedy()))
        .collect();
    driver.generate(&mut seqs, 64, 32);
    let mut diverged = Vec::new();
    for (case, seq) in reference.cases.iter().zip(&seqs) {
        let Some(at) = case
            .greedy_ids
            .iter()
            .zip(seq.generated())
            .position(|(a, b)| a != b)
        else {
            continue;
        };
        let pos = &case.positions[case.prompt_ids.len() + at - 1];
        let gap = pos.top[0].1 - pos.top[1].1;
        eprintln!(
            "{}: diverges at generated token {at}: llama.cpp {} vs heddle {}; \
             llama.cpp's top two {:?} {:?} (gap {gap:.3} nats)",
            case.name,
            case.greedy_ids[at],
            seq.generated()[at],
            pos.top[0],
            pos.top[1],
        );
        assert!(
            gap < 1.0,
            "{}: diverged where llama.cpp was sure",
            case.name
        );
        diverged.push(case.name.as_str());
    }
    let n = reference.cases.len();
    eprintln!("greedy matches on {}/{n} cases", n - diverged.len());
    assert!(diverged.len() <= 1, "greedy diverged on {diverged:?}");
}
