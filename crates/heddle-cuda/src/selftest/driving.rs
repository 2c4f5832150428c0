//! Requests run through the scheduler and the runner, for the checks.

use super::*;

/// What [`drive`] collected for its request.
pub(crate) struct Driven {
    pub(crate) generated: Vec<heddle_model::runner::SampledOutput>,
    pub(crate) scored: Vec<heddle_model::runner::PromptTokenLogprobs>,
}

/// Runs `prompt` through the scheduler and `runner` (at most `chunk` tokens a step), greedy
/// with log-probabilities and 3 top alternatives, for `max_tokens` (0: score only, with
/// `prompt_logprobs`), after `company` other greedy requests have started decoding; the
/// company is cancelled once the request ends.
pub(crate) fn drive(
    runner: &mut CudaRunner,
    prompt: &[TokenId],
    max_tokens: usize,
    prompt_logprobs: Option<u32>,
    company: usize,
    chunk: usize,
) -> anyhow::Result<Driven> {
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_running: 16,
        max_batched_tokens: chunk,
        num_blocks: runner.num_blocks(),
        block_size: runner.options().block_size,
        enable_prefix_cache: false,
        ..SchedulerConfig::default()
    })?;
    let add = |scheduler: &mut Scheduler, request: heddle_core::Request| {
        scheduler.add(request).map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    for i in 0..company {
        let others: Vec<TokenId> = (0..5 + i).map(|t| (t * 11 + i) as TokenId).collect();
        let mut request = heddle_core::Request::new(i as RequestId + 1, others, 1000, 0.0);
        request.sampling = greedy();
        request.stop.ignore_eos = true;
        add(&mut scheduler, request)?;
    }
    // The company's prompts are computed before the request arrives: it then decodes.
    let warm_up_steps = if company > 0 { 2 } else { 0 };
    let mut driver = StepDriver::default();
    for _ in 0..warm_up_steps {
        driver.step(&mut scheduler, runner)?;
    }
    let id: RequestId = 0;
    // Scoring alone is a request for one token whose output is ignored, as the engine
    // does for `max_tokens: 0`.
    let mut request = heddle_core::Request::new(id, prompt.to_vec(), max_tokens.max(1), 1.0);
    request.sampling = SamplingParams {
        logprobs: true,
        top_logprobs: 3,
        prompt_logprobs,
        ..greedy()
    };
    request.stop.ignore_eos = true;
    add(&mut scheduler, request)?;
    let mut driven = Driven {
        generated: Vec::new(),
        scored: Vec::new(),
    };
    for _ in 0..1000 {
        let step = driver
            .step(&mut scheduler, runner)?
            .context("the scheduler stalled")?;
        driven.scored.extend(
            runner
                .take_prompt_logprobs()
                .into_iter()
                .filter(|s| s.id == id),
        );
        driven
            .generated
            .extend(step.outputs.iter().filter(|s| s.id == id).cloned());
        if step.events.iter().any(|e| e.id == id && e.finish.is_some()) {
            for i in 0..company {
                scheduler.cancel(i as RequestId + 1);
            }
            return Ok(driven);
        }
    }
    anyhow::bail!("the request did not finish in 1000 steps")
}

/// Greedy generation of `max_tokens` per prompt through the scheduler (16 sequences and
/// 2048 tokens a step at most; the runner must allow as many), ignoring EOS; prompt i is
/// added at step `arrival`. Returns each prompt's output.
pub fn generate(
    runner: &mut CudaRunner,
    prompts: &[(usize, Vec<TokenId>)],
    max_tokens: usize,
) -> anyhow::Result<Vec<Vec<TokenId>>> {
    generate_stepping(runner, prompts, max_tokens, false)
}

/// [`generate`], with each step queued behind the one in flight when `overlap`
/// (`StepDriver::step_overlapped`); a step then counts as one collected.
pub fn generate_stepping(
    runner: &mut CudaRunner,
    prompts: &[(usize, Vec<TokenId>)],
    max_tokens: usize,
    overlap: bool,
) -> anyhow::Result<Vec<Vec<TokenId>>> {
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_running: 16,
        max_batched_tokens: 2048,
        num_blocks: runner.num_blocks(),
        block_size: runner.options().block_size,
        enable_prefix_cache: false,
        ..SchedulerConfig::default()
    })?;
    let mut outputs = vec![Vec::new(); prompts.len()];
    let mut driver = StepDriver::default();
    let mut step = 0;
    let mut done = 0;
    while done < prompts.len() {
        for (i, (arrival, prompt)) in prompts.iter().enumerate() {
            if *arrival == step {
                let mut request = heddle_core::Request::new(
                    i as RequestId,
                    prompt.clone(),
                    max_tokens,
                    step as f64,
                );
                request.sampling = greedy();
                request.stop.ignore_eos = true;
                scheduler
                    .add(request)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
        }
        let step_result = if overlap {
            driver.step_overlapped(&mut scheduler, runner, true, |_, _| {})?
        } else {
            driver.step(&mut scheduler, runner)?
        };
        let events = match step_result {
            Some(step) => step.events,
            None => Vec::new(),
        };
        for event in events {
            outputs[event.id as usize].push(event.token);
            done += event.finish.is_some() as usize;
        }
        step += 1;
        ensure!(step < 10_000, "generation did not finish");
    }
    Ok(outputs)
}
