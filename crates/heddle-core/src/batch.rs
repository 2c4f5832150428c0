//! What one scheduler step hands to a model runner, and what comes back.

use crate::kv::BlockId;
use crate::request::{FinishReason, RequestId, SamplingParams, TokenId};

/// One sequence's share of a step.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledSeq {
    pub id: RequestId,
    /// The tokens whose keys and values this step computes (a prefill chunk, or the one
    /// newest token when decoding).
    pub tokens: Vec<TokenId>,
    /// Position of `tokens[0]` in the sequence; the rest follow contiguously. Everything
    /// before it is already in the KV cache.
    pub start_position: usize,
    /// Physical KV blocks of the sequence, in order; covers `start_position + tokens.len()`.
    pub block_table: Vec<BlockId>,
    /// Whether the runner samples a token after the last of `tokens` (decode steps and the
    /// last chunk of a prefill).
    pub needs_logits: bool,
    pub sampling: SamplingParams,
    /// `Some(top-N)` when the runner must also return, for each of `tokens` whose next
    /// token is a prompt token, that token's log-probability and the N most likely
    /// alternatives: set while a request with `prompt_logprobs` computes its prompt the
    /// first time, never once its first token was sampled (a recompute after preemption
    /// then repeats nothing).
    pub prompt_logprobs: Option<u32>,
    /// Tokens generated so far; with the seed it makes seeded sampling independent of
    /// the batch and of preemption.
    pub num_generated: usize,
    /// Whether the last of `tokens` is still unknown: the token that the step in flight
    /// when this one was scheduled samples for this sequence (see
    /// [`crate::Scheduler::schedule_into`]). `tokens` holds 0 in its place; the runner
    /// takes it from that step's output, or the scheduler fills it in
    /// ([`crate::Scheduler::resolve_pending`]) once that step's update is applied.
    pub last_token_pending: bool,
}

impl ScheduledSeq {
    /// Position of the token sampled after this step, if any.
    pub fn end_position(&self) -> usize {
        self.start_position + self.tokens.len()
    }
}

/// The batch of one step: prefill chunks and decode tokens together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduledBatch {
    pub seqs: Vec<ScheduledSeq>,
    /// Requests this step preempted (their blocks are already freed).
    pub preempted: Vec<RequestId>,
}

impl ScheduledBatch {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// Gives a runner the whole token history of a scheduled sequence (prompt then output),
/// which penalties need.
pub trait SequenceTokens {
    /// Prompt and generated tokens of `id`, or an empty slice if unknown.
    fn sequence_tokens(&self, id: RequestId) -> &[TokenId];
    /// How many of `sequence_tokens(id)` are the prompt.
    fn prompt_len(&self, id: RequestId) -> usize;
}

/// The token a runner sampled for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampledToken {
    pub id: RequestId,
    pub token: TokenId,
}

/// What [`crate::Scheduler::update`] reports for each sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepEvent {
    pub id: RequestId,
    pub token: TokenId,
    /// Set when this token ends the request: `Stop` for EOS or a stop token (whose text
    /// is not part of the output), `Length` at max_tokens (the token is part of it).
    pub finish: Option<FinishReason>,
}
