//! A runner's steps behind the overlapped interface ([`OverlappedSteps`]), each computed
//! when launched: a pending token is then already known (the one the runner's own last
//! launch sampled). It gains no time; it lets the drivers of overlapped steps (the
//! scheduler's one step ahead, `StepDriver::step_overlapped`, the engine's overlapped
//! path) run on the CPU runner and be checked against one step at a time.

use std::collections::{HashMap, VecDeque};

use heddle_core::{RequestId, ScheduledBatch, SequenceTokens, TokenId};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::logits_processing::PendingAdjustments;
use crate::runner::{ModelRunner, OverlappedSteps, PromptTokenLogprobs, SampledOutput};

/// A launched step's results, until collected.
struct Computed {
    outputs: Vec<SampledOutput>,
    scores: Vec<PromptTokenLogprobs>,
}

/// `runner`'s steps, computed at launch and handed over in launch order.
pub struct ComputedAtLaunch<R> {
    runner: R,
    launched: VecDeque<Computed>,
    /// What the last launch sampled, by sequence.
    last_sampled: HashMap<RequestId, TokenId>,
    /// The prompt scores of the step collected last, until taken.
    collected_scores: Option<Vec<PromptTokenLogprobs>>,
    /// Pending tokens taken from the last launch's samples so far.
    pending_taken: usize,
}

impl<R: ModelRunner> ComputedAtLaunch<R> {
    pub fn new(runner: R) -> Self {
        ComputedAtLaunch {
            runner,
            launched: VecDeque::new(),
            last_sampled: HashMap::new(),
            collected_scores: None,
            pending_taken: 0,
        }
    }

    /// Pending tokens taken from the step before's samples so far.
    pub fn pending_taken(&self) -> usize {
        self.pending_taken
    }
}

impl<R: ModelRunner> ModelRunner for ComputedAtLaunch<R> {
    fn config(&self) -> &ModelConfig {
        self.runner.config()
    }

    fn step(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.collected_scores = None;
        self.runner.step(batch, history)
    }

    fn applies_logits_adjustments(&self) -> bool {
        self.runner.applies_logits_adjustments()
    }

    fn step_adjusted(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
        adjustments: PendingAdjustments<'_>,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.collected_scores = None;
        self.runner.step_adjusted(batch, history, adjustments)
    }

    fn computes_prompt_logprobs(&self) -> bool {
        self.runner.computes_prompt_logprobs()
    }

    fn take_prompt_logprobs(&mut self) -> Vec<PromptTokenLogprobs> {
        match self.collected_scores.take() {
            Some(scores) => scores,
            None => self.runner.take_prompt_logprobs(),
        }
    }

    fn overlapped(&mut self) -> Option<&mut dyn OverlappedSteps> {
        Some(self)
    }
}

impl<R: ModelRunner> OverlappedSteps for ComputedAtLaunch<R> {
    /// The CUDA runner's rules (runner/overlap.rs), so that the drivers meet the same
    /// refusals here: nothing behind a step that scores prompts, no prompt scoring ahead,
    /// no penalties over a history that lacks a pending token; at most two steps.
    fn can_launch_ahead(&self, batch: &ScheduledBatch) -> bool {
        let scores = self.launched.iter().any(|step| !step.scores.is_empty())
            || batch.seqs.iter().any(|s| s.prompt_logprobs.is_some());
        let pending_ok = batch
            .seqs
            .iter()
            .filter(|s| s.last_token_pending)
            .all(|s| !s.sampling.has_penalties());
        self.launched.len() < 2 && !scores && pending_ok
    }

    fn launch(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<(), ModelError> {
        let mut resolved = batch.clone();
        for seq in resolved.seqs.iter_mut().filter(|s| s.last_token_pending) {
            let token = self.last_sampled.get(&seq.id).ok_or_else(|| {
                ModelError::InvalidBatch(format!(
                    "sequence {}: a pending token that the step before did not sample",
                    seq.id
                ))
            })?;
            *seq.tokens.last_mut().expect("a pending token") = *token;
            seq.last_token_pending = false;
            self.pending_taken += 1;
        }
        let outputs = self.runner.step(&resolved, history)?;
        self.last_sampled = outputs.iter().map(|o| (o.id, o.token)).collect();
        let scores = self.runner.take_prompt_logprobs();
        self.launched.push_back(Computed { outputs, scores });
        Ok(())
    }

    fn collect(&mut self) -> Result<Vec<SampledOutput>, ModelError> {
        let step = self
            .launched
            .pop_front()
            .ok_or_else(|| ModelError::InvalidBatch("no launched step to collect".into()))?;
        self.collected_scores = Some(step.scores);
        Ok(step.outputs)
    }

    fn abandon(&mut self) {
        self.launched.clear();
    }
}
