//! The paged KV cache: the keys and values of every layer, stored in fixed-size blocks.
//!
//! heddle-core's block pool decides which blocks a sequence owns; this cache only stores
//! data at the block indices it is told. Position `p` of a sequence lives in block
//! `block_table[p / block_size]`, slot `p % block_size`, so sequences sharing a prefix can
//! share its blocks.
//!
//! Storage is one plain `Vec<f32>` per layer for K and one for V. Keys are laid out
//! `[block][kv_head][head_dim][slot]`, transposed, so that a query's scores against a
//! block's slots are computed a dimension at a time across the slots, in whole vectors with
//! no horizontal sums; values are `[block][kv_head][slot][head_dim]`, so the weighted sum
//! adds whole value rows. f32 rather than f16 keeps the CPU path free of conversions;
//! memory is `2 × layers × kv_heads × head_dim × 4` bytes per token (46 KB for
//! SmolLM2-135M).

use heddle_core::kv::BlockId;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

#[derive(Debug)]
pub struct KvCache {
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(config: &ModelConfig, num_blocks: usize, block_size: usize) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(ModelError::Config(format!(
                "the KV cache needs at least one block of at least one slot \
                 (got {num_blocks} blocks of {block_size})"
            )));
        }
        let per_layer = num_blocks * block_size * config.num_kv_heads * config.head_dim;
        // Zeroed allocations are mapped lazily by the OS: unused blocks cost no memory.
        let layer = || vec![0f32; per_layer];
        Ok(KvCache {
            num_blocks,
            block_size,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            keys: (0..config.num_layers).map(|_| layer()).collect(),
            values: (0..config.num_layers).map(|_| layer()).collect(),
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Bytes of K and V storage.
    pub fn size_in_bytes(&self) -> usize {
        2 * self.keys.len()
            * self.num_blocks
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * 4
    }

    fn offset(&self, block: BlockId, head: usize, slot: usize) -> usize {
        ((block as usize * self.num_kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// Stores one token's keys and values (`num_kv_heads × head_dim` each) of `layer` at
    /// slot `slot` of block `block`.
    pub fn write(&mut self, layer: usize, block: BlockId, slot: usize, k: &[f32], v: &[f32]) {
        let (hd, bs) = (self.head_dim, self.block_size);
        for h in 0..self.num_kv_heads {
            let base = self.offset(block, h, 0);
            let keys = &mut self.keys[layer][base..base + bs * hd];
            for (d, &x) in k[h * hd..(h + 1) * hd].iter().enumerate() {
                keys[d * bs + slot] = x;
            }
            let at = self.offset(block, h, slot);
            self.values[layer][at..at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// The keys of KV head `head` in block `block` of `layer`, transposed:
    /// `head_dim × block_size`.
    pub fn keys(&self, layer: usize, block: BlockId, head: usize) -> &[f32] {
        let at = self.offset(block, head, 0);
        &self.keys[layer][at..at + self.block_size * self.head_dim]
    }

    /// The values of KV head `head` in block `block` of `layer`: `block_size × head_dim`.
    pub fn values(&self, layer: usize, block: BlockId, head: usize) -> &[f32] {
        let at = self.offset(block, head, 0);
        &self.values[layer][at..at + self.block_size * self.head_dim]
    }
}
