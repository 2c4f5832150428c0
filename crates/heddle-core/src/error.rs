//! The errors of the scheduling core.

use crate::request::{RequestId, RequestStatus};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CoreError {
    #[error("invalid priority {0:?}: expected \"high\", \"normal\", \"low\" or 0, 1, 2")]
    InvalidPriority(String),
    #[error("invalid {param}: {reason}")]
    InvalidParam { param: &'static str, reason: String },
    #[error("illegal status transition {from:?} -> {to:?}")]
    IllegalTransition {
        from: RequestStatus,
        to: RequestStatus,
    },
    #[error("request {0} already exists")]
    DuplicateRequest(RequestId),
    #[error("request {0} is unknown")]
    UnknownRequest(RequestId),
    #[error("block {0} released while not in use")]
    DoubleRelease(u32),
    #[error(
        "request needs {needed} tokens of context (prompt + max_tokens) but at most {limit} fit"
    )]
    ContextTooLong { needed: usize, limit: usize },
}
