//! The step driver over the real scheduler and the CPU runner on the embedded model:
//! requests run to their length, a failed step ends the requests it held, and stepping
//! one step ahead gives the same tokens as stepping one at a time.

use std::collections::HashMap;

use heddle_core::{
    FinishReason, Request, RequestId, SamplingParams, ScheduledBatch, Scheduler, SchedulerConfig,
    SequenceTokens, StepEvent, TokenId,
};
use heddle_model::computed_at_launch::ComputedAtLaunch;
use heddle_model::driver::{StepDriver, StepResult};
use heddle_model::runner::{ModelRunner, SampledOutput};
use heddle_model::{embedded_model_path, CpuRunner, ModelConfig, ModelError};

const BLOCKS: usize = 16;
const BLOCK_SIZE: usize = 16;

fn runner() -> CpuRunner {
    let path = embedded_model_path().unwrap_or_else(|e| panic!("{e}"));
    CpuRunner::load(&path, BLOCKS, BLOCK_SIZE).unwrap()
}

fn scheduler_with(requests: u64, max_tokens: usize) -> Scheduler {
    let mut scheduler = Scheduler::new(SchedulerConfig {
        num_blocks: BLOCKS,
        block_size: BLOCK_SIZE,
        max_model_len: 64,
        ..SchedulerConfig::default()
    })
    .unwrap();
    for id in 0..requests {
        let mut request = Request::new(id, vec![300 + id as u32; 5], max_tokens, 0.0);
        request.stop.ignore_eos = true;
        scheduler.add(request).unwrap();
    }
    scheduler
}

#[test]
fn steps_run_every_request_to_its_length() {
    let (mut runner, mut scheduler) = (runner(), scheduler_with(3, 4));
    let mut driver = StepDriver::default();
    let mut tokens = [0; 3];
    while let Some(step) = driver.step(&mut scheduler, &mut runner).unwrap() {
        assert_eq!(step.events.len(), step.outputs.len());
        for event in step.events {
            tokens[event.id as usize] += 1;
            let last = tokens[event.id as usize] == 4;
            assert_eq!(event.finish, last.then_some(FinishReason::Length));
        }
    }
    assert_eq!(tokens, [4; 3]);
    assert!(!scheduler.has_work());
}

/// A runner whose every step fails.
struct Failing(CpuRunner);

impl ModelRunner for Failing {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }

    fn step(
        &mut self,
        _: &ScheduledBatch,
        _: &dyn SequenceTokens,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        Err(ModelError::InvalidBatch("refused".into()))
    }
}

#[test]
fn a_failed_step_ends_the_requests_it_held() {
    let (mut runner, mut scheduler) = (Failing(runner()), scheduler_with(2, 4));
    let mut driver = StepDriver::default();
    let failed = driver.step(&mut scheduler, &mut runner).unwrap_err();
    assert_eq!(failed.ended, [0, 1]);
    assert!(failed.error.to_string().contains("refused"));
    assert!(failed.to_string().contains("2 requests ended"), "{failed}");
    assert!(!scheduler.has_work());
    assert!(driver.step(&mut scheduler, &mut runner).unwrap().is_none());
}

/// Six requests into a pool too small for all of them at once (so some are preempted
/// and recomputed), of different lengths, greedy but one (seeded, with a penalty, which
/// keeps its pending tokens from being launched ahead), one ending on a stop token that
/// the scheduler cannot foresee.
fn mixed_workload(stop_token: Option<TokenId>) -> Scheduler {
    let mut scheduler = Scheduler::new(SchedulerConfig {
        num_blocks: 10,
        block_size: BLOCK_SIZE,
        max_running: 4,
        max_batched_tokens: 48,
        prefill_chunk: 24,
        max_model_len: 128,
        ..SchedulerConfig::default()
    })
    .unwrap();
    for id in 0..6u64 {
        let prompt: Vec<TokenId> = (0..12 + 5 * id as u32)
            .map(|i| 200 + 37 * i + id as u32)
            .collect();
        let mut request = Request::new(id, prompt, 20 + 7 * id as usize, 0.0);
        request.stop.ignore_eos = true;
        request.sampling = SamplingParams::greedy();
        if id == 1 {
            request.stop.stop_token_ids = stop_token.into_iter().collect();
        }
        if id == 4 {
            request.sampling = SamplingParams {
                temperature: 0.8,
                seed: Some(7),
                frequency_penalty: 0.3,
                ..SamplingParams::default()
            };
        }
        scheduler.add(request).unwrap();
    }
    scheduler
}

fn record(events: &mut HashMap<RequestId, Vec<StepEvent>>, step: StepResult) {
    for event in step.events {
        events.entry(event.id).or_default().push(event);
    }
}

#[test]
fn stepping_one_ahead_gives_the_tokens_of_stepping_one_at_a_time() {
    let run_plain = |stop_token| {
        let (mut runner, mut scheduler) = (runner(), mixed_workload(stop_token));
        let mut driver = StepDriver::default();
        let mut events = HashMap::new();
        while let Some(step) = driver.step(&mut scheduler, &mut runner).unwrap() {
            record(&mut events, step);
        }
        assert!(scheduler.stats().preemptions > 0, "the workload preempts");
        events
    };
    // Request 1 stops on the fifth token it generates when run without a stop token.
    let stop_token = run_plain(None)[&1][4].token;
    let plain = run_plain(Some(stop_token));
    assert_eq!(plain[&1].len(), 5);
    assert_eq!(plain[&1][4].finish, Some(FinishReason::Stop));

    let mut runner = ComputedAtLaunch::new(runner());
    let mut scheduler = mixed_workload(Some(stop_token));
    let mut driver = StepDriver::default();
    let mut overlapped = HashMap::new();
    let (mut steps, mut launched_ahead) = (0, 0);
    while let Some(step) = driver
        .step_overlapped(&mut scheduler, &mut runner, true, |_, _| {})
        .unwrap()
    {
        launched_ahead += step.launched_ahead as usize;
        record(&mut overlapped, step);
        steps += 1;
        assert!(
            steps < 10_000,
            "the overlapped loop stopped making progress"
        );
    }
    // A pending token the step before did not sample fails its launch (and the test).
    assert!(
        runner.pending_taken() > 50,
        "{} pending tokens",
        runner.pending_taken()
    );
    assert!(
        launched_ahead * 3 > steps,
        "{launched_ahead} of {steps} steps launched ahead"
    );
    assert!(!driver.has_pending_step());
    assert_eq!(overlapped, plain);
    let kv = scheduler.stats().kv;
    assert_eq!(kv.free_blocks, kv.total_blocks, "blocks leaked");
}

/// The CPU runner, failing its `failing`-th step (only that one).
struct FailingOnce {
    runner: CpuRunner,
    failing: usize,
}

impl ModelRunner for FailingOnce {
    fn config(&self) -> &ModelConfig {
        self.runner.config()
    }

    fn step(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.failing = self.failing.wrapping_sub(1);
        if self.failing == 0 {
            return Err(ModelError::InvalidBatch("refused".into()));
        }
        self.runner.step(batch, history)
    }
}

#[test]
fn a_failure_while_overlapping_ends_every_request_once() {
    for failing in 1..12 {
        let mut runner = ComputedAtLaunch::new(FailingOnce {
            runner: runner(),
            failing,
        });
        let mut scheduler = mixed_workload(None);
        let mut driver = StepDriver::default();
        let (mut ended, mut failures) = (Vec::new(), 0);
        for _ in 0..10_000 {
            match driver.step_overlapped(&mut scheduler, &mut runner, true, |_, _| {}) {
                Ok(Some(step)) => ended.extend(
                    step.events
                        .iter()
                        .filter(|e| e.finish.is_some())
                        .map(|e| e.id),
                ),
                Ok(None) => break,
                Err(failed) => {
                    assert!(!failed.ended.is_empty());
                    ended.extend(failed.ended);
                    failures += 1;
                }
            }
        }
        assert_eq!(failures, 1);
        ended.sort_unstable();
        assert_eq!(ended, (0..6).collect::<Vec<_>>(), "step {failing} failing");
        assert!(!scheduler.has_work() && !driver.has_pending_step());
        let kv = scheduler.stats().kv;
        assert_eq!(kv.free_blocks, kv.total_blocks, "blocks leaked");
    }
}
