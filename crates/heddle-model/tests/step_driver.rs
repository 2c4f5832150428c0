//! The step driver over the real scheduler and the CPU runner on the embedded model:
//! requests run to their length, and a failed step ends the requests it held.

use heddle_core::{
    FinishReason, Request, ScheduledBatch, Scheduler, SchedulerConfig, SequenceTokens,
};
use heddle_model::driver::StepDriver;
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
