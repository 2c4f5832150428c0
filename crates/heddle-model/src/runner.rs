//! The interface the engine drives: one call per scheduler step.

use heddle_core::kv::BlockId;
use heddle_core::{RequestId, SampledToken, ScheduledBatch, SequenceTokens, TokenId};

use crate::config::ModelConfig;
use crate::error::ModelError;
use crate::logits_processing::PendingAdjustments;

/// A model that computes scheduled batches and samples their next tokens. Sampling happens
/// inside, so that a GPU runner can sample on the device and copy back only token ids.
pub trait ModelRunner: Send {
    fn config(&self) -> &ModelConfig;

    /// Runs one step: computes the K/V of every scheduled token into the paged cache and
    /// samples a token for each sequence with `needs_logits`. Returns one output per such
    /// sequence, in batch order. `history` gives each sequence's prompt and output so far,
    /// for the penalties.
    fn step(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<Vec<SampledOutput>, ModelError>;

    /// Whether [`Self::step_adjusted`] applies logit biases and grammar masks. A runner
    /// that cannot must never be given a sequence that needs them: the engine refuses
    /// such requests instead of sampling them unconstrained.
    fn applies_logits_adjustments(&self) -> bool {
        false
    }

    /// [`Self::step`], with each sampled row changed by its sequence's adjustment before
    /// sampling. `adjustments` is called once, after the forward pass: the masks it waits
    /// for are computed meanwhile.
    fn step_adjusted(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
        adjustments: PendingAdjustments<'_>,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        let _ = (batch, history, adjustments);
        Err(ModelError::LogitsProcessing(
            "this runner cannot apply logit biases or grammar masks".into(),
        ))
    }

    /// Whether the runner scores prompts: for each scheduled sequence with
    /// `prompt_logprobs`, the log-probability of every prompt token its chunk predicts,
    /// handed over by [`Self::take_prompt_logprobs`]. A runner that cannot must never be
    /// given such a sequence: the engine refuses those requests.
    fn computes_prompt_logprobs(&self) -> bool {
        false
    }

    /// The prompt log-probabilities computed by the last step, in batch order and
    /// position order within a sequence; empty for a runner that computes none.
    fn take_prompt_logprobs(&mut self) -> Vec<PromptTokenLogprobs> {
        Vec::new()
    }

    /// Steps queued one behind another, where the runner offers them (see
    /// [`OverlappedSteps`]).
    fn overlapped(&mut self) -> Option<&mut dyn OverlappedSteps> {
        None
    }
}

/// Steps launched one behind another: a runner whose device computes asynchronously
/// lets the host schedule and queue step N + 1 while step N runs, so that the host's
/// share of a step (scheduling, packing, launches) is hidden behind the device's. At
/// most two steps are launched and not collected at a time.
pub trait OverlappedSteps {
    /// Whether `batch` may be launched while the step launched last is not collected:
    /// every sequence with a pending last token must find it on the device, and what the
    /// batch asks of the host (penalties over a history that lacks the pending token,
    /// prompt scores) must not need that step's results.
    fn can_launch_ahead(&self, batch: &ScheduledBatch) -> bool;

    /// Queues a step and returns without waiting for it. A sequence whose last token is
    /// pending ([`ScheduledSeq::last_token_pending`](heddle_core::ScheduledSeq)) takes it
    /// from the sample the step launched just before made for it.
    fn launch(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<(), ModelError>;

    /// Waits for the oldest step not yet collected and returns what
    /// [`ModelRunner::step`] would have (its prompt log-probabilities then wait in
    /// [`ModelRunner::take_prompt_logprobs`]).
    fn collect(&mut self) -> Result<Vec<SampledOutput>, ModelError>;

    /// Forgets every step not yet collected, after one of them failed.
    fn abandon(&mut self);
}

/// What a runner's model and KV cache hold. Every runner checks each scheduled sequence
/// against them before a step touches memory, so that its kernels may index the
/// embeddings by token and the cache through the block table unchecked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Positions the model can attend over.
    pub max_positions: usize,
    pub vocab_size: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl BatchLimits {
    pub fn new(config: &ModelConfig, block_size: usize, num_blocks: usize) -> Self {
        BatchLimits {
            max_positions: config.max_position_embeddings,
            vocab_size: config.vocab_size,
            block_size,
            num_blocks,
        }
    }

    /// Checks sequence `i` of a step: some tokens, all inside the vocabulary, at
    /// positions inside the context, and a block table covering them with blocks inside
    /// the cache.
    pub fn check_sequence(
        &self,
        i: usize,
        tokens: &[TokenId],
        start_position: usize,
        block_table: &[BlockId],
    ) -> Result<(), ModelError> {
        let bad = |why: String| Err(ModelError::InvalidBatch(format!("sequence {i}: {why}")));
        if tokens.is_empty() {
            return bad("no tokens".into());
        }
        let end = start_position + tokens.len();
        if end > self.max_positions {
            return bad(format!(
                "position {} is past the context length {}",
                end - 1,
                self.max_positions
            ));
        }
        let bs = self.block_size;
        let needed = end.div_ceil(bs);
        if block_table.len() < needed {
            return bad(format!(
                "{end} positions need {needed} blocks of {bs}, the block table has {}",
                block_table.len()
            ));
        }
        if let Some(b) = block_table[..needed]
            .iter()
            .find(|&&b| b as usize >= self.num_blocks)
        {
            return bad(format!(
                "block {b} is beyond the cache's {} blocks",
                self.num_blocks
            ));
        }
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return bad(format!(
                "token {t} is outside the vocabulary of {}",
                self.vocab_size
            ));
        }
        Ok(())
    }

    /// [`Self::check_sequence`] for every sequence of `batch`, which must have no pending
    /// token ([`refuse_pending`]).
    pub fn check_batch(&self, batch: &ScheduledBatch) -> Result<(), ModelError> {
        refuse_pending(batch)?;
        for (i, s) in batch.seqs.iter().enumerate() {
            self.check_sequence(i, &s.tokens, s.start_position, &s.block_table)?;
        }
        Ok(())
    }
}

/// Refuses a batch with a pending token: a step takes every token from its batch; only
/// [`OverlappedSteps::launch`] takes a pending one from the step before.
pub fn refuse_pending(batch: &ScheduledBatch) -> Result<(), ModelError> {
    match batch.seqs.iter().position(|s| s.last_token_pending) {
        Some(i) => Err(ModelError::InvalidBatch(format!(
            "sequence {i}: its last token is pending, and a step takes every token from its \
             batch"
        ))),
        None => Ok(()),
    }
}

/// The log-probability of one prompt token given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTokenLogprobs {
    pub id: RequestId,
    /// The token's position in the prompt (>= 1: the first token has no predecessor).
    pub position: usize,
    /// log p(token) under the model's raw distribution, as [`SampledOutput::logprob`].
    pub logprob: f32,
    /// The sequence's `prompt_logprobs` most likely tokens at this position, most likely
    /// first.
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// The token sampled for one sequence, with the log-probabilities it asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledOutput {
    pub id: RequestId,
    pub token: TokenId,
    /// log p(token) under the model's raw distribution, when `logprobs` was requested.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens and their log-probabilities, most likely first.
    pub top_logprobs: Vec<(TokenId, f32)>,
}

impl From<&SampledOutput> for SampledToken {
    fn from(o: &SampledOutput) -> Self {
        SampledToken {
            id: o.id,
            token: o.token,
        }
    }
}

#[cfg(test)]
mod tests {
    use heddle_core::{SamplingParams, ScheduledSeq};

    use super::*;

    const LIMITS: BatchLimits = BatchLimits {
        max_positions: 64,
        vocab_size: 100,
        block_size: 16,
        num_blocks: 4,
    };

    fn batch(tokens: Vec<TokenId>, start_position: usize, table: Vec<BlockId>) -> ScheduledBatch {
        ScheduledBatch {
            seqs: vec![ScheduledSeq {
                id: 1,
                tokens,
                start_position,
                block_table: table,
                needs_logits: true,
                sampling: SamplingParams::greedy(),
                prompt_logprobs: None,
                num_generated: 0,
                last_token_pending: false,
            }],
            ..ScheduledBatch::default()
        }
    }

    fn refusal(batch: &ScheduledBatch) -> String {
        LIMITS.check_batch(batch).unwrap_err().to_string()
    }

    #[test]
    fn a_sequence_inside_every_limit_passes() {
        assert!(LIMITS
            .check_batch(&batch(vec![1, 99], 30, vec![3, 0]))
            .is_ok());
        assert!(LIMITS.check_batch(&ScheduledBatch::default()).is_ok());
    }

    #[test]
    fn each_limit_refuses_with_its_reason() {
        assert!(refusal(&batch(vec![], 0, vec![0])).contains("no tokens"));
        assert!(refusal(&batch(vec![1], 64, vec![0, 1, 2, 3, 3])).contains("context length"));
        assert!(refusal(&batch(vec![1, 2], 15, vec![0])).contains("block table has 1"));
        assert!(refusal(&batch(vec![1], 0, vec![4])).contains("block 4 is beyond"));
        assert!(refusal(&batch(vec![100], 0, vec![0])).contains("token 100"));
    }
}
