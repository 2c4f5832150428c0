//! heddle-model: tensors and weights behind the [`runner::ModelRunner`] trait.
//! Knows nothing of HTTP; the scheduling decisions come from `heddle-core`.

mod attention;
pub mod chat_template;
pub mod computed_at_launch;
pub mod config;
pub mod cpu_model;
pub mod cpu_runner;
pub mod detokenizer;
pub mod driver;
pub mod embedded;
pub mod error;
pub mod grammar;
pub mod kv_cache;
pub mod llama;
pub mod loader;
pub mod logits_processing;
mod math;
pub mod membw;
pub mod qmatmul;
pub mod rope;
pub mod runner;
pub mod sampling;
pub mod stop_strings;
pub mod tokenizer;

pub use config::{Architecture, ModelConfig};
pub use cpu_model::{load_cpu, CpuModel, KvSize};
pub use cpu_runner::CpuRunner;
pub use embedded::embedded_model_path;
pub use error::ModelError;
pub use runner::{BatchLimits, ModelRunner, OverlappedSteps, PromptTokenLogprobs, SampledOutput};
