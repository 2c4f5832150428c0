//! heddle-model: tensors and weights behind the [`runner::ModelRunner`] trait.
//! Knows nothing of HTTP; the scheduling decisions come from `heddle-core`.

pub mod chat_template;
pub mod config;
pub mod cpu_runner;
pub mod detokenizer;
pub mod embedded;
pub mod error;
pub mod grammar;
pub mod kv_cache;
pub mod llama;
pub mod loaded;
pub mod loader;
pub mod logits_processing;
pub mod membw;
pub mod runner;
pub mod sampling;
pub mod stop_strings;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use cpu_runner::CpuRunner;
pub use embedded::embedded_model_path;
pub use error::ModelError;
pub use loaded::{load_cpu, KvSize, LoadedModel};
pub use runner::{ModelRunner, PromptTokenLogprobs, SampledOutput};
