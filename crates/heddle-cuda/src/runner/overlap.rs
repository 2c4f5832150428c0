//! Overlapped stepping: a step is queued (`launch`) and its results are taken later
//! (`collect`), so that the host schedules, packs and queues step N + 1 while the GPUs
//! compute step N. The host's share of a step (≈ 0.4 ms of a 1B decode step, ≈ 0.3 ms of
//! a tensor-parallel token) then hides behind the GPU's.
//!
//! What makes it work on the GPU side:
//! - a token that step N samples and step N + 1 decodes never visits the host: step N +
//!   1's metadata lists its pending tokens (`StepPlan::pending`), and `take_pending_tokens`
//!   copies them from step N's sampled ids on each GPU before the forward pass (rank 0's
//!   sampler output; on the other GPUs, the ids that greedy sampling over the ranks'
//!   slices writes there too, so a tensor-parallel step may take pending tokens only
//!   after such a step);
//! - the metadata is copied from page-locked memory in two turns (`CudaRunner::pack`): a
//!   copy from ordinary memory would first wait for the GPU's queued work;
//! - the sampled words go back into page-locked memory, one buffer per step in flight,
//!   and an event per GPU marks the step's end; `collect` waits for those events only.

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Context;
use cudarc::driver::CudaEvent;
use heddle_core::{ScheduledBatch, SequenceTokens};
use heddle_model::runner::{OverlappedSteps, SampledOutput};
use heddle_model::ModelError;

use super::{device_error, sampled_outputs, CudaRunner, SAMPLED_WORDS_PER_ROW};
use crate::gpu::{grid, Gpu, StagingBuffer};
use crate::plan::SampledRow;

/// Steps that can be in flight at once: the one computing and the one queued behind it.
const IN_FLIGHT: usize = 2;

/// A launched step, until collected.
struct LaunchedStep {
    rows: Vec<SampledRow>,
    /// Rows the sampler wrote (padding included).
    sampled_rows: usize,
    /// Words copied back into `Launched::host[slot]`.
    words: usize,
    slot: usize,
    /// One per GPU, recorded after the step's last work there.
    done: Vec<CudaEvent>,
    /// Whether it scores prompt tokens (read back when collected).
    scores: bool,
}

/// The runner's steps in flight, oldest first, and where their sampled words land.
pub(super) struct Launched {
    steps: VecDeque<LaunchedStep>,
    host: [StagingBuffer; IN_FLIGHT],
    /// Whether the last launched step left its sampled ids on every GPU, where a pending
    /// token of the next step is taken from.
    ids_on_every_gpu: bool,
}

impl Launched {
    /// `words`: the most sampled words a step copies back.
    pub(super) fn new(gpu: &Gpu, words: usize) -> anyhow::Result<Self> {
        Ok(Launched {
            steps: VecDeque::new(),
            host: [gpu.alloc_readback(words)?, gpu.alloc_readback(words)?],
            ids_on_every_gpu: false,
        })
    }

    /// Waits until the GPUs have finished every launched step (not collecting them), so
    /// that buffers they read may be replaced.
    pub(super) fn wait_for_gpus(&self, gpus: &[Gpu]) -> anyhow::Result<()> {
        if self.steps.is_empty() {
            return Ok(());
        }
        for gpu in gpus {
            gpu.bind()?;
            gpu.stream.synchronize().context("waiting for the GPU")?;
        }
        Ok(())
    }
}

impl CudaRunner {
    /// Copies each pending token of the packed step from the step before's sampled ids,
    /// on every GPU.
    fn take_pending_tokens(&self) -> anyhow::Result<()> {
        let count = self.plan.num_pending;
        if count == 0 {
            return Ok(());
        }
        let o = self.plan.offsets;
        for (device, gpu) in self.gpus.iter().enumerate() {
            let sampled = match device {
                0 => self.sampled.ptr,
                _ => {
                    self.ranks
                        .iter()
                        .find(|rank| rank.device == device)
                        .and_then(|rank| rank.sampled_ids.as_ref())
                        .context("no sampled ids on this GPU")?
                        .ptr
                }
            };
            let metadata = self.metadata[device].ptr;
            gpu.launch(
                "take_pending_tokens",
                grid(count.div_ceil(256), 256),
                &[
                    &(metadata + 4 * o.tokens as u64),
                    &(metadata + 4 * o.pending as u64),
                    &(count as i32),
                    &sampled,
                ],
            )?;
        }
        Ok(())
    }

    fn launch_step(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let padding = self.graph_padding(batch);
        self.pack(batch, history, padding, false)?;
        anyhow::ensure!(
            self.plan.unmatched_pending == 0,
            "{} pending tokens that the step before did not sample",
            self.plan.unmatched_pending
        );
        self.take_pending_tokens()?;
        match padding {
            Some(padding) => self.replay(padding, true)?,
            None => self.enqueue(true)?,
        }
        let scores = !self.plan.scored.is_empty();
        if scores {
            self.enqueue_scoring()?;
        }
        let sampled_rows = self.plan.sampled_rows;
        let words = if self.plan.wants_logprobs() {
            sampled_rows * SAMPLED_WORDS_PER_ROW
        } else {
            self.plan.rows.len()
        };
        let ids_on_every_gpu = self.gpus.len() == 1 || self.greedy_by_slices(true).is_some();
        let launched = &mut self.overlap;
        let slot = launched
            .steps
            .back()
            .map_or(0, |step| (step.slot + 1) % IN_FLIGHT);
        if words > 0 {
            self.gpus[0].read_staged(&self.sampled, &mut launched.host[slot], words)?;
        }
        let done = self
            .gpus
            .iter()
            .map(|gpu| gpu.stream.record_event(None))
            .collect::<Result<_, _>>()
            .context("recording a step's end")?;
        launched.steps.push_back(LaunchedStep {
            rows: self.plan.rows.clone(),
            sampled_rows,
            words,
            slot,
            done,
            scores,
        });
        launched.ids_on_every_gpu = ids_on_every_gpu;
        self.times.host_seconds += started.elapsed().as_secs_f64();
        Ok(())
    }

    fn collect_step(&mut self) -> anyhow::Result<Vec<SampledOutput>> {
        let step = self
            .overlap
            .steps
            .pop_front()
            .context("no launched step to collect")?;
        let waiting = Instant::now();
        for done in &step.done {
            done.synchronize().context("waiting for the GPU")?;
        }
        self.times.steps += 1;
        self.times.wait_seconds += waiting.elapsed().as_secs_f64();
        let words = self.overlap.host[step.slot].words(step.words)?;
        let outputs = sampled_outputs(&step.rows, step.sampled_rows, words);
        self.prompt_logprobs.clear();
        if step.scores {
            // No step is launched behind a scoring one (`can_launch_ahead`): the plan is
            // still this step's.
            self.read_scores()?;
        }
        Ok(outputs)
    }
}

impl OverlappedSteps for CudaRunner {
    fn can_launch_ahead(&self, batch: &ScheduledBatch) -> bool {
        let launched = &self.overlap;
        let scores = launched.steps.iter().any(|step| step.scores)
            || batch.seqs.iter().any(|s| s.prompt_logprobs.is_some());
        // Penalties read the history on the host, which lacks a pending token.
        let pending_ok = batch
            .seqs
            .iter()
            .filter(|s| s.last_token_pending)
            .all(|s| launched.ids_on_every_gpu && !s.sampling.has_penalties());
        launched.steps.len() < IN_FLIGHT && !scores && pending_ok
    }

    fn launch(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<(), ModelError> {
        if self.overlap.steps.len() >= IN_FLIGHT {
            return Err(ModelError::InvalidBatch(format!(
                "{IN_FLIGHT} steps are already in flight"
            )));
        }
        self.check(batch, true)?;
        self.launch_step(batch, history).map_err(device_error)
    }

    fn collect(&mut self) -> Result<Vec<SampledOutput>, ModelError> {
        self.collect_step().map_err(device_error)
    }

    fn abandon(&mut self) {
        // The GPUs may hold an error already; the steps are forgotten either way.
        let _ = self.overlap.wait_for_gpus(&self.gpus);
        self.overlap.steps.clear();
    }
}
