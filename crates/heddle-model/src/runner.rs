//! The interface the engine drives: one call per scheduler step.

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
