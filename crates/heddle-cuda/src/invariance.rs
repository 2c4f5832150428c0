//! Batch invariance at a real shape: one request's greedy tokens and log-probabilities
//! alone, then inside batches of other requests of assorted prompt lengths, through the
//! scheduler and the runner's serving path (CUDA graphs included).
//!
//! The batch sizes are chosen where the arithmetic can change with them: at the
//! Llama-3.1-8B shape one sequence splits decode attention 16 ways, 7 sequences 5 ways and
//! 64 or more not at all, and cuBLAS picks its GEMM kernels by the number of rows.

use anyhow::{ensure, Context};
use heddle_core::{Request, RequestId, SamplingParams, Scheduler, SchedulerConfig, TokenId};
use heddle_model::driver::StepDriver;
use heddle_model::runner::ModelRunner;

use crate::bench::random_prompt;
use crate::kernels::MAX_TOP_LOGPROBS;
use crate::runner::CudaRunner;

/// What the watched request produced at one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Produced {
    pub token: TokenId,
    pub logprob: f32,
    pub top: Vec<(TokenId, f32)>,
}

/// The watched request inside a batch, against it alone.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub batch: usize,
    pub tokens: usize,
    pub tokens_differing: usize,
    /// Largest |Δ| over the chosen tokens' log-probabilities and the top log-probabilities
    /// of equal ids, at the steps before the first differing token.
    pub max_logprob_difference: f64,
}

impl Comparison {
    pub fn identical(&self) -> bool {
        self.tokens_differing == 0 && self.max_logprob_difference == 0.0
    }
}

/// The watched request's prompt length and output length.
pub const WATCHED_PROMPT: usize = 300;
pub const OUTPUT_TOKENS: usize = 32;

/// The watched request's outputs, alone (`batch` 1) or among `batch - 1` others whose
/// prompts run from 64 to 700 tokens, all submitted at once with the watched one in the
/// middle of the queue.
pub fn watched_outputs(runner: &mut CudaRunner, batch: usize) -> anyhow::Result<Vec<Produced>> {
    let vocab = runner.config().vocab_size;
    let watched: RequestId = (batch / 2) as RequestId;
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_running: runner.options().max_running,
        max_batched_tokens: runner.options().max_batched_tokens,
        num_blocks: runner.num_blocks(),
        block_size: runner.options().block_size,
        max_model_len: 1024,
        enable_prefix_cache: false,
        ..SchedulerConfig::default()
    })?;
    for i in 0..batch {
        let id = i as RequestId;
        let prompt = if id == watched {
            random_prompt(WATCHED_PROMPT, vocab, 7)
        } else {
            random_prompt(64 + (i * 211) % 637, vocab, 1000 + i as u64)
        };
        let mut request = Request::new(id, prompt, OUTPUT_TOKENS, 0.0);
        request.sampling = SamplingParams {
            temperature: 0.0,
            logprobs: id == watched,
            top_logprobs: if id == watched {
                MAX_TOP_LOGPROBS as u32
            } else {
                0
            },
            ..SamplingParams::default()
        };
        request.stop.ignore_eos = true;
        scheduler
            .add(request)
            .map_err(|e| anyhow::anyhow!("adding request {i}: {e:?}"))?;
    }
    let mut produced = Vec::new();
    let mut finished = 0;
    let mut steps = 0;
    let mut driver = StepDriver::default();
    while finished < batch {
        let step = driver
            .step(&mut scheduler, runner)?
            .context("the scheduler stalled")?;
        for s in &step.outputs {
            if s.id == watched {
                produced.push(Produced {
                    token: s.token,
                    logprob: s.logprob.unwrap_or(f32::NAN),
                    top: s.top_logprobs.clone(),
                });
            }
        }
        finished += step.events.iter().filter(|e| e.finish.is_some()).count();
        steps += 1;
        ensure!(steps < 100_000, "generation did not finish");
    }
    Ok(produced)
}

/// Compares the watched request's outputs in a batch with its outputs alone.
pub fn compare(batch: usize, alone: &[Produced], inside: &[Produced]) -> Comparison {
    let tokens_differing = alone
        .iter()
        .zip(inside)
        .filter(|(a, b)| a.token != b.token)
        .count()
        + alone.len().abs_diff(inside.len());
    let mut worst = 0f64;
    for (a, b) in alone.iter().zip(inside) {
        if a.token != b.token {
            break;
        }
        let mut note = |x: f32, y: f32| {
            let d = (x as f64 - y as f64).abs();
            worst = worst.max(if d.is_nan() { f64::INFINITY } else { d });
        };
        note(a.logprob, b.logprob);
        for (id, lp) in &b.top {
            // An id that left the top list moved too; its neighbours' differences show it.
            if let Some((_, alone_lp)) = a.top.iter().find(|(i, _)| i == id) {
                note(*alone_lp, *lp);
            }
        }
    }
    Comparison {
        batch,
        tokens: alone.len(),
        tokens_differing,
        max_logprob_difference: worst,
    }
}
