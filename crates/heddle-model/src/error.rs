//! The errors of the model layer. Each names the file, tensor, key or value at fault, so
//! that a user who points heddle at the wrong file learns what is wrong without a debugger.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the embedded model is missing: {path} does not exist; run scripts/fetch-model.sh \
         (or set HEDDLE_MODEL_DIR to the folder that holds it)"
    )]
    EmbeddedModelMissing { path: PathBuf },
    #[error(
        "the embedded model at {path} is corrupt ({reason}); delete it and run \
         scripts/fetch-model.sh again"
    )]
    EmbeddedModelCorrupt { path: PathBuf, reason: String },
    #[error("unsupported model architecture {0:?}: heddle's CPU runner supports llama and qwen2")]
    UnsupportedArchitecture(String),
    #[error("invalid model config: {0}")]
    Config(String),
    #[error("tensor {0:?} is missing from the model weights")]
    MissingTensor(String),
    #[error("tensor {name:?} has unsupported type {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    BadShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    /// The logits adjustments of a step (grammar masks) could not be computed, or the
    /// runner cannot apply them.
    #[error("logits processing failed: {0}")]
    LogitsProcessing(String),
    /// A GPU runner's driver, kernel or library call failed.
    #[error("GPU error: {0}")]
    Device(String),
    #[error("tensor library error: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
