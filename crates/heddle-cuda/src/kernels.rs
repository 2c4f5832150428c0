//! The kernels' CUDA C source and the launch shapes that depend on the model's shape.
//!
//! The source is compiled by NVRTC when a runner starts, with the model's dimensions as
//! `#define`s: loops over head dimensions unroll, shared-memory tiles are sized exactly,
//! and one source serves bf16 and f32 (the f32 build is for checking against the CPU).

use heddle_model::ModelConfig;

/// The kernels, one CUDA C file; see its header for the defines it expects.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every kernel the runner launches, by its `extern "C"` name (the decode ones only where
/// [`KernelShape::has_decode_kernel`]).
pub const KERNEL_NAMES: [&str; 15] = [
    "init_random",
    "embed_gather",
    "take_pending_tokens",
    "add_into_f32",
    "add_into_bf16",
    "add_rmsnorm",
    "rope_kv_write",
    "attention",
    "attention_decode",
    "attention_merge",
    "silu_mul",
    "sample",
    "score_tokens",
    "absmax_bits",
    "quantize_fp8_tensor",
];

/// Kernels that exist only where [`KernelShape::has_decode_kernel`].
pub const DECODE_KERNELS: [&str; 2] = ["attention_decode", "attention_merge"];

/// The most ranges decode attention splits a context into.
pub const MAX_DECODE_SPLITS: usize = 16;

/// Into how many ranges decode attention splits each context so that `blocks` blocks
/// (tiles × KV-head groups) become about two per multiprocessor: one when the batch alone
/// fills the GPU.
pub fn decode_splits(blocks: usize, multiprocessors: usize) -> usize {
    (2 * multiprocessors)
        .div_ceil(blocks.max(1))
        .clamp(1, MAX_DECODE_SPLITS)
}

/// Threads of one FP8 quantization block (`QUANTIZE_THREADS`).
pub const QUANTIZE_THREADS: u32 = 256;

/// Threads of one sampling block (`SAMPLE_THREADS` in the source).
pub const SAMPLE_THREADS: u32 = 1024;
/// Threads of one attention block (`ATTN_THREADS`).
pub const ATTENTION_THREADS: u32 = 128;
/// The most `top_logprobs` the sampler returns per row (`MAX_TOP_LOGPROBS`).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Words `score_tokens` writes per scored token: its log-probability, then
/// `MAX_TOP_LOGPROBS` (id, log-probability) pairs (`SCORE_WORDS`).
pub const SCORE_WORDS: usize = 1 + 2 * MAX_TOP_LOGPROBS;

/// Element type of weights, activations and the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    Bf16,
    F32,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }
}

/// What the KV cache holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// The runner's dtype.
    #[default]
    Auto,
    /// FP8 E4M3 codes with scale 1 (values beyond ±448 saturate), widened to bf16 as the
    /// attention kernels load them: half the bytes of bf16 (`--kv-cache-dtype fp8`; bf16
    /// runners on compute capability 8.9+).
    Fp8,
}

/// The model dimensions the kernels are specialised for, and the attention tiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelShape {
    pub head_dim: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub block_size: usize,
    pub dtype: DType,
    pub kv_cache: KvCacheDtype,
}

impl KernelShape {
    pub fn new(config: &ModelConfig, block_size: usize, dtype: DType) -> anyhow::Result<Self> {
        let shape = KernelShape {
            head_dim: config.head_dim,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            block_size,
            dtype,
            kv_cache: KvCacheDtype::Auto,
        };
        anyhow::ensure!(
            matches!(shape.head_dim, 32 | 64 | 128),
            "the CUDA attention kernels handle head_dim 32, 64 or 128, not {}",
            shape.head_dim
        );
        anyhow::ensure!(block_size > 0, "block_size must be > 0");
        Ok(shape)
    }

    /// Bytes of one KV cache element.
    pub fn kv_element_bytes(&self) -> usize {
        match self.kv_cache {
            KvCacheDtype::Auto => self.dtype.size_in_bytes(),
            KvCacheDtype::Fp8 => 1,
        }
    }

    /// Query rows (token × query head) one attention block holds: in bf16, 16 per warp
    /// for the tensor-core kernel (the queries live in registers as mma fragments); in
    /// f32, what shared memory fits beside the key and value tiles.
    pub fn query_rows(&self) -> usize {
        match self.dtype {
            DType::Bf16 => 64,
            DType::F32 => 16,
        }
    }

    /// Query heads one attention block covers: the whole group sharing a KV head when it
    /// fits, else the largest divisor of the group that does.
    pub fn heads_per_block(&self) -> usize {
        let group = self.num_heads / self.num_kv_heads;
        (1..=group.min(self.query_rows()))
            .rev()
            .find(|d| group.is_multiple_of(*d))
            .unwrap_or(1)
    }

    /// Whether single-token tiles get the decode attention kernel: bf16 only (it multiplies
    /// on the tensor cores in bf16; the f32 build, kept for checking against the CPU at
    /// f32 precision, sends them to the general kernel), up to 8 heads per block (the
    /// rows of its m16 products that it uses).
    pub fn has_decode_kernel(&self) -> bool {
        self.dtype == DType::Bf16 && self.heads_per_block() <= 8
    }

    /// Consecutive tokens of one sequence per attention block.
    pub fn tokens_per_tile(&self) -> usize {
        (self.query_rows() / self.heads_per_block()).max(1)
    }

    /// The attention grid's second dimension: KV heads × head chunks.
    pub fn attention_grid_y(&self) -> usize {
        let group = self.num_heads / self.num_kv_heads;
        self.num_kv_heads * (group / self.heads_per_block())
    }

    /// f32 words of decode attention's partial results for `blocks` blocks split `splits`
    /// ways (`PARTIAL_STRIDE` per head).
    pub fn decode_partial_words(&self, blocks: usize, splits: usize) -> usize {
        blocks * splits * self.heads_per_block() * (self.head_dim + 2)
    }

    /// The full source NVRTC compiles: the shape's defines, then [`SOURCE`] and the
    /// peer-to-peer all-reduce's kernels ([`crate::peer_sums::SOURCE`]).
    pub fn source(&self) -> String {
        let mut defines = format!(
            "#define HEAD_DIM {}\n#define NUM_HEADS {}\n#define NUM_KV_HEADS {}\n\
             #define BLOCK_SIZE {}\n#define QROWS {}\n#define HEADS_PER_CTA {}\n",
            self.head_dim,
            self.num_heads,
            self.num_kv_heads,
            self.block_size,
            self.query_rows(),
            self.heads_per_block(),
        );
        if self.dtype == DType::Bf16 {
            defines.push_str("#define HEDDLE_BF16 1\n");
        }
        if self.kv_cache == KvCacheDtype::Fp8 {
            defines.push_str("#define HEDDLE_FP8_KV 1\n");
        }
        defines + SOURCE + crate::peer_sums::SOURCE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(heads: usize, kv: usize, head_dim: usize, dtype: DType) -> KernelShape {
        KernelShape {
            head_dim,
            num_heads: heads,
            num_kv_heads: kv,
            block_size: 16,
            dtype,
            kv_cache: KvCacheDtype::Auto,
        }
    }

    #[test]
    fn attention_tiles_cover_the_group_within_the_row_budget() {
        // Llama 3 8B: groups of 4 query heads, 16 tokens per tile in bf16.
        let s = shape(32, 8, 128, DType::Bf16);
        assert_eq!(
            (
                s.heads_per_block(),
                s.tokens_per_tile(),
                s.attention_grid_y()
            ),
            (4, 16, 8)
        );
        // Multi-head attention with one KV head: the group of 32 is split for f32.
        let s = shape(32, 1, 64, DType::F32);
        assert_eq!(
            (
                s.heads_per_block(),
                s.tokens_per_tile(),
                s.attention_grid_y()
            ),
            (16, 1, 2)
        );
        // A group of 3 (SmolLM2's shape) stays whole.
        let s = shape(9, 3, 64, DType::Bf16);
        assert_eq!((s.heads_per_block(), s.tokens_per_tile()), (3, 21));
        for s in [
            shape(32, 8, 128, DType::Bf16),
            shape(32, 1, 64, DType::F32),
            shape(14, 2, 64, DType::F32),
        ] {
            assert!(s.heads_per_block() * s.tokens_per_tile() <= s.query_rows());
            assert_eq!(s.query_rows() % 4, 0, "rows are shared by 4 warps");
        }
    }

    #[test]
    fn the_source_carries_the_shape_and_every_kernel() {
        let src = shape(32, 8, 128, DType::Bf16).source();
        assert!(src.starts_with("#define HEAD_DIM 128\n"));
        assert!(src.contains("#define HEDDLE_BF16 1"));
        assert!(!shape(32, 8, 128, DType::F32)
            .source()
            .contains("HEDDLE_BF16 1"));
        for name in KERNEL_NAMES {
            assert!(
                src.contains(&format!("void {name}(")) || src.contains(&format!("\n{name}(")),
                "{name} is not in the source"
            );
        }
        assert!(src.contains(&format!("#define SAMPLE_THREADS {SAMPLE_THREADS}")));
        assert!(src.contains(&format!("#define ATTN_THREADS {ATTENTION_THREADS}")));
        assert!(src.contains(&format!("#define MAX_TOP_LOGPROBS {MAX_TOP_LOGPROBS}")));
        assert!(src.contains("#define SCORE_WORDS (1 + 2 * MAX_TOP_LOGPROBS)"));
        assert!(src.contains(&format!("#define QUANTIZE_THREADS {QUANTIZE_THREADS}")));
    }

    #[test]
    fn decode_splits_fill_the_gpu_only_when_the_batch_does_not() {
        // One sequence of Llama 8B: 8 blocks on 132 multiprocessors → the maximum.
        assert_eq!(decode_splits(8, 132), MAX_DECODE_SPLITS);
        assert_eq!(decode_splits(64, 132), 5);
        // 256 sequences × 8 KV heads already fill it.
        assert_eq!(decode_splits(2048, 132), 1);
        assert_eq!(decode_splits(0, 132), MAX_DECODE_SPLITS);
    }

    #[test]
    fn unsupported_head_dims_are_refused() {
        let config = heddle_model::ModelConfig::from_hf_json(
            r#"{"model_type": "llama", "hidden_size": 80, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10}"#,
        )
        .unwrap();
        let err = KernelShape::new(&config, 16, DType::F32).unwrap_err();
        assert!(err.to_string().contains("head_dim"), "{err}");
    }
}
