//! Reading model files: GGUF (quantized, llama.cpp's format) and Hugging Face safetensors
//! with `config.json`. Both are served to the model builder through [`TensorSource`],
//! which addresses tensors by their GGUF names.

pub mod fp8_scales;
mod gguf;
mod safetensors;

use std::path::{Path, PathBuf};

pub use candle_core::quantized::gguf_file::Content as GgufContent;
pub use gguf::{gguf_rope_layout, open_tensors, read_gguf, GgufTensors};
pub use safetensors::{hf_name, weight_files};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::qmatmul::Linear;

/// How a checkpoint lays out the two halves that RoPE rotates together.
///
/// llama.cpp's converter permutes Llama's Q and K rows so that its "normal" RoPE can
/// rotate adjacent pairs (2i, 2i+1); HF checkpoints, and GGUF Qwen2, rotate dimension i
/// with i + head_dim/2. Attention only sees dot products of Q and K, which the same
/// permutation of both leaves unchanged, so each layout is used as stored, with the
/// matching rotation; the cached K simply lives in that layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs (2i, 2i + 1): GGUF Llama.
    Interleaved,
    /// Pairs (i, i + head_dim/2): HF checkpoints and GGUF Qwen2.
    Halves,
}

/// A model's tensors, by GGUF name (`token_embd.weight`, `blk.3.attn_q.weight`, ...).
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;
    /// A 2-D weight of shape [out, in].
    fn matrix(&mut self, name: &str) -> Result<Linear>;
    /// A 1-D tensor (norm weights, biases) in f32.
    fn vector(&mut self, name: &str) -> Result<Vec<f32>>;
}

/// An opened model: its config, its tensors, and the GGUF header when it came from one
/// (the tokenizer and chat template live there).
pub struct OpenedModel {
    pub config: ModelConfig,
    pub rope_layout: RopeLayout,
    pub tensors: Box<dyn TensorSource>,
    pub gguf: Option<candle_core::quantized::gguf_file::Content>,
}

/// Opens a GGUF file, a directory holding `config.json` and safetensors (one file or
/// shards listed in `model.safetensors.index.json`), or one `.safetensors` file beside its
/// `config.json`.
pub fn open(path: &Path) -> Result<OpenedModel> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_dir() {
        return safetensors::open_dir(path);
    }
    if path.extension().is_some_and(|e| e == "safetensors") {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        return safetensors::open_files(&dir, vec![path.to_path_buf()]);
    }
    gguf::open(path)
}
