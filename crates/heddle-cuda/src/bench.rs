//! In-process throughput: the scheduler and the CUDA runner driven directly, without HTTP,
//! the way the engine thread drives them. Measures the model and scheduling path alone.

use std::time::Instant;

use anyhow::Context;
use heddle_core::{Request, RequestId, SamplingParams, Scheduler, SchedulerConfig, TokenId};
use heddle_model::driver::StepDriver;
use heddle_model::runner::ModelRunner;

use crate::runner::CudaRunner;

#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub requests: usize,
    pub prompt_len: usize,
    pub output_len: usize,
    pub max_running: usize,
    pub max_batched_tokens: usize,
    pub seed: u64,
    /// Queue each step behind the one in flight (`StepDriver::step_overlapped`), as the
    /// server does with `--overlap-steps`, instead of one step at a time.
    pub overlap: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Measured {
    pub seconds: f64,
    pub output_tokens: usize,
    pub prompt_tokens: usize,
    pub steps: usize,
    /// Mean time from start to each request's first output token.
    pub mean_ttft: f64,
    /// Mean time per decode step once every request is decoding (no prefill in the step).
    pub mean_decode_step: f64,
    /// Of a decode step: the runner's host work (packing, queueing kernels and GEMMs) and
    /// its wait for the GPU, means; and of the host work, the packing.
    pub mean_decode_host: f64,
    pub mean_decode_pack: f64,
    pub mean_decode_wait: f64,
}

impl Measured {
    pub fn output_tokens_per_second(&self) -> f64 {
        self.output_tokens as f64 / self.seconds
    }
}

/// Random prompt tokens below `vocab`, from a fixed seed.
pub fn random_prompt(len: usize, vocab: usize, seed: u64) -> Vec<TokenId> {
    crate::xorshift::xorshift64(seed)
        .take(len)
        .map(|s| (s % vocab as u64) as TokenId)
        .collect()
}

/// All requests arrive at once; greedy, ignore_eos, exactly `output_len` tokens each.
pub fn run(runner: &mut CudaRunner, load: Load) -> anyhow::Result<Measured> {
    let vocab = runner.config().vocab_size;
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_running: load.max_running,
        max_batched_tokens: load.max_batched_tokens,
        prefill_chunk: load.prompt_len.max(1),
        num_blocks: runner.num_blocks(),
        block_size: runner.options().block_size,
        max_model_len: load.prompt_len + load.output_len,
        enable_prefix_cache: false,
        ..SchedulerConfig::default()
    })?;
    for i in 0..load.requests {
        let prompt = random_prompt(load.prompt_len, vocab, load.seed + i as u64);
        let mut request = Request::new(i as RequestId, prompt, load.output_len, 0.0);
        request.sampling = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        request.stop.ignore_eos = true;
        scheduler
            .add(request)
            .map_err(|e| anyhow::anyhow!("adding request {i}: {e:?}"))?;
    }
    let started = Instant::now();
    let mut first_token = vec![None; load.requests];
    let (mut finished, mut output_tokens, mut steps) = (0, 0, 0);
    let (mut decode_time, mut decode_steps) = (0f64, 0usize);
    let mut decode_times = crate::runner::StepTimes::default();
    runner.take_step_times();
    let mut driver = StepDriver::default();
    while finished < load.requests {
        let step_started = Instant::now();
        let step = if load.overlap {
            driver.step_overlapped(&mut scheduler, runner, true, |_, _| {})?
        } else {
            driver.step(&mut scheduler, runner)?
        }
        .context("the scheduler stalled")?;
        let decode_only = driver
            .collected_batch()
            .seqs
            .iter()
            .all(|s| s.tokens.len() == 1);
        for event in step.events {
            output_tokens += 1;
            first_token[event.id as usize].get_or_insert(started.elapsed().as_secs_f64());
            finished += event.finish.is_some() as usize;
        }
        let times = runner.take_step_times();
        if decode_only {
            decode_time += step_started.elapsed().as_secs_f64();
            decode_steps += 1;
            decode_times.host_seconds += times.host_seconds;
            decode_times.pack_seconds += times.pack_seconds;
            decode_times.wait_seconds += times.wait_seconds;
        }
        steps += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let ttfts: Vec<f64> = first_token.into_iter().flatten().collect();
    Ok(Measured {
        seconds,
        output_tokens,
        prompt_tokens: load.requests * load.prompt_len,
        steps,
        mean_ttft: ttfts.iter().sum::<f64>() / ttfts.len().max(1) as f64,
        mean_decode_step: decode_time / decode_steps.max(1) as f64,
        mean_decode_host: decode_times.host_seconds / decode_steps.max(1) as f64,
        mean_decode_pack: decode_times.pack_seconds / decode_steps.max(1) as f64,
        mean_decode_wait: decode_times.wait_seconds / decode_steps.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::random_prompt;

    #[test]
    fn random_prompts_are_reproducible_and_in_the_vocabulary() {
        let a = random_prompt(512, 128_256, 3);
        assert_eq!(a, random_prompt(512, 128_256, 3));
        assert_ne!(a, random_prompt(512, 128_256, 4));
        assert!(a.iter().all(|&t| t < 128_256));
    }
}
