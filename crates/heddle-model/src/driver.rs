//! One way to drive a runner from the scheduler, step after step: schedule → step →
//! update. The engine loop schedules and updates through [`StepDriver`] around its own
//! step (logit adjustments, injected faults); the in-process benches and self-tests run
//! whole steps with [`StepDriver::step`].

use heddle_core::{RequestId, SampledToken, ScheduledBatch, Scheduler, StepEvent};

use crate::error::ModelError;
use crate::runner::{ModelRunner, SampledOutput};

/// The batch and sampled tokens of a step, kept from step to step so that a steady step
/// allocates nothing.
#[derive(Debug, Default)]
pub struct StepDriver {
    batch: ScheduledBatch,
    sampled: Vec<SampledToken>,
}

/// What a step that ran produced: the runner's outputs, in batch order, and the
/// scheduler's events for them.
#[derive(Debug)]
pub struct StepResult {
    pub outputs: Vec<SampledOutput>,
    pub events: Vec<StepEvent>,
}

/// A step the runner failed: its error, and the requests the abandoned step ended.
#[derive(Debug, thiserror::Error)]
#[error("the step failed ({} requests ended): {error}", ended.len())]
pub struct StepFailed {
    #[source]
    pub error: ModelError,
    pub ended: Vec<RequestId>,
}

impl StepDriver {
    /// Schedules the next step into the driver's batch.
    pub fn schedule(&mut self, scheduler: &mut Scheduler) -> &ScheduledBatch {
        scheduler.schedule_into(&mut self.batch);
        &self.batch
    }

    /// The batch of the last step scheduled.
    pub fn batch(&self) -> &ScheduledBatch {
        &self.batch
    }

    /// Applies a step's outputs: the scheduler appends the sampled tokens and ends the
    /// sequences they finish. Returns at most one event per output, in output order.
    pub fn update(
        &mut self,
        scheduler: &mut Scheduler,
        outputs: &[SampledOutput],
    ) -> Vec<StepEvent> {
        self.sampled.clear();
        self.sampled.extend(outputs.iter().map(SampledToken::from));
        scheduler.update(&self.sampled)
    }

    /// One whole step through `runner`; `Ok(None)` when nothing was scheduled. A failed
    /// step is abandoned ([`Scheduler::abort_step`]: its sequences end with an error).
    pub fn step<R: ModelRunner + ?Sized>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut R,
    ) -> Result<Option<StepResult>, StepFailed> {
        if self.schedule(scheduler).is_empty() {
            return Ok(None);
        }
        match runner.step(&self.batch, scheduler) {
            Ok(outputs) => {
                let events = self.update(scheduler, &outputs);
                Ok(Some(StepResult { outputs, events }))
            }
            Err(error) => Err(StepFailed {
                error,
                ended: scheduler.abort_step(),
            }),
        }
    }
}
