//! heddle-core: the scheduling brain of continuous batching.
//!
//! No tensors, no async runtime and no I/O: time comes in as an argument (seconds on the
//! caller's clock), so every policy is deterministic and testable.
//!
//! - [`request`]: ids, priorities, the status machine, sampling parameters, stop criteria.
//! - [`queue`]: the aging priority queue of waiting requests.
//! - [`kv`]: the paged KV block pool, block tables and the prefix cache.
//! - [`kv_events`]: the prefix cache's changes, recorded for KV-event subscribers.
//! - [`scheduler`]: one `schedule(now)` per step builds the batch; `update` applies results.
//! - [`batch`]: what a step hands to a model runner and what comes back.

pub mod batch;
pub mod error;
pub mod kv;
pub mod kv_events;
pub mod queue;
pub mod request;
pub mod scheduler;

pub use batch::{SampledToken, ScheduledBatch, ScheduledSeq, SequenceTokens, StepEvent};
pub use error::CoreError;
pub use kv::{BlockHash, BlockId, BlockPool, BlockTable, KvStats};
pub use kv_events::KvCacheEvent;
pub use queue::{AgingQueue, PutOutcome};
pub use request::{
    FinishReason, Priority, Request, RequestId, RequestStatus, SamplingParams, StopCriteria,
    TokenId,
};
pub use scheduler::{AddOutcome, Scheduler, SchedulerConfig, SchedulerStats};
