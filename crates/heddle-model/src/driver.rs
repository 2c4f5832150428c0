//! One way to drive a runner from the scheduler, step after step: schedule → step →
//! update. The engine loop schedules and updates through [`StepDriver`] around its own
//! step (logit adjustments, injected faults); the in-process benches and self-tests run
//! whole steps with [`StepDriver::step`]. With a runner that overlaps steps,
//! [`StepDriver::step_overlapped`] schedules and launches step N + 1 before it waits for
//! step N.

use heddle_core::{RequestId, SampledToken, ScheduledBatch, Scheduler, StepEvent};

use crate::error::ModelError;
use crate::runner::{ModelRunner, OverlappedSteps, SampledOutput};

/// The batch and sampled tokens of a step, kept from step to step so that a steady step
/// allocates nothing.
#[derive(Debug, Default)]
pub struct StepDriver {
    batch: ScheduledBatch,
    sampled: Vec<SampledToken>,
    /// The step scheduled while `batch` is in flight (overlapped stepping).
    ahead: ScheduledBatch,
    /// Whether `batch` is launched and not yet collected (overlapped stepping).
    launched: bool,
    /// Whether `batch` is scheduled and waits to be launched by the next overlapped step
    /// (it could not be launched ahead; launching it then, not right after the update,
    /// keeps the step just collected apart from a failure of its launch).
    awaiting_launch: bool,
    /// Whether the step last returned is `ahead`'s (overlapped) rather than `batch`'s.
    collected_ahead: bool,
}

/// What a step that ran produced: the runner's outputs, in batch order, and the
/// scheduler's events for them.
#[derive(Debug)]
pub struct StepResult {
    pub outputs: Vec<SampledOutput>,
    pub events: Vec<StepEvent>,
    /// Whether the next step was launched before these results were applied
    /// (overlapped stepping).
    pub launched_ahead: bool,
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

    /// The batch of the step whose results [`Self::step`] or [`Self::step_overlapped`]
    /// returned last.
    pub fn collected_batch(&self) -> &ScheduledBatch {
        if self.collected_ahead {
            &self.ahead
        } else {
            &self.batch
        }
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

    /// Whether an overlapped step is launched and not yet collected, or scheduled and not
    /// yet launched: the next call must be [`Self::step_overlapped`] (with `ahead` false
    /// to stop overlapping).
    pub fn has_pending_step(&self) -> bool {
        self.launched || self.awaiting_launch
    }

    /// One step through a runner that overlaps steps: the step in flight (or, with none,
    /// the one waiting or one scheduled now, launched first) is collected and applied;
    /// before the wait, with `ahead`, the next step is scheduled and, when the runner can
    /// take it then, launched behind it (otherwise it is completed with the update's tokens
    /// and waits for the next call). So while the device computes a step, the host has
    /// already queued the next one.
    /// `on_scheduled` sees every batch as it is scheduled. Returns the collected step;
    /// `Ok(None)` when nothing was in flight and nothing could be scheduled. A failure
    /// abandons every step in flight (their sequences end with an error).
    pub fn step_overlapped(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut dyn OverlappedSteps,
        ahead: bool,
        mut on_scheduled: impl FnMut(&ScheduledBatch, &Scheduler),
    ) -> Result<Option<StepResult>, StepFailed> {
        if !self.launched {
            if !self.awaiting_launch {
                if self.schedule(scheduler).is_empty() {
                    return Ok(None);
                }
                on_scheduled(&self.batch, scheduler);
            }
            self.awaiting_launch = false;
            let launched = runner.launch(&self.batch, scheduler);
            self.after_launch(launched, scheduler, runner)?;
        }
        let mut ahead_launched = false;
        if !ahead {
            self.ahead.seqs.clear();
        } else {
            // Into the slots of the batch before last, so that a steady step allocates
            // nothing.
            scheduler.schedule_into(&mut self.ahead);
            if !self.ahead.is_empty() {
                on_scheduled(&self.ahead, scheduler);
                if runner.can_launch_ahead(&self.ahead) {
                    let launched = runner.launch(&self.ahead, scheduler);
                    self.after_launch(launched, scheduler, runner)?;
                    ahead_launched = true;
                }
            }
        }
        let collected = runner.collect();
        let outputs = self.after_launch(collected, scheduler, runner)?;
        let events = self.update(scheduler, &outputs);
        if !ahead_launched && !self.ahead.is_empty() {
            scheduler.resolve_pending(&mut self.ahead);
        }
        std::mem::swap(&mut self.batch, &mut self.ahead);
        self.launched = ahead_launched;
        self.awaiting_launch = !ahead_launched && !self.batch.is_empty();
        self.collected_ahead = true;
        Ok(Some(StepResult {
            outputs,
            events,
            launched_ahead: ahead_launched,
        }))
    }

    /// Passes a runner call's value on; on its failure, forgets the runner's launched
    /// steps and abandons the scheduler's steps in flight.
    fn after_launch<T>(
        &mut self,
        result: Result<T, ModelError>,
        scheduler: &mut Scheduler,
        runner: &mut dyn OverlappedSteps,
    ) -> Result<T, StepFailed> {
        result.map_err(|error| {
            runner.abandon();
            self.launched = false;
            self.awaiting_launch = false;
            StepFailed {
                error,
                ended: scheduler.abort_step(),
            }
        })
    }

    /// One whole step through `runner`; `Ok(None)` when nothing was scheduled. A failed
    /// step is abandoned ([`Scheduler::abort_step`]: its sequences end with an error).
    pub fn step<R: ModelRunner + ?Sized>(
        &mut self,
        scheduler: &mut Scheduler,
        runner: &mut R,
    ) -> Result<Option<StepResult>, StepFailed> {
        debug_assert!(!self.has_pending_step(), "an overlapped step is pending");
        self.collected_ahead = false;
        if self.schedule(scheduler).is_empty() {
            return Ok(None);
        }
        match runner.step(&self.batch, scheduler) {
            Ok(outputs) => {
                let events = self.update(scheduler, &outputs);
                Ok(Some(StepResult {
                    outputs,
                    events,
                    launched_ahead: false,
                }))
            }
            Err(error) => Err(StepFailed {
                error,
                ended: scheduler.abort_step(),
            }),
        }
    }
}
