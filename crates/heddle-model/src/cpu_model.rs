//! Everything the server needs of one model, loaded in one go: the runner with its KV
//! cache, the tokenizer and the chat template.

use std::path::Path;

use crate::config::ModelConfig;
use crate::cpu_runner::CpuRunner;
use crate::kv_cache::KvDtype;
use crate::llama::Llama;
use crate::tokenizer::TokenizerBundle;

/// How much KV cache to allocate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSize {
    /// Exactly this many blocks.
    Blocks(usize),
    /// As many blocks as fit in this many bytes.
    Bytes(usize),
}

/// A model ready to serve on CPU.
pub struct CpuModel {
    pub runner: CpuRunner,
    pub text: TokenizerBundle,
    pub num_blocks: usize,
    pub block_size: usize,
}

impl CpuModel {
    pub fn config(&self) -> &ModelConfig {
        self.runner.model().config()
    }
}

/// Bytes of K and V one block holds (f32 on CPU).
pub fn kv_bytes_per_block(config: &ModelConfig, block_size: usize) -> usize {
    2 * config.num_layers
        * config.num_kv_heads
        * config.head_dim
        * KvDtype::default().bytes()
        * block_size
}

/// Loads a GGUF file or a Hugging Face model directory (config.json, safetensors,
/// tokenizer.json) for the CPU runner.
pub fn load_cpu(path: &Path, kv: KvSize, block_size: usize) -> anyhow::Result<CpuModel> {
    let started = std::time::Instant::now();
    tracing::info!(path = %path.display(), "loading model");
    let (model, gguf) = Llama::load(path)?;
    let text = match &gguf {
        Some(content) => TokenizerBundle::from_gguf(content)?,
        None => TokenizerBundle::from_hf_dir(path)?,
    };
    let num_blocks = match kv {
        KvSize::Blocks(n) => n,
        KvSize::Bytes(bytes) => bytes / kv_bytes_per_block(model.config(), block_size),
    };
    anyhow::ensure!(
        num_blocks > 0,
        "the KV cache budget holds no block of {block_size} tokens"
    );
    let runner = CpuRunner::new(model, num_blocks, block_size, KvDtype::default())?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        num_blocks,
        block_size,
        kv_mib = runner.kv_cache().size_in_bytes() >> 20,
        "model loaded"
    );
    Ok(CpuModel {
        runner,
        text,
        num_blocks,
        block_size,
    })
}
