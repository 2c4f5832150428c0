//! What changes a request's logits before sampling, on the engine's side: its logit
//! biases and its grammar's state.
//!
//! Where the grammar state lives: with the engine's record of the live request, not in
//! the scheduler (which knows no model) nor in the runner (which forgets sequences between
//! steps). The engine advances it with every token the scheduler accepts, so it always
//! matches the tokens the sequence really has: a stale output the scheduler drops never
//! reaches it, and preemption by recompute, which keeps the generated tokens, leaves it
//! as it is. It goes when the request ends, however it ends.
//!
//! A step's masks depend only on tokens accepted before the step, so they are computed
//! on a worker while the runner's forward pass runs; the runner waits for them just before
//! sampling. The worker spreads the sequences over the mask thread pool.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use heddle_core::{RequestId, TokenId};
use heddle_model::grammar::TokenConstraint;
use heddle_model::logits_processing::{LogitsAdjustment, StepAdjustments};
use rayon::prelude::*;

/// A request's logits processing.
#[derive(Debug, Clone, Default)]
pub struct SequenceLogits {
    /// OpenAI's `logit_bias`: (token, bias) pairs added to the logits.
    pub bias: Arc<[(TokenId, f32)]>,
    /// The grammar the output must match, at the point the output has reached.
    pub constraint: Option<TokenConstraint>,
}

impl SequenceLogits {
    /// Whether the logits are sampled as the model gives them.
    pub fn is_unchanged(&self) -> bool {
        self.bias.is_empty() && self.constraint.is_none()
    }
}

/// The adjustments of one step, and how long their masks took.
pub struct ComputedAdjustments {
    pub adjustments: StepAdjustments,
    /// Sequences whose grammar failed (an internal error, or a mask that ran out of
    /// fuel): they must end with an error, whatever was sampled for them.
    pub failed: Vec<(RequestId, String)>,
    /// Wall time spent computing the masks (zero when no sequence has a grammar).
    pub mask_time: Duration,
    /// Sequences with a grammar in this step.
    pub masked: usize,
}

/// Computes the adjustments of `seqs` (each sequence sampled this step that has any).
/// Runs on a mask thread (see [`mask_pool`]).
pub fn compute(seqs: Vec<(RequestId, &mut SequenceLogits)>) -> ComputedAdjustments {
    let started = Instant::now();
    let masked = seqs.iter().filter(|(_, s)| s.constraint.is_some()).count();
    let results: Vec<(RequestId, LogitsAdjustment, Option<String>)> = mask_pool().install(|| {
        seqs.into_par_iter()
            .map(|(id, logits)| {
                let mask = logits.constraint.as_mut().map(TokenConstraint::next_mask);
                let (mask, error) = match mask {
                    None => (None, None),
                    Some(Ok(mask)) => (Some(mask), None),
                    Some(Err(error)) => (None, Some(error.0)),
                };
                let adjustment = LogitsAdjustment {
                    bias: logits.bias.clone(),
                    mask,
                };
                (id, adjustment, error)
            })
            .collect()
    });
    let mut computed = ComputedAdjustments {
        adjustments: HashMap::with_capacity(results.len()),
        failed: Vec::new(),
        mask_time: if masked > 0 {
            started.elapsed()
        } else {
            Duration::ZERO
        },
        masked,
    };
    for (id, adjustment, error) in results {
        if let Some(error) = error {
            computed.failed.push((id, error));
        }
        computed.adjustments.insert(id, adjustment);
    }
    computed
}

/// Advances each grammar past its sequence's token of this step, spread over the mask
/// threads (a token costs tens of microseconds; a step may bring hundreds). For each:
/// whether the grammar is now complete, or why it refused the token.
pub fn accept_tokens(
    accepted: Vec<(RequestId, &mut TokenConstraint, TokenId)>,
) -> Vec<(RequestId, Result<bool, String>)> {
    let accept = |(id, constraint, token): (RequestId, &mut TokenConstraint, TokenId)| {
        let result = constraint
            .accept(token)
            .map(|()| constraint.is_complete())
            .map_err(|e| e.0);
        (id, result)
    };
    // Waking the mask threads costs about as much as a few dozen tokens.
    if accepted.len() < PARALLEL_ACCEPT_MIN {
        return accepted.into_iter().map(accept).collect();
    }
    mask_pool().install(|| accepted.into_par_iter().map(accept).collect())
}

/// Fewer tokens than this are accepted on the engine thread.
const PARALLEL_ACCEPT_MIN: usize = 64;

/// Threads that compute masks, apart from the forward pass's: half the cores, at least
/// one. Shared by every engine of the process.
pub fn mask_pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        rayon::ThreadPoolBuilder::new()
            .num_threads((cores / 2).max(1))
            .thread_name(|i| format!("grammar-mask-{i}"))
            .build()
            .expect("the grammar mask threads start")
    })
}
