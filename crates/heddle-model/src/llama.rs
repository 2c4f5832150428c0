//! The Llama-family transformer (Llama, Mistral, SmolLM, Qwen2) on the CPU.
//!
//! One forward pass takes a flat batch: the new tokens of many sequences (prefill chunks
//! and single decode tokens alike) are stacked into one `[tokens, hidden]` activation, so
//! each weight matrix is read once per layer for the whole batch. RoPE uses each token's
//! own position, K and V go to the paged cache, and attention runs per sequence over its
//! cached positions through its block table.
//!
//! Every row is computed independently of the others (per-row norms, per-row activation
//! quantization, per-element matmuls, per-(token, head) attention), so a sequence's results
//! do not depend on what else is in the batch.

use std::cell::RefCell;
use std::path::Path;

use candle_core::quantized::gguf_file;
use heddle_core::kv::BlockId;
use heddle_core::TokenId;
use rayon::prelude::*;

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvDtype};
use crate::loader::{self, OpenedModel, RopeLayout, TensorSource};
use crate::weights::{forward_all, Input, Linear, QuantizedRows, WeightFormat, QK};

/// Below this many query·key products per layer, attention stays on the calling thread.
const PAR_MIN_ATTENTION: usize = 1 << 14;

struct Layer {
    attn_norm: Vec<f32>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A loaded model: weights and shape. Immutable while it runs; the KV cache and the
/// scratch buffers of a forward pass are passed in.
pub struct Llama {
    config: ModelConfig,
    rope_layout: RopeLayout,
    /// RoPE frequency of each rotated pair, scaling applied.
    inv_freq: Vec<f64>,
    /// The token embeddings; rows are dequantized one at a time for the lookup.
    embed: Linear,
    /// None when the output head is the embedding table, which then multiplies in its
    /// own format (Q8_0 in the embedded model) against quantized activations, like every
    /// other matmul: a quarter of the bytes of an f32 copy (decoding one sequence is
    /// bound by memory bandwidth), the integer kernels, and llama.cpp's arithmetic.
    head: Option<Linear>,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    /// Some weight multiplies quantized activations.
    quantized: bool,
}

/// Which of a sequence's new tokens get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    None,
    /// The last token only: what sampling needs.
    Last,
    /// Every token: teacher forcing and scoring.
    All,
}

/// One sequence's share of a forward pass.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub tokens: &'a [TokenId],
    /// Position of `tokens[0]`; positions before it are already in the cache.
    pub start_position: usize,
    /// The sequence's KV blocks, covering at least `start_position + tokens.len()`.
    pub block_table: &'a [BlockId],
    pub logits: Logits,
}

/// Buffers of a forward pass, kept between steps so steady decoding allocates nothing.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    xq: QuantizedRows,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    tmp: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    logits: Vec<f32>,
    /// cos then sin of each token's rotation angles: `[tokens, head_dim]`.
    rope: Vec<f32>,
    positions: Vec<usize>,
    token_seq: Vec<usize>,
    logit_rows: Vec<usize>,
}

impl Scratch {
    /// Frees the logits buffer. After a step that computed every position's logits (prompt
    /// scoring: a chunk's rows × the vocabulary, 100 MB for 512 rows of 49,152) it is far
    /// larger than ordinary steps need, and would otherwise stay allocated.
    pub fn release_logits(&mut self) {
        self.logits = Vec::new();
    }
}

/// Scores this far below a row's maximum get a soft-max weight of exactly 0 instead of
/// e^-60 ≈ 9e-27 or less. Together such weights move the row's sum, which holds the
/// maximum's weight of 1, by far less than f32's rounding; skipping their exponentials
/// and keeping their tiny products out of the weighted sums of values took 10–20% off
/// attention at batch 16 (in a trained model the first positions draw most of the
/// attention, leaving many scores 60–90 below the maximum).
const NEGLIGIBLE_SCORE: f32 = -60.0;

/// How many blocks ahead of the one it converts an attention task prefetches its
/// context: a block of 16 positions converts in about as long as one trip to memory.
const CONTEXT_PREFETCH_BLOCKS: usize = 4;

/// Per-thread scratch of one attention task, reused across calls.
#[derive(Default)]
struct AttentionScratch {
    /// The query heads' scores, then one block's raw scores and partial sums.
    scores: Vec<f32>,
    /// The task's context converted from the f16 cache, in the cache's block layouts.
    keys: Vec<f32>,
    values: Vec<f32>,
}

thread_local! {
    static ATTENTION_SCRATCH: RefCell<AttentionScratch> = RefCell::new(AttentionScratch::default());
}

fn resize(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

/// Defines `fn $name` whose body is compiled twice, as is and for AVX2 + FMA, and runs
/// the AVX2 build when the CPU has it: plain loops over slices then become 8-wide, and
/// `mul_add` a single instruction (baseline x86-64 has neither).
macro_rules! with_avx2 {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// y = x / rms(x) · w per row, as ggml: the squares (rounded to f32) summed in f64, then
/// x times the inverse root, then times the weight. ggml sums in one running f64 total; a
/// chain of dependent f64 additions took 1 µs a row here, 13% of a 128-token prefill,
/// so the sum runs in 8 interleaved f64 lanes, which the compiler keeps in vectors. The
/// two orders differ by about 1e-16 of the sum; on f32's scale that changes nothing but
/// the rare sum within that distance of an f32 rounding boundary.
#[inline(always)]
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let mut lanes = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in lanes.iter_mut().zip(c) {
            *a += (v * v) as f64;
        }
    }
    for (a, &v) in lanes.iter_mut().zip(chunks.remainder()) {
        *a += (v * v) as f64;
    }
    let sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
        + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    let scale = 1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = (x * scale) * w;
    }
}

with_avx2! {
    /// [`rms_norm_row`] over every row of `x` (rows as long as `w`).
    fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
        let h = w.len();
        for (x, y) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
            rms_norm_row(x, w, eps, y);
        }
    }
}

with_avx2! {
    /// The residual connection: x += d.
    fn add_assign(x: &mut [f32], d: &[f32]) {
        for (x, d) in x.iter_mut().zip(d) {
            *x += d;
        }
    }
}

with_avx2! {
    /// gate = SiLU(gate) · up, SiLU as ggml: x / (1 + e^-x).
    fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

/// e^x in a form the compiler vectorizes (libm's `expf` is a call per value, 7% of a
/// decode step): x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor series to r⁷
/// (truncation error below 7e-9 relative), 2^n written into the exponent bits. Within
/// 2 ulp of the exact value (tested); inputs are clamped to [−87.3, 88], so very negative
/// ones give about 1e-38 rather than 0 and NaN stays NaN.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split (Cephes's) so that n · LN2_HI is exact for the n that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.0);
    // Round x·log2(e) to an integer n; its value also sits in the low bits of `shifted`.
    let shifted = x.mul_add(LOG2E, MAGIC);
    let n = shifted - MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p: f32 = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    let bits = (shifted.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23;
    p * f32::from_bits(bits as u32)
}

/// Folds `v` with `f` in 16 interleaved lanes, then the lanes pairwise: a fixed order
/// (unlike one running value) that the compiler can keep in vector registers.
#[inline(always)]
fn lanes(v: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a = f(*a, x);
    }
    let mut width = 16;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] = f(acc[i], acc[i + width]);
        }
    }
    acc[0]
}

/// One query head's scores against a block of keys stored transposed (`head_dim × BS`):
/// a dimension at a time, that query value times the dimension's keys across the slots,
/// so the work runs in whole vectors with no horizontal sums. Four partial sums (over
/// dimensions mod 4) keep four independent chains of fused multiply-adds in flight.
#[inline(always)]
fn block_scores_fixed<const BS: usize>(q: &[f32], keys: &[f32], out: &mut [f32]) {
    let mut acc = [[0f32; BS]; 4];
    let mut qs = q.chunks_exact(4);
    let mut ks = keys.chunks_exact(4 * BS);
    for (q4, k4) in (&mut qs).zip(&mut ks) {
        for (p, acc) in acc.iter_mut().enumerate() {
            let kd = &k4[p * BS..(p + 1) * BS];
            for (a, &k) in acc.iter_mut().zip(kd) {
                *a = q4[p].mul_add(k, *a);
            }
        }
    }
    for (&qd, kd) in qs.remainder().iter().zip(ks.remainder().chunks_exact(BS)) {
        for (a, &k) in acc[0].iter_mut().zip(kd) {
            *a = qd.mul_add(k, *a);
        }
    }
    for (s, o) in out[..BS].iter_mut().enumerate() {
        *o = (acc[0][s] + acc[1][s]) + (acc[2][s] + acc[3][s]);
    }
}

/// [`block_scores_fixed`] for any block size, with the same arithmetic (so every block
/// size gives the same scores); `acc` is scratch for the 4 partial sums of
/// `out.len()` slots.
#[inline(always)]
fn block_scores_any(q: &[f32], keys: &[f32], acc: &mut [f32], out: &mut [f32]) {
    let bs = out.len();
    acc.fill(0.0);
    let mut qs = q.chunks_exact(4);
    let mut ks = keys.chunks_exact(4 * bs);
    for (q4, k4) in (&mut qs).zip(&mut ks) {
        for (p, acc) in acc.chunks_exact_mut(bs).enumerate() {
            for (a, &k) in acc.iter_mut().zip(&k4[p * bs..(p + 1) * bs]) {
                *a = q4[p].mul_add(k, *a);
            }
        }
    }
    for (&qd, kd) in qs.remainder().iter().zip(ks.remainder().chunks_exact(bs)) {
        for (a, &k) in acc[..bs].iter_mut().zip(kd) {
            *a = qd.mul_add(k, *a);
        }
    }
    for (s, o) in out.iter_mut().enumerate() {
        *o = (acc[s] + acc[bs + s]) + (acc[2 * bs + s] + acc[3 * bs + s]);
    }
}

/// One query group's attention: the query heads that share KV head `kv_head`, for one
/// token whose context is the first `n_ctx` positions of its sequence.
struct AttentionTask<'a> {
    cache: &'a KvCache,
    layer: usize,
    kv_head: usize,
    head_dim: usize,
    /// The blocks holding positions 0..n_ctx.
    table: &'a [BlockId],
    n_ctx: usize,
    /// The group's query heads, one after the other.
    q: &'a [f32],
}

impl AttentionTask<'_> {
    /// Writes the group's outputs (laid out like `q`).
    fn run(&self, scratch: &mut AttentionScratch, out: &mut [f32]) {
        self.convert_context(scratch);
        let AttentionScratch {
            scores,
            keys,
            values,
        } = scratch;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features.
                return unsafe { self.run_avx512(scores, keys, values, out) };
            }
            // SAFETY: the CPU has the features.
            return unsafe { self.run_avx2(scores, keys, values, out) };
        }
        self.run_generic(scores, keys, values, out, false)
    }

    /// Reads the context's keys and values out of the cache as f32, whole blocks in the
    /// cache's layouts, so the loops below read each converted value from L1/L2
    /// however many query heads and dimension slices pass over it.
    fn convert_context(&self, scratch: &mut AttentionScratch) {
        let block_len = self.cache.block_size() * self.head_dim;
        let len = self.table.len() * block_len;
        resize(&mut scratch.keys, len);
        resize(&mut scratch.values, len);
        let (layer, head) = (self.layer, self.kv_head);
        for &block in &self.table[..self.table.len().min(CONTEXT_PREFETCH_BLOCKS)] {
            self.cache.prefetch(layer, block, head);
        }
        for (bi, &block) in self.table.iter().enumerate() {
            if let Some(&ahead) = self.table.get(bi + CONTEXT_PREFETCH_BLOCKS) {
                self.cache.prefetch(layer, ahead, head);
            }
            let at = bi * block_len..(bi + 1) * block_len;
            self.cache
                .read_keys(layer, block, head, &mut scratch.keys[at.clone()]);
            self.cache
                .read_values(layer, block, head, &mut scratch.values[at]);
        }
    }

    /// Compiled for AVX-512: the score and soft-max loops become 16-wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(
        &self,
        scores: &mut Vec<f32>,
        keys: &[f32],
        values: &[f32],
        out: &mut [f32],
    ) {
        self.run_generic(scores, keys, values, out, true)
    }

    /// The same code compiled for AVX2 and FMA: the loops below become 8-wide fused
    /// multiply-adds (baseline x86-64 has neither).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(
        &self,
        scores: &mut Vec<f32>,
        keys: &[f32],
        values: &[f32],
        out: &mut [f32],
    ) {
        self.run_generic(scores, keys, values, out, true)
    }

    /// Scores are scaled by 1/√d and soft-maxed in f32; the weighted sums of values are
    /// divided by the totals at the end. `keys` and `values` are the converted context;
    /// `avx2`: the caller has checked for AVX2 and FMA.
    #[inline(always)]
    fn run_generic(
        &self,
        scores: &mut Vec<f32>,
        keys: &[f32],
        values: &[f32],
        out: &mut [f32],
        avx2: bool,
    ) {
        let hd = self.head_dim;
        let heads = self.q.len() / hd;
        let n = self.n_ctx;
        let bs = self.cache.block_size();
        let scale = 1.0 / (hd as f32).sqrt();
        // Each head's n scores, one block's raw scores, partial sums for odd block sizes.
        scores.resize(heads * n + 5 * bs, 0.0);
        let (scores, rest) = scores.split_at_mut(heads * n);
        let (block_scores, partials) = rest.split_at_mut(bs);
        for (bi, keys) in keys.chunks_exact(bs * hd).enumerate() {
            let start = bi * bs;
            let len = bs.min(n - start);
            for (h, qh) in self.q.chunks_exact(hd).enumerate() {
                // The usual block sizes get fixed-size accumulators held in registers.
                match bs {
                    16 => block_scores_fixed::<16>(qh, keys, block_scores),
                    32 => block_scores_fixed::<32>(qh, keys, block_scores),
                    _ => block_scores_any(qh, keys, partials, block_scores),
                }
                for (s, &b) in scores[h * n + start..][..len]
                    .iter_mut()
                    .zip(block_scores.iter())
                {
                    *s = b * scale;
                }
            }
        }
        for (row, oh) in scores.chunks_exact_mut(n).zip(out.chunks_exact_mut(hd)) {
            let max = lanes(row, f32::NEG_INFINITY, f32::max);
            for s in row.iter_mut() {
                let d = *s - max;
                *s = if d < NEGLIGIBLE_SCORE { 0.0 } else { exp(d) };
            }
            let inv = 1.0 / lanes(row, 0.0, |a, b| a + b);
            // The head's dimensions in slices of 32 (then 16, then single ones), each
            // summed over all positions in registers.
            let mut off = 0;
            while off < hd {
                let width = match hd - off {
                    32.. => 32,
                    16.. => 16,
                    _ => 1,
                };
                let slice = &mut oh[off..off + width];
                match width {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the caller checked the features.
                    32 if avx2 => unsafe {
                        self.weighted_values_avx2(values, row, off, inv, slice)
                    },
                    32 => self.weighted_values::<32>(values, row, off, inv, slice),
                    16 => self.weighted_values::<16>(values, row, off, inv, slice),
                    _ => self.weighted_values::<1>(values, row, off, inv, slice),
                }
                off += width;
            }
        }
    }

    /// [`Self::weighted_values`] for 32 dimensions with AVX2 intrinsics: LLVM keeps the
    /// generic version's accumulator arrays in memory, a store-to-load round trip per
    /// position. Same sums in the same order: partial sums over even and odd slots.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_values_avx2(
        &self,
        values: &[f32],
        w: &[f32],
        off: usize,
        inv: f32,
        out: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let hd = self.head_dim;
        let bs = self.cache.block_size();
        let mut even = [_mm256_setzero_ps(); 4];
        let mut odd = [_mm256_setzero_ps(); 4];
        for (bi, values) in values.chunks_exact(bs * hd).enumerate() {
            let start = bi * bs;
            let len = bs.min(self.n_ctx - start);
            let ws = &w[start..start + len];
            let mut pairs = ws.chunks_exact(2);
            for (p, w2) in (&mut pairs).enumerate() {
                let v0 = values[2 * p * hd + off..][..32].as_ptr();
                let v1 = values[(2 * p + 1) * hd + off..][..32].as_ptr();
                let (w0, w1) = (_mm256_set1_ps(w2[0]), _mm256_set1_ps(w2[1]));
                for i in 0..4 {
                    // SAFETY: v0 and v1 point at 32 floats.
                    let (a, b) = unsafe {
                        (
                            _mm256_loadu_ps(v0.add(8 * i)),
                            _mm256_loadu_ps(v1.add(8 * i)),
                        )
                    };
                    even[i] = _mm256_fmadd_ps(w0, a, even[i]);
                    odd[i] = _mm256_fmadd_ps(w1, b, odd[i]);
                }
            }
            if let [wl] = pairs.remainder() {
                let v = values[(len - 1) * hd + off..][..32].as_ptr();
                let wl = _mm256_set1_ps(*wl);
                for (i, even) in even.iter_mut().enumerate() {
                    // SAFETY: v points at 32 floats.
                    *even = _mm256_fmadd_ps(wl, unsafe { _mm256_loadu_ps(v.add(8 * i)) }, *even);
                }
            }
        }
        let inv = _mm256_set1_ps(inv);
        for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
            let sum = _mm256_mul_ps(_mm256_add_ps(even[i], odd[i]), inv);
            // SAFETY: `chunk` holds 8 floats.
            unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), sum) };
        }
    }

    /// `out = inv · Σ_j w[j] · V[j][off..off + W]` over the context's positions, in two
    /// partial sums (even and odd slots of each block) for two chains in flight. With an
    /// even block size these are the even and odd positions, whatever the size, so the
    /// block size changes no result.
    #[inline(always)]
    fn weighted_values<const W: usize>(
        &self,
        values: &[f32],
        w: &[f32],
        off: usize,
        inv: f32,
        out: &mut [f32],
    ) {
        let hd = self.head_dim;
        let bs = self.cache.block_size();
        let mut even = [0f32; W];
        let mut odd = [0f32; W];
        for (bi, values) in values.chunks_exact(bs * hd).enumerate() {
            let start = bi * bs;
            let len = bs.min(self.n_ctx - start);
            let ws = &w[start..start + len];
            let mut pairs = ws.chunks_exact(2);
            for (p, w2) in (&mut pairs).enumerate() {
                let v0 = &values[2 * p * hd + off..][..W];
                let v1 = &values[(2 * p + 1) * hd + off..][..W];
                for l in 0..W {
                    even[l] = w2[0].mul_add(v0[l], even[l]);
                    odd[l] = w2[1].mul_add(v1[l], odd[l]);
                }
            }
            if let [wl] = pairs.remainder() {
                let v = &values[(len - 1) * hd + off..][..W];
                for l in 0..W {
                    even[l] = wl.mul_add(v[l], even[l]);
                }
            }
        }
        for l in 0..W {
            out[l] = (even[l] + odd[l]) * inv;
        }
    }
}

fn add_bias(x: &mut [f32], bias: &Option<Vec<f32>>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (x, b) in row.iter_mut().zip(b) {
                *x += b;
            }
        }
    }
}

impl Llama {
    /// Loads a GGUF file or an HF checkpoint (see [`loader::open`]); also returns the GGUF
    /// header, whose metadata holds the tokenizer and chat template.
    pub fn load(path: &Path) -> Result<(Self, Option<gguf_file::Content>)> {
        let opened = loader::open(path)?;
        let OpenedModel {
            config,
            rope_layout,
            mut tensors,
            gguf,
        } = opened;
        let model = Self::from_tensors(config, rope_layout, tensors.as_mut())?;
        Ok((model, gguf))
    }

    /// Builds the model from tensors addressed by GGUF names, checking every shape.
    pub fn from_tensors(
        config: ModelConfig,
        rope_layout: RopeLayout,
        src: &mut dyn TensorSource,
    ) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (qd, kvd) = (c.num_heads * hd, c.num_kv_heads * hd);
        let matrix = |src: &mut dyn TensorSource, name: &str, n: usize, k: usize| {
            let m = src.matrix(name)?;
            if (m.out_features(), m.in_features()) != (n, k) {
                return Err(ModelError::BadShape {
                    name: name.to_string(),
                    expected: vec![n, k],
                    actual: vec![m.out_features(), m.in_features()],
                });
            }
            Ok(m)
        };
        let vector = |src: &mut dyn TensorSource, name: &str, n: usize| {
            let v = src.vector(name)?;
            if v.len() != n {
                return Err(ModelError::BadShape {
                    name: name.to_string(),
                    expected: vec![n],
                    actual: vec![v.len()],
                });
            }
            Ok(v)
        };
        let embed = matrix(src, "token_embd.weight", c.vocab_size, h)?;
        let head = if c.tie_word_embeddings {
            None
        } else {
            Some(matrix(src, "output.weight", c.vocab_size, h)?)
        };
        let final_norm = vector(src, "output_norm.weight", h)?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let name = |part: &str| format!("blk.{i}.{part}");
            let bias = |src: &mut dyn TensorSource, part: &str, n: usize| {
                c.attention_bias
                    .then(|| vector(src, &name(part), n))
                    .transpose()
            };
            layers.push(Layer {
                attn_norm: vector(src, &name("attn_norm.weight"), h)?,
                q: matrix(src, &name("attn_q.weight"), qd, h)?,
                k: matrix(src, &name("attn_k.weight"), kvd, h)?,
                v: matrix(src, &name("attn_v.weight"), kvd, h)?,
                o: matrix(src, &name("attn_output.weight"), h, qd)?,
                q_bias: bias(src, "attn_q.bias", qd)?,
                k_bias: bias(src, "attn_k.bias", kvd)?,
                v_bias: bias(src, "attn_v.bias", kvd)?,
                ffn_norm: vector(src, &name("ffn_norm.weight"), h)?,
                gate: matrix(src, &name("ffn_gate.weight"), c.intermediate_size, h)?,
                up: matrix(src, &name("ffn_up.weight"), c.intermediate_size, h)?,
                down: matrix(src, &name("ffn_down.weight"), h, c.intermediate_size)?,
            });
        }
        // llama.cpp stores Llama 3.1's frequency scaling as per-pair divisors.
        let freq_factors = if src.contains("rope_freqs.weight") {
            Some(vector(src, "rope_freqs.weight", hd / 2)?)
        } else {
            None
        };
        let inv_freq = rope_frequencies(c, freq_factors.as_deref());
        let mut model = Llama {
            config,
            rope_layout,
            inv_freq,
            embed,
            head,
            final_norm,
            layers,
            quantized: false,
        };
        let quantized = model.matrices().any(Linear::wants_quantized_input);
        model.quantized = quantized;
        let formats = model.matrix_formats();
        let count = |f: WeightFormat| formats.iter().filter(|&&g| g == f).count();
        tracing::info!(
            nibbles = count(WeightFormat::Nibbles),
            q8_halves = count(WeightFormat::Q8Halves),
            q6_k = count(WeightFormat::Q6K),
            q8_0 = count(WeightFormat::Q8_0),
            f32 = count(WeightFormat::F32),
            megabytes = model.weight_bytes() / 1_000_000,
            "weight matrices by kernel format"
        );
        Ok(model)
    }

    /// Every weight matrix: the embeddings, the output head if it has its own, then each
    /// layer's.
    fn matrices(&self) -> impl Iterator<Item = &Linear> {
        std::iter::once(&self.embed)
            .chain(self.head.as_ref())
            .chain(
                self.layers
                    .iter()
                    .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]),
            )
    }

    /// Bytes of memory the weight matrices take in their kernel formats: what a decode
    /// step streams (the embeddings only where they are also the output head).
    pub fn weight_bytes(&self) -> usize {
        self.matrices().map(Linear::bytes).sum()
    }

    /// The format each weight matrix multiplies in, in [`Llama::matrices`] order: a file
    /// whose quantizations all have native kernels shows no [`WeightFormat::F32`].
    pub fn matrix_formats(&self) -> Vec<WeightFormat> {
        self.matrices().map(Linear::format).collect()
    }

    /// The model with every weight dequantized to f32, so activations are never rounded
    /// to 8 bits: the exact function of the stored weights in f32 arithmetic, for
    /// checking heddle's forward pass against an exact reference. Quantized weights take
    /// 4 bytes each this way, and products run on the f32 kernels.
    pub fn with_f32_weights(mut self) -> Self {
        self.embed = self.embed.dequantized();
        self.head = self.head.as_ref().map(Linear::dequantized);
        for l in &mut self.layers {
            for m in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                *m = m.dequantized();
            }
        }
        self.quantized = false;
        self
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn check(&self, seqs: &[SeqInput], cache: &KvCache) -> Result<()> {
        let bs = cache.block_size();
        for (i, s) in seqs.iter().enumerate() {
            let bad = |why: String| Err(ModelError::InvalidBatch(format!("sequence {i}: {why}")));
            if s.tokens.is_empty() {
                return bad("no tokens".into());
            }
            let end = s.start_position + s.tokens.len();
            if end > self.config.max_position_embeddings {
                return bad(format!(
                    "position {} is past the context length {}",
                    end - 1,
                    self.config.max_position_embeddings
                ));
            }
            let needed = end.div_ceil(bs);
            if s.block_table.len() < needed {
                return bad(format!(
                    "{end} positions need {needed} blocks of {bs}, the block table has {}",
                    s.block_table.len()
                ));
            }
            if let Some(b) = s.block_table[..needed]
                .iter()
                .find(|&&b| b as usize >= cache.num_blocks())
            {
                return bad(format!(
                    "block {b} is beyond the cache's {} blocks",
                    cache.num_blocks()
                ));
            }
            if let Some(t) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return bad(format!(
                    "token {t} is outside the vocabulary of {}",
                    self.config.vocab_size
                ));
            }
        }
        Ok(())
    }

    /// Runs the new tokens of `seqs` through the model, writing their K/V into `cache`, and
    /// returns the logits requested by each sequence's [`Logits`], in order, as rows of
    /// `vocab_size`.
    pub fn forward<'s>(
        &self,
        seqs: &[SeqInput],
        cache: &mut KvCache,
        scratch: &'s mut Scratch,
    ) -> Result<&'s mut [f32]> {
        self.check(seqs, cache)?;
        let c = &self.config;
        let (h, hd, nh, nkv) = (c.hidden_size, c.head_dim, c.num_heads, c.num_kv_heads);
        let (qd, kvd, ffn) = (nh * hd, nkv * hd, c.intermediate_size);
        let bs = cache.block_size();
        let Scratch {
            x,
            xn,
            xq,
            q,
            k,
            v,
            attn,
            tmp,
            gate,
            up,
            logits,
            rope,
            positions,
            token_seq,
            logit_rows,
        } = scratch;

        positions.clear();
        token_seq.clear();
        logit_rows.clear();
        for (si, s) in seqs.iter().enumerate() {
            let first = positions.len();
            positions.extend(s.start_position..s.start_position + s.tokens.len());
            token_seq.extend(std::iter::repeat_n(si, s.tokens.len()));
            match s.logits {
                Logits::None => {}
                Logits::Last => logit_rows.push(positions.len() - 1),
                Logits::All => logit_rows.extend(first..positions.len()),
            }
        }
        let t = positions.len();

        resize(x, t * h);
        for (row, &tok) in x
            .chunks_exact_mut(h)
            .zip(seqs.iter().flat_map(|s| s.tokens))
        {
            self.embed.row(tok as usize, row);
        }
        resize(rope, t * hd);
        let half = hd / 2;
        for (cs, &pos) in rope.chunks_exact_mut(hd).zip(positions.iter()) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (pos as f64 * f).sin_cos();
                cs[i] = cos as f32;
                cs[half + i] = sin as f32;
            }
        }

        for x in [&mut *xn, &mut *tmp] {
            resize(x, t * h);
        }
        for x in [&mut *q, &mut *attn] {
            resize(x, t * qd);
        }
        for x in [&mut *k, &mut *v] {
            resize(x, t * kvd);
        }
        for x in [&mut *gate, &mut *up] {
            resize(x, t * ffn);
        }
        let quantized = self.quantized;
        let quantize = |xq: &mut QuantizedRows, x: &[f32], rows: usize| {
            if quantized && (x.len() / rows.max(1)).is_multiple_of(QK) {
                xq.quantize(x, rows);
                true
            } else {
                false
            }
        };

        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(x, &layer.attn_norm, c.rms_norm_eps, xn);
            let has_q = quantize(xq, xn, t);
            let input = Input {
                x: xn,
                rows: t,
                q: has_q.then_some(&*xq),
            };
            forward_all(&mut [(&layer.q, q), (&layer.k, k), (&layer.v, v)], &input);
            add_bias(q, &layer.q_bias);
            add_bias(k, &layer.k_bias);
            add_bias(v, &layer.v_bias);
            self.apply_rope(q, nh, rope);
            self.apply_rope(k, nkv, rope);
            for (i, &pos) in positions.iter().enumerate() {
                let block = seqs[token_seq[i]].block_table[pos / bs];
                cache.write(
                    l,
                    block,
                    pos % bs,
                    &k[i * kvd..][..kvd],
                    &v[i * kvd..][..kvd],
                );
            }
            self.attention(l, cache, q, attn, positions, token_seq, seqs);

            let has_q = quantize(xq, attn, t);
            let input = Input {
                x: attn,
                rows: t,
                q: has_q.then_some(&*xq),
            };
            layer.o.forward(&input, tmp);
            add_assign(x, tmp);

            rms_norm(x, &layer.ffn_norm, c.rms_norm_eps, xn);
            let has_q = quantize(xq, xn, t);
            let input = Input {
                x: xn,
                rows: t,
                q: has_q.then_some(&*xq),
            };
            forward_all(&mut [(&layer.gate, gate), (&layer.up, up)], &input);
            silu_mul(gate, up);
            let has_q = quantize(xq, gate, t);
            let input = Input {
                x: gate,
                rows: t,
                q: has_q.then_some(&*xq),
            };
            layer.down.forward(&input, tmp);
            add_assign(x, tmp);
        }

        // Only the rows that are sampled or scored go through the final norm and the head.
        let rows = logit_rows.len();
        resize(xn, rows * h);
        for (&r, y) in logit_rows.iter().zip(xn.chunks_exact_mut(h)) {
            rms_norm_row(&x[r * h..][..h], &self.final_norm, c.rms_norm_eps, y);
        }
        resize(logits, rows * c.vocab_size);
        if rows > 0 {
            let has_q = quantize(xq, xn, rows);
            let input = Input {
                x: xn,
                rows,
                q: has_q.then_some(&*xq),
            };
            self.head
                .as_ref()
                .unwrap_or(&self.embed)
                .forward(&input, logits);
        }
        Ok(&mut logits[..])
    }

    /// Rotates each head of each token row by its position's angles.
    fn apply_rope(&self, x: &mut [f32], heads: usize, rope: &[f32]) {
        let hd = self.config.head_dim;
        let half = hd / 2;
        for (row, cs) in x.chunks_exact_mut(heads * hd).zip(rope.chunks_exact(hd)) {
            let (cos, sin) = cs.split_at(half);
            for head in row.chunks_exact_mut(hd) {
                match self.rope_layout {
                    RopeLayout::Interleaved => {
                        for i in 0..half {
                            let (a, b) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = a * cos[i] - b * sin[i];
                            head[2 * i + 1] = a * sin[i] + b * cos[i];
                        }
                    }
                    RopeLayout::Halves => {
                        for i in 0..half {
                            let (a, b) = (head[i], head[i + half]);
                            head[i] = a * cos[i] - b * sin[i];
                            head[i + half] = a * sin[i] + b * cos[i];
                        }
                    }
                }
            }
        }
    }

    /// Causal attention of every new token over its own sequence's cached positions
    /// `0..=position`, one task per (token, KV head) covering the query heads that share
    /// that KV head.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        cache: &KvCache,
        q: &[f32],
        out: &mut [f32],
        positions: &[usize],
        token_seq: &[usize],
        seqs: &[SeqInput],
    ) {
        let c = &self.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let group = nh / nkv;
        let bs = cache.block_size();
        let task = |idx: usize, out: &mut [f32]| {
            let (t, g) = (idx / nkv, idx % nkv);
            let n_ctx = positions[t] + 1;
            let task = AttentionTask {
                cache,
                layer,
                kv_head: g,
                head_dim: hd,
                table: &seqs[token_seq[t]].block_table[..n_ctx.div_ceil(bs)],
                n_ctx,
                q: &q[(t * nh + g * group) * hd..][..group * hd],
            };
            ATTENTION_SCRATCH.with_borrow_mut(|scratch| task.run(scratch, out));
        };
        let work: usize = positions.iter().map(|p| p + 1).sum::<usize>() * nh * hd;
        // With one thread in the pool, handing the work to it only adds a wake-up.
        if work < PAR_MIN_ATTENTION || rayon::current_num_threads() == 1 {
            out.chunks_exact_mut(group * hd)
                .enumerate()
                .for_each(|(i, o)| task(i, o));
        } else {
            out.par_chunks_exact_mut(group * hd)
                .enumerate()
                .for_each(|(i, o)| task(i, o));
        }
    }

    /// Logits at every position of `tokens`, computed from scratch with a private cache of
    /// `kv` elements: the teacher-forcing path for tests and scoring.
    pub fn forward_all_logits(&self, tokens: &[TokenId], kv: KvDtype) -> Result<Vec<Vec<f32>>> {
        const BLOCK: usize = 16;
        let blocks = tokens.len().div_ceil(BLOCK).max(1);
        let mut cache = KvCache::new(&self.config, blocks, BLOCK, kv)?;
        let table: Vec<BlockId> = (0..blocks as BlockId).collect();
        let seq = SeqInput {
            tokens,
            start_position: 0,
            block_table: &table,
            logits: Logits::All,
        };
        let mut scratch = Scratch::default();
        let logits = self.forward(&[seq], &mut cache, &mut scratch)?;
        Ok(logits
            .chunks_exact(self.config.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Each rotated pair's frequency, theta^(-2i/d), with the model's scaling applied.
pub fn rope_frequencies(c: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f64> {
    let d = c.head_dim as f64;
    (0..c.head_dim / 2)
        .map(|i| {
            let mut f = (c.rope_theta as f64).powf(-2.0 * i as f64 / d);
            match c.rope_scaling {
                None => {}
                Some(RopeScaling::Linear { factor }) => f /= factor as f64,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => {
                    let (factor, low, high) = (
                        factor as f64,
                        low_freq_factor as f64,
                        high_freq_factor as f64,
                    );
                    let old = original_max_position_embeddings as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > old / low {
                        f /= factor;
                    } else if wavelen >= old / high {
                        let smooth = (old / wavelen - low) / (high - low);
                        f = (1.0 - smooth) * f / factor + smooth * f;
                    }
                }
            }
            if let Some(factors) = freq_factors {
                f /= factors[i] as f64;
            }
            f
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in -87_299..=87_999 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
        }
        // 2 ulp of f32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.3e-38 && exp(-1000.0) > 0.0);
        assert!(exp(f32::NAN).is_nan());
    }
}
