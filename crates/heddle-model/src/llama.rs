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
use crate::kv_cache::KvCache;
use crate::loader::{self, OpenedModel, RopeLayout, TensorSource};
use crate::weights::{Input, Linear, QuantizedRows, QK};

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

pub struct Llama {
    config: ModelConfig,
    rope_layout: RopeLayout,
    /// RoPE frequency of each rotated pair, scaling applied.
    inv_freq: Vec<f64>,
    embed: Linear,
    /// None when the output head is the embedding table.
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

thread_local! {
    /// Attention scores of one query, reused across calls on each thread.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn resize(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

/// y = x / rms(x) · w per row, as ggml: the mean square summed in f64, then x times the
/// inverse root, then times the weight.
fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let sum: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let scale = 1.0 / ((sum / x.len() as f64) as f32 + eps).sqrt();
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = (x * scale) * w;
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let h = w.len();
    for (x, y) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        rms_norm_row(x, w, eps, y);
    }
}

/// One query head's scores against a block of keys stored transposed (`head_dim × BS`):
/// a dimension at a time, that query value times the dimension's keys across the slots,
/// so the work runs in whole vectors with no horizontal sums.
#[inline(always)]
fn block_scores_fixed<const BS: usize>(q: &[f32], keys: &[f32], out: &mut [f32]) {
    let mut acc = [0f32; BS];
    for (&qd, kd) in q.iter().zip(keys.chunks_exact(BS)) {
        for (a, &k) in acc.iter_mut().zip(kd) {
            *a = qd.mul_add(k, *a);
        }
    }
    out[..BS].copy_from_slice(&acc);
}

/// [`block_scores_fixed`] for any block size (`out.len()` slots).
#[inline(always)]
fn block_scores_any(q: &[f32], keys: &[f32], out: &mut [f32]) {
    let bs = out.len();
    out.fill(0.0);
    for (&qd, kd) in q.iter().zip(keys.chunks_exact(bs)) {
        for (a, &k) in out.iter_mut().zip(kd) {
            *a = qd.mul_add(k, *a);
        }
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
    /// Writes the group's outputs (laid out like `q`). `scores` is scratch space.
    fn run(&self, scores: &mut Vec<f32>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features.
            return unsafe { self.run_avx2(scores, out) };
        }
        self.run_generic(scores, out)
    }

    /// The same code compiled for AVX2 and FMA: the loops below become 8-wide fused
    /// multiply-adds (baseline x86-64 has neither).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, scores: &mut Vec<f32>, out: &mut [f32]) {
        self.run_generic(scores, out)
    }

    /// Scores are scaled by 1/√d and soft-maxed in f32; each value row is read once for
    /// all the heads of the group, and the weighted sums are divided by the totals at
    /// the end.
    #[inline(always)]
    fn run_generic(&self, scores: &mut Vec<f32>, out: &mut [f32]) {
        let hd = self.head_dim;
        let heads = self.q.len() / hd;
        let n = self.n_ctx;
        let bs = self.cache.block_size();
        let scale = 1.0 / (hd as f32).sqrt();
        // Each head's n scores, each head's 1 / Σ exp, one block's raw scores.
        scores.resize(heads * (n + 1) + bs, 0.0);
        let (scores, rest) = scores.split_at_mut(heads * n);
        let (inv_sums, block_scores) = rest.split_at_mut(heads);
        for (bi, &block) in self.table.iter().enumerate() {
            let start = bi * bs;
            let len = bs.min(n - start);
            let keys = self.cache.keys(self.layer, block, self.kv_head);
            for (h, qh) in self.q.chunks_exact(hd).enumerate() {
                // The usual block sizes get fixed-size accumulators held in registers.
                match bs {
                    16 => block_scores_fixed::<16>(qh, keys, block_scores),
                    32 => block_scores_fixed::<32>(qh, keys, block_scores),
                    _ => block_scores_any(qh, keys, block_scores),
                }
                for (s, &b) in scores[h * n + start..][..len]
                    .iter_mut()
                    .zip(block_scores.iter())
                {
                    *s = b * scale;
                }
            }
        }
        for (row, inv_sum) in scores.chunks_exact_mut(n).zip(inv_sums.iter_mut()) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
            let mut sum = 0f32;
            for s in row.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            *inv_sum = 1.0 / sum;
        }
        out.fill(0.0);
        for (bi, &block) in self.table.iter().enumerate() {
            let start = bi * bs;
            let values = self.cache.values(self.layer, block, self.kv_head);
            for (j, value) in values.chunks_exact(hd).take(bs.min(n - start)).enumerate() {
                for (h, oh) in out.chunks_exact_mut(hd).enumerate() {
                    let w = scores[h * n + start + j];
                    for (o, &v) in oh.iter_mut().zip(value) {
                        *o = w.mul_add(v, *o);
                    }
                }
            }
        }
        for (oh, &inv) in out.chunks_exact_mut(hd).zip(inv_sums.iter()) {
            oh.iter_mut().for_each(|o| *o *= inv);
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
        let quantized = std::iter::once(&embed)
            .chain(head.as_ref())
            .chain(
                layers
                    .iter()
                    .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]),
            )
            .any(Linear::wants_quantized_input);
        Ok(Llama {
            config,
            rope_layout,
            inv_freq,
            embed,
            head,
            final_norm,
            layers,
            quantized,
        })
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
            layer.q.forward(&input, q);
            layer.k.forward(&input, k);
            layer.v.forward(&input, v);
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
            x.iter_mut().zip(tmp.iter()).for_each(|(x, d)| *x += d);

            rms_norm(x, &layer.ffn_norm, c.rms_norm_eps, xn);
            let has_q = quantize(xq, xn, t);
            let input = Input {
                x: xn,
                rows: t,
                q: has_q.then_some(&*xq),
            };
            layer.gate.forward(&input, gate);
            layer.up.forward(&input, up);
            for (g, &u) in gate.iter_mut().zip(up.iter()) {
                // SiLU as ggml: x / (1 + e^-x).
                *g = *g / (1.0 + (-*g).exp()) * u;
            }
            let has_q = quantize(xq, gate, t);
            let input = Input {
                x: gate,
                rows: t,
                q: has_q.then_some(&*xq),
            };
            layer.down.forward(&input, tmp);
            x.iter_mut().zip(tmp.iter()).for_each(|(x, d)| *x += d);
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
            SCORES.with_borrow_mut(|scores| task.run(scores, out));
        };
        let work: usize = positions.iter().map(|p| p + 1).sum::<usize>() * nh * hd;
        if work < PAR_MIN_ATTENTION {
            out.chunks_exact_mut(group * hd)
                .enumerate()
                .for_each(|(i, o)| task(i, o));
        } else {
            out.par_chunks_exact_mut(group * hd)
                .enumerate()
                .for_each(|(i, o)| task(i, o));
        }
    }

    /// Logits at every position of `tokens`, computed from scratch with a private cache:
    /// the teacher-forcing path for tests and scoring.
    pub fn forward_all_logits(&self, tokens: &[TokenId]) -> Result<Vec<Vec<f32>>> {
        const BLOCK: usize = 16;
        let blocks = tokens.len().div_ceil(BLOCK).max(1);
        let mut cache = KvCache::new(&self.config, blocks, BLOCK)?;
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
fn rope_frequencies(c: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f64> {
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
