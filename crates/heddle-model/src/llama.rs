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

use std::path::Path;

use candle_core::quantized::gguf_file;
use heddle_core::kv::BlockId;
use heddle_core::TokenId;
use rayon::prelude::*;

use crate::attention::attention;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvDtype};
use crate::loader::{self, OpenedModel, RopeLayout, TensorSource};
use crate::math::exp;
use crate::qmatmul::{forward_all, Input, Linear, QuantizedRows, WeightFormat, QK};
use crate::rope::Rope;
use crate::runner::BatchLimits;

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
    rope: Rope,
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
    /// The batch's tokens, one after the other.
    tokens: Vec<TokenId>,
}

impl Scratch {
    /// Frees the logits buffer. After a step that computed every position's logits (prompt
    /// scoring: a chunk's rows × the vocabulary, 100 MB for 512 rows of 49,152) it is far
    /// larger than ordinary steps need, and would otherwise stay allocated.
    pub fn release_logits(&mut self) {
        self.logits = Vec::new();
    }
}

/// Rows from which the per-row work between the matrix products (the embedding, norms,
/// RoPE, SiLU, residual additions; activation quantization has its own) runs on the
/// pool: on the calling thread it took 17% of a 2,048-token prefill on two threads.
/// Decode-sized batches keep it there, where a fork and join would cost more.
const PAR_MIN_ROWS: usize = 64;

/// Calls `f` on matching runs of whole rows of `a` (rows `la` long) and `b` (`lb`), on
/// the pool from [`PAR_MIN_ROWS`] rows. Each row's arithmetic is the same either way.
fn by_rows<T: Sync>(
    a: &mut [f32],
    la: usize,
    b: &[T],
    lb: usize,
    f: impl Fn(&mut [f32], &[T]) + Sync,
) {
    let rows = a.len() / la.max(1);
    if rows < PAR_MIN_ROWS || rayon::current_num_threads() == 1 {
        return f(a, b);
    }
    // Several runs per thread, as the matrix products cut theirs.
    let per = rows.div_ceil(rayon::current_num_threads() * 4);
    a.par_chunks_mut(per * la)
        .zip(b.par_chunks(per * lb))
        .for_each(|(a, b)| f(a, b));
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
        let rope = Rope::new(c, rope_layout, freq_factors.as_deref());
        let mut model = Llama {
            config,
            rope,
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
        let limits = BatchLimits::new(&self.config, cache.block_size(), cache.num_blocks());
        for (i, s) in seqs.iter().enumerate() {
            limits.check_sequence(i, s.tokens, s.start_position, s.block_table)?;
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
            tokens,
        } = scratch;

        positions.clear();
        token_seq.clear();
        logit_rows.clear();
        tokens.clear();
        for (si, s) in seqs.iter().enumerate() {
            let first = positions.len();
            positions.extend(s.start_position..s.start_position + s.tokens.len());
            token_seq.extend(std::iter::repeat_n(si, s.tokens.len()));
            tokens.extend_from_slice(s.tokens);
            match s.logits {
                Logits::None => {}
                Logits::Last => logit_rows.push(positions.len() - 1),
                Logits::All => logit_rows.extend(first..positions.len()),
            }
        }
        let t = positions.len();

        resize(x, t * h);
        by_rows(x, h, tokens, 1, |x, tokens| {
            for (row, &tok) in x.chunks_exact_mut(h).zip(tokens) {
                self.embed.row(tok as usize, row);
            }
        });
        self.rope.angles(positions, rope);

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

        let norm = |x: &[f32], w: &[f32], y: &mut [f32]| {
            by_rows(y, h, x, h, |y, x| rms_norm(x, w, c.rms_norm_eps, y))
        };
        let residual = |x: &mut [f32], d: &[f32]| by_rows(x, h, d, h, add_assign);
        for (l, layer) in self.layers.iter().enumerate() {
            norm(x, &layer.attn_norm, xn);
            let has_q = quantize(xq, xn, t);
            let input = Input::new(xn, t, has_q.then_some(&*xq));
            forward_all(&mut [(&layer.q, q), (&layer.k, k), (&layer.v, v)], &input);
            add_bias(q, &layer.q_bias);
            add_bias(k, &layer.k_bias);
            add_bias(v, &layer.v_bias);
            by_rows(q, qd, rope, hd, |q, rope| self.rope.rotate(q, nh, rope));
            by_rows(k, kvd, rope, hd, |k, rope| self.rope.rotate(k, nkv, rope));
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
            attention(c, l, cache, q, attn, positions, token_seq, seqs);

            let has_q = quantize(xq, attn, t);
            let input = Input::new(attn, t, has_q.then_some(&*xq));
            layer.o.forward(&input, tmp);
            residual(x, tmp);

            norm(x, &layer.ffn_norm, xn);
            let has_q = quantize(xq, xn, t);
            let input = Input::new(xn, t, has_q.then_some(&*xq));
            forward_all(&mut [(&layer.gate, gate), (&layer.up, up)], &input);
            by_rows(gate, ffn, up, ffn, silu_mul);
            let has_q = quantize(xq, gate, t);
            let input = Input::new(gate, t, has_q.then_some(&*xq));
            layer.down.forward(&input, tmp);
            residual(x, tmp);
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
            let input = Input::new(xn, rows, has_q.then_some(&*xq));
            self.head
                .as_ref()
                .unwrap_or(&self.embed)
                .forward(&input, logits);
        }
        Ok(&mut logits[..])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_on_the_pool_match_rows_on_one_thread() {
        let (rows, h) = (PAR_MIN_ROWS + 5, 24);
        let x: Vec<f32> = (0..rows * h).map(|i| (i % 17) as f32 - 8.0).collect();
        let w: Vec<f32> = (0..h).map(|i| 0.5 + i as f32 / 10.0).collect();
        let mut alone = vec![0f32; rows * h];
        rms_norm(&x, &w, 1e-5, &mut alone);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut pooled = vec![0f32; rows * h];
        let mut calls = std::sync::atomic::AtomicUsize::new(0);
        pool.install(|| {
            by_rows(&mut pooled, h, &x, h, |y, x| {
                calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                rms_norm(x, &w, 1e-5, y)
            })
        });
        assert_eq!(pooled, alone);
        assert!(*calls.get_mut() > 1, "the rows were split");
    }
}
