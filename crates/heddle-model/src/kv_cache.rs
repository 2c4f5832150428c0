//! The paged KV cache: the keys and values of every layer, stored in fixed-size blocks.
//!
//! heddle-core's block pool decides which blocks a sequence owns; this cache only stores
//! data at the block indices it is told. Position `p` of a sequence lives in block
//! `block_table[p / block_size]`, slot `p % block_size`, so sequences sharing a prefix can
//! share its blocks.
//!
//! Storage is one plain `Vec<f16>` per layer for K and one for V. Keys are laid out
//! `[block][kv_head][head_dim][slot]`, transposed, so that a query's scores against a
//! block's slots are computed a dimension at a time across the slots, in whole vectors with
//! no horizontal sums; values are `[block][kv_head][slot][head_dim]`, so the weighted sum
//! adds whole value rows.
//!
//! Elements are f16 by default, as llama.cpp keeps its cache: decode attention at a batch
//! of 16 reads every sequence's whole cache once per layer, far more than fits in the
//! caches, so it is bound by memory traffic, and half the bytes is nearly half the time.
//! Attention reads a context's blocks out as f32 a block (every KV head) at a time,
//! converted with F16C, and then works in f32. f32 elements are kept for exact comparisons (an f16 cache
//! turns f32 rounding differences into f16 rounding differences, ~5e-4). Memory is
//! `2 × layers × kv_heads × head_dim × element bytes` per token (23 KB for SmolLM2-135M
//! in f16).

use half::f16;
use half::slice::HalfFloatSliceExt;
use heddle_core::kv::BlockId;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// The element type of the stored keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KvDtype {
    #[default]
    F16,
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

/// Per layer, one buffer of keys and one of values.
#[derive(Debug)]
enum Storage {
    F16 {
        keys: Vec<Vec<f16>>,
        values: Vec<Vec<f16>>,
    },
    F32 {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
}

#[derive(Debug)]
pub struct KvCache {
    num_blocks: usize,
    block_size: usize,
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    storage: Storage,
}

impl KvCache {
    pub fn new(
        config: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: KvDtype,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            return Err(ModelError::Config(format!(
                "the KV cache needs at least one block of at least one slot \
                 (got {num_blocks} blocks of {block_size})"
            )));
        }
        let per_layer = num_blocks * block_size * config.num_kv_heads * config.head_dim;
        // Zeroed allocations are mapped lazily by the OS: unused blocks cost no memory.
        fn layers<T: Clone>(n: usize, per_layer: usize, zero: T) -> Vec<Vec<T>> {
            (0..n).map(|_| vec![zero.clone(); per_layer]).collect()
        }
        let n = config.num_layers;
        let storage = match dtype {
            KvDtype::F16 => Storage::F16 {
                keys: layers(n, per_layer, f16::ZERO),
                values: layers(n, per_layer, f16::ZERO),
            },
            KvDtype::F32 => Storage::F32 {
                keys: layers(n, per_layer, 0f32),
                values: layers(n, per_layer, 0f32),
            },
        };
        Ok(KvCache {
            num_blocks,
            block_size,
            num_layers: n,
            num_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            storage,
        })
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn dtype(&self) -> KvDtype {
        match self.storage {
            Storage::F16 { .. } => KvDtype::F16,
            Storage::F32 { .. } => KvDtype::F32,
        }
    }

    /// Bytes of K and V storage.
    pub fn size_in_bytes(&self) -> usize {
        2 * self.num_layers
            * self.num_blocks
            * self.block_size
            * self.num_kv_heads
            * self.head_dim
            * self.dtype().bytes()
    }

    fn offset(&self, block: BlockId, head: usize, slot: usize) -> usize {
        ((block as usize * self.num_kv_heads + head) * self.block_size + slot) * self.head_dim
    }

    /// Stores one token's keys and values (`num_kv_heads × head_dim` each) of `layer` at
    /// slot `slot` of block `block` (f16: rounded to nearest).
    pub fn write(&mut self, layer: usize, block: BlockId, slot: usize, k: &[f32], v: &[f32]) {
        let (hd, bs) = (self.head_dim, self.block_size);
        for h in 0..self.num_kv_heads {
            let keys_at = self.offset(block, h, 0);
            let values_at = self.offset(block, h, slot);
            let (k, v) = (&k[h * hd..(h + 1) * hd], &v[h * hd..(h + 1) * hd]);
            match &mut self.storage {
                Storage::F16 { keys, values } => {
                    let keys = &mut keys[layer][keys_at..keys_at + bs * hd];
                    for (d, &x) in k.iter().enumerate() {
                        keys[d * bs + slot] = f16::from_f32(x);
                    }
                    values[layer][values_at..values_at + hd].convert_from_f32_slice(v);
                }
                Storage::F32 { keys, values } => {
                    let keys = &mut keys[layer][keys_at..keys_at + bs * hd];
                    for (d, &x) in k.iter().enumerate() {
                        keys[d * bs + slot] = x;
                    }
                    values[layer][values_at..values_at + hd].copy_from_slice(v);
                }
            }
        }
    }

    /// The elements of block `block` in one layer's buffer: every KV head's keys (or
    /// values), side by side.
    fn block_range(&self, block: BlockId) -> std::ops::Range<usize> {
        self.offset(block, 0, 0)..self.offset(block + 1, 0, 0)
    }

    /// Part `part` of `parts` of [`Self::block_range`], in whole cache lines.
    fn part_range(&self, block: BlockId, part: usize, parts: usize) -> std::ops::Range<usize> {
        let at = self.block_range(block);
        let line = 64 / self.dtype().bytes();
        let lines = at.len().div_ceil(line);
        let bound = |p: usize| (at.start + lines * p / parts * line).min(at.end);
        bound(part)..bound(part + 1)
    }

    /// Asks the CPU to bring part `part` of `parts` of the keys of every KV head in block
    /// `block` of `layer` into its caches. A sequence's blocks lie anywhere in the cache,
    /// and the hardware prefetchers do not follow them: attention that reads its context
    /// block after block without this waits for memory at each one.
    pub fn prefetch_keys(&self, layer: usize, block: BlockId, part: usize, parts: usize) {
        let at = self.part_range(block, part, parts);
        match &self.storage {
            Storage::F16 { keys, .. } => prefetch(&keys[layer][at]),
            Storage::F32 { keys, .. } => prefetch(&keys[layer][at]),
        }
    }

    /// [`Self::prefetch_keys`] for the values.
    pub fn prefetch_values(&self, layer: usize, block: BlockId, part: usize, parts: usize) {
        let at = self.part_range(block, part, parts);
        match &self.storage {
            Storage::F16 { values, .. } => prefetch(&values[layer][at]),
            Storage::F32 { values, .. } => prefetch(&values[layer][at]),
        }
    }

    /// Reads the keys of every KV head in block `block` of `layer` as f32, each head's
    /// transposed: `num_kv_heads × head_dim × block_size` into `out`.
    pub fn read_keys(&self, layer: usize, block: BlockId, out: &mut [f32]) {
        let at = self.block_range(block);
        match &self.storage {
            Storage::F16 { keys, .. } => widen(&keys[layer][at], out),
            Storage::F32 { keys, .. } => out.copy_from_slice(&keys[layer][at]),
        }
    }

    /// Reads the values of every KV head in block `block` of `layer` as f32:
    /// `num_kv_heads × block_size × head_dim` into `out`.
    pub fn read_values(&self, layer: usize, block: BlockId, out: &mut [f32]) {
        let at = self.block_range(block);
        match &self.storage {
            Storage::F16 { values, .. } => widen(&values[layer][at], out),
            Storage::F32 { values, .. } => out.copy_from_slice(&values[layer][at]),
        }
    }
}

/// Prefetches every cache line of `v` into L1 (nothing on other architectures).
fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = v.as_ptr() as *const i8;
        for offset in (0..std::mem::size_of_val(v)).step_by(64) {
            // SAFETY: a prefetch reads nothing and faults on no address; SSE is in the
            // x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// `out = src` as f32. The attention reads every context element through here, so it
/// runs 16 at a time with AVX-512 (8 with F16C): `half`'s slice conversion makes a call
/// per 8 elements and cost 12% of a 16-sequence decode step.
fn widen(src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512 F; the lengths are equal.
            return unsafe { widen_avx512(src, out) };
        }
        if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx")
        {
            // SAFETY: the CPU has F16C and AVX; the lengths are equal.
            return unsafe { widen_f16c(src, out) };
        }
    }
    for (o, x) in out.iter_mut().zip(src) {
        *o = x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn widen_avx512(src: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = src.chunks_exact(16).zip(out.chunks_exact_mut(16));
    for (s, o) in &mut chunks {
        // SAFETY: each chunk holds 16 elements.
        unsafe {
            let h = _mm256_loadu_si256(s.as_ptr() as *const __m256i);
            _mm512_storeu_ps(o.as_mut_ptr(), _mm512_cvtph_ps(h));
        }
    }
    let done = src.len() / 16 * 16;
    for (o, x) in out[done..].iter_mut().zip(&src[done..]) {
        *o = x.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn widen_f16c(src: &[f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = src.chunks_exact(8).zip(out.chunks_exact_mut(8));
    for (s, o) in &mut chunks {
        // SAFETY: each chunk holds 8 elements.
        unsafe {
            let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    let done = src.len() / 8 * 8;
    for (o, x) in out[done..].iter_mut().zip(&src[done..]) {
        *o = x.to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig {
            architecture: crate::config::Architecture::Llama,
            vocab_size: 8,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 2,
            num_heads: 2,
            num_kv_heads: 2,
            head_dim: 4,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            fp8_checkpoint: false,
        }
    }

    #[test]
    fn written_tokens_read_back_in_both_layouts_and_dtypes() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let mut cache = KvCache::new(&tiny(), 3, 2, dtype).unwrap();
            // Token at block 2, slot 1, layer 1: head h, dim d holds h·10 + d (+0.5 for V).
            let k: Vec<f32> = (0..8).map(|i| ((i / 4) * 10 + i % 4) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| x + 0.5).collect();
            cache.write(1, 2, 1, &k, &v);
            let mut keys = vec![f32::NAN; 16];
            let mut values = vec![f32::NAN; 16];
            cache.read_keys(1, 2, &mut keys);
            cache.read_values(1, 2, &mut values);
            // Per head, keys transposed (dim, slot) and values (slot, dim); slot 0 never
            // written.
            #[rustfmt::skip]
            let want_keys = [
                0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 3.0,
                0.0, 10.0, 0.0, 11.0, 0.0, 12.0, 0.0, 13.0,
            ];
            #[rustfmt::skip]
            let want_values = [
                0.0, 0.0, 0.0, 0.0, 0.5, 1.5, 2.5, 3.5,
                0.0, 0.0, 0.0, 0.0, 10.5, 11.5, 12.5, 13.5,
            ];
            assert_eq!(keys, want_keys, "{dtype:?}");
            assert_eq!(values, want_values, "{dtype:?}");
            assert_eq!(cache.size_in_bytes(), 2 * 2 * 3 * 2 * 2 * 4 * dtype.bytes());
        }
    }

    #[test]
    fn prefetch_parts_cover_a_block_in_whole_lines() {
        // A block of 2 heads × 4 dims × 16 slots: 128 elements, 4 lines of f16, 8 of f32.
        for (dtype, lines) in [(KvDtype::F16, 4usize), (KvDtype::F32, 8)] {
            let cache = KvCache::new(&tiny(), 3, 16, dtype).unwrap();
            let line = 64 / dtype.bytes();
            for parts in [1, 3, 4, 9] {
                let ranges: Vec<_> = (0..parts).map(|p| cache.part_range(1, p, parts)).collect();
                assert_eq!(ranges[0].start, 128, "{dtype:?}, {parts} parts");
                assert_eq!(ranges[parts - 1].end, 256, "{dtype:?}, {parts} parts");
                for pair in ranges.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                    assert_eq!(pair[0].end % line, 0);
                }
                let largest = ranges.iter().map(|r| r.len()).max().unwrap();
                assert_eq!(largest, lines.div_ceil(parts) * line);
            }
        }
    }

    #[test]
    fn widening_equals_the_scalar_conversion() {
        let src: Vec<f16> = (0..37)
            .map(|i| f16::from_f32((i as f32 - 18.0) * 0.37))
            .chain([
                f16::INFINITY,
                f16::NEG_INFINITY,
                f16::MIN_POSITIVE_SUBNORMAL,
            ])
            .collect();
        let mut out = vec![0f32; src.len()];
        widen(&src, &mut out);
        let want: Vec<f32> = src.iter().map(|x| x.to_f32()).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn f16_storage_rounds_to_nearest() {
        let mut cache = KvCache::new(&tiny(), 1, 1, KvDtype::F16).unwrap();
        let x = 1.0 + 1.0 / 3.0;
        cache.write(0, 0, 0, &[x; 8], &[x; 8]);
        let mut out = [0f32; 8];
        cache.read_values(0, 0, &mut out);
        assert_eq!(out[0], f16::from_f32(x).to_f32());
        assert!((out[0] - x).abs() <= x * 2f32.powi(-11));
    }
}
