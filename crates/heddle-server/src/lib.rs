//! heddle-server: engines (one per loaded model, on its own thread), the OpenAI-compatible
//! HTTP API and the `heddle` command's subcommands.

pub mod api;
pub mod batch;
pub mod bench;
pub mod config;
pub mod engine;
pub mod faults;
pub mod generate;
pub mod kv_events;
pub mod metrics;
pub mod pool;
pub mod sequence_logits;
pub mod serve;
pub mod vllm_gauges;
