//! Per-sequence changes to the logits before sampling: OpenAI's `logit_bias` and a
//! grammar's token mask.
//!
//! A step's masks depend only on the tokens accepted before the step, so the engine
//! computes them while the runner's forward pass runs; the runner waits for them
//! ([`PendingAdjustments`]) only when it is about to sample.

use std::collections::HashMap;
use std::sync::Arc;

use heddle_core::{RequestId, TokenId};

use crate::grammar::TokenMask;

/// The bias that bans a token.
pub const BAN: f32 = -100.0;

/// How one sequence's logits row is changed this step.
#[derive(Debug, Clone, Default)]
pub struct LogitsAdjustment {
    /// Added to the logits of these tokens (ids below the vocabulary, biases in
    /// [-100, 100]); -100 bans the token outright, as OpenAI describes it.
    pub bias: Arc<[(TokenId, f32)]>,
    /// The only tokens that may be sampled, when a grammar constrains the sequence.
    pub mask: Option<TokenMask>,
}

impl LogitsAdjustment {
    /// Biases the row, then masks it.
    pub fn apply(&self, logits: &mut [f32]) {
        for &(token, bias) in self.bias.iter() {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit = if bias <= BAN {
                    f32::NEG_INFINITY
                } else {
                    *logit + bias
                };
            }
        }
        if let Some(mask) = &self.mask {
            mask.apply(logits);
        }
    }
}

/// The adjustments of a step's sequences, by id; a sequence absent here is sampled as is.
pub type StepAdjustments = HashMap<RequestId, LogitsAdjustment>;

/// A step's adjustments, possibly still being computed: the runner calls it once, after
/// the forward pass and before sampling, and it blocks until they are ready. An error
/// fails the step.
pub type PendingAdjustments<'a> = Box<dyn FnOnce() -> Result<StepAdjustments, String> + 'a>;
