//! Causal attention over the paged KV cache: each new token attends to its own
//! sequence's cached positions through the sequence's block table. One task per run of
//! up to [`TOKENS_PER_TASK`] consecutive tokens of one sequence: the task reads the run's
//! context out of the cache once, every KV head of a block together, then for each KV
//! head each token's query heads that share it attend to their own prefix of it. Each token's arithmetic depends on nothing
//! but its own query and context, so results do not depend on the batch or on how tokens
//! are grouped into tasks.

use std::cell::RefCell;
use std::ops::Range;

use heddle_core::kv::BlockId;
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::llama::SeqInput;
use crate::math::{exp, lanes};

/// Below this many query·key products per layer, attention stays on the calling thread:
/// one sequence's decode step (74 K at context 128 on the embedded model, 3 tasks of a
/// few microseconds) does not pay for a fork and join; a batch of 16 (1.2 M) does.
const PAR_MIN_ATTENTION: usize = 1 << 18;

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

/// Consecutive tokens of one sequence (a prefill) that share one conversion of their
/// context: a 128-token prompt converts 16 + 32 + … + 128 = 576 positions per KV head
/// instead of 1 + 2 + … + 128 = 8,256, and still makes 8 tasks per KV head to share
/// among threads.
const TOKENS_PER_TASK: usize = 16;

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

/// The attention output shared by the tasks, which write disjoint rows of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32, usize);
// SAFETY: only `attention` writes through it, each task its own tokens' rows.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// No other live reference covers `at..at + len`.
    unsafe fn rows<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        assert!(at + len <= self.1);
        // SAFETY: in bounds (checked); exclusive by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// Causal attention of every new token over its own sequence's cached positions
/// `0..=position`, one task per run of a sequence's tokens.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    config: &ModelConfig,
    layer: usize,
    cache: &KvCache,
    q: &[f32],
    out: &mut [f32],
    positions: &[usize],
    token_seq: &[usize],
    seqs: &[SeqInput],
) {
    let c = config;
    let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
    let group = nh / nkv;
    let bs = cache.block_size();
    assert_eq!(out.len(), positions.len() * nh * hd);
    let shared = SharedOut(out.as_mut_ptr(), out.len());
    let tasks = tasks(token_seq);
    // The blocks holding the context of the last of `tokens`.
    let context_of = |tokens: &Range<usize>| {
        let last = tokens.end - 1;
        let n_ctx = positions[last] + 1;
        &seqs[token_seq[last]].block_table[..n_ctx.div_ceil(bs)]
    };
    let run = |i: usize| {
        let tokens = &tasks[i];
        let table = context_of(tokens);
        // The next task (most often the next one this thread runs) starts on its first
        // blocks from memory instead of waiting for them.
        if let Some(next) = tasks.get(i + 1) {
            for &block in table_prefix(context_of(next)) {
                (0..nkv).for_each(|g| cache.prefetch(layer, block, g));
            }
        }
        ATTENTION_SCRATCH.with_borrow_mut(|scratch| {
            let per_head = convert_context(cache, layer, nkv, hd, table, scratch);
            for g in 0..nkv {
                for t in tokens.clone() {
                    let n_ctx = positions[t] + 1;
                    let at = (t * nh + g * group) * hd;
                    let task = AttentionTask {
                        block_size: bs,
                        head_dim: hd,
                        n_ctx,
                        context: g * per_head..g * per_head + n_ctx.div_ceil(bs) * bs * hd,
                        q: &q[at..][..group * hd],
                    };
                    // SAFETY: token t's query heads belong to this task alone.
                    task.run(scratch, unsafe { shared.rows(at, group * hd) });
                }
            }
        });
    };
    let work: usize = positions.iter().map(|p| p + 1).sum::<usize>() * nh * hd;
    // With one thread in the pool, handing the work to it only adds a wake-up.
    if work < PAR_MIN_ATTENTION || rayon::current_num_threads() == 1 {
        (0..tasks.len()).for_each(run);
    } else {
        (0..tasks.len()).into_par_iter().for_each(run);
    }
}

/// The attention tasks of a batch whose token `t` belongs to sequence `token_seq[t]`:
/// runs of up to [`TOKENS_PER_TASK`] consecutive tokens of one sequence.
fn tasks(token_seq: &[usize]) -> Vec<Range<usize>> {
    let mut tasks = Vec::new();
    let mut start = 0;
    while start < token_seq.len() {
        let seq = token_seq[start];
        let run = token_seq[start..]
            .iter()
            .take(TOKENS_PER_TASK)
            .take_while(|&&s| s == seq)
            .count();
        tasks.push(start..start + run);
        start += run;
    }
    tasks
}

/// The blocks of `table` that a task prefetches before it starts converting.
fn table_prefix(table: &[BlockId]) -> &[BlockId] {
    &table[..table.len().min(CONTEXT_PREFETCH_BLOCKS)]
}

/// Reads the keys and values of every KV head in the blocks of `table` out of the cache
/// as f32, whole blocks in the cache's layouts, so the loops below read each converted
/// value from L1/L2 however many tokens, query heads and dimension slices pass over it.
/// Block by block, every head of a block in turn: the cache holds a block's heads side
/// by side, and reading them in that order ran 1.5–4.5× faster than one head's blocks
/// after another (docs/PERFORMANCE.md, session 7). Head g's context lands at
/// g·(returned length) in the scratch.
fn convert_context(
    cache: &KvCache,
    layer: usize,
    heads: usize,
    head_dim: usize,
    table: &[BlockId],
    scratch: &mut AttentionScratch,
) -> usize {
    let block_len = cache.block_size() * head_dim;
    let per_head = table.len() * block_len;
    scratch.keys.resize(heads * per_head, 0.0);
    scratch.values.resize(heads * per_head, 0.0);
    for &block in table_prefix(table) {
        (0..heads).for_each(|g| cache.prefetch(layer, block, g));
    }
    for (bi, &block) in table.iter().enumerate() {
        if let Some(&ahead) = table.get(bi + CONTEXT_PREFETCH_BLOCKS) {
            (0..heads).for_each(|g| cache.prefetch(layer, ahead, g));
        }
        for g in 0..heads {
            let at = g * per_head + bi * block_len..g * per_head + (bi + 1) * block_len;
            cache.read_keys(layer, block, g, &mut scratch.keys[at.clone()]);
            cache.read_values(layer, block, g, &mut scratch.values[at]);
        }
    }
    per_head
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

/// One query group's attention: the query heads that share one KV head, for one token
/// whose context is the first `n_ctx` positions of the converted context in the scratch.
struct AttentionTask<'a> {
    block_size: usize,
    head_dim: usize,
    n_ctx: usize,
    /// Where the converted context's blocks holding positions 0..n_ctx lie in the
    /// scratch.
    context: Range<usize>,
    /// The group's query heads, one after the other.
    q: &'a [f32],
}

impl AttentionTask<'_> {
    /// Writes the group's outputs (laid out like `q`).
    fn run(&self, scratch: &mut AttentionScratch, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has the features.
                return unsafe { self.run_avx512(scratch, out) };
            }
            // SAFETY: the CPU has the features.
            return unsafe { self.run_avx2(scratch, out) };
        }
        self.run_generic(scratch, out, false)
    }

    /// Compiled for AVX-512: the score and soft-max loops become 16-wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn run_avx512(&self, scratch: &mut AttentionScratch, out: &mut [f32]) {
        self.run_generic(scratch, out, true)
    }

    /// The same code compiled for AVX2 and FMA: the loops below become 8-wide fused
    /// multiply-adds (baseline x86-64 has neither).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, scratch: &mut AttentionScratch, out: &mut [f32]) {
        self.run_generic(scratch, out, true)
    }

    /// Scores are scaled by 1/√d and soft-maxed in f32; the weighted sums of values are
    /// divided by the totals at the end. `keys` and `values` are the converted context;
    /// `avx2`: the caller has checked for AVX2 and FMA.
    #[inline(always)]
    fn run_generic(&self, scratch: &mut AttentionScratch, out: &mut [f32], avx2: bool) {
        let AttentionScratch {
            scores,
            keys,
            values,
        } = scratch;
        let hd = self.head_dim;
        let heads = self.q.len() / hd;
        let n = self.n_ctx;
        let bs = self.block_size;
        let (keys, values) = (&keys[self.context.clone()], &values[self.context.clone()]);
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
        let mut sums = [[_mm256_setzero_ps(); 4]; 2];
        self.weighted_positions(values, w, off, 32, |slot, w, v| {
            let w = _mm256_set1_ps(w);
            for (i, sum) in sums[slot].iter_mut().enumerate() {
                // SAFETY: v holds 32 floats.
                *sum = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(v.as_ptr().add(8 * i)) }, *sum);
            }
        });
        let [even, odd] = sums;
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
        let mut sums = [[0f32; W]; 2];
        self.weighted_positions(values, w, off, W, |slot, w, v| {
            for (sum, &v) in sums[slot].iter_mut().zip(v) {
                *sum = w.mul_add(v, *sum);
            }
        });
        let [even, odd] = sums;
        for l in 0..W {
            out[l] = (even[l] + odd[l]) * inv;
        }
    }

    /// The order of the weighted sums of values: `add(slot, w[j], V[j][off..off + width])`
    /// for every position j of the context, block by block, slot 0 for even slots of a
    /// block and 1 for odd ones (each pair of slots together, for two chains in flight).
    #[inline(always)]
    fn weighted_positions(
        &self,
        values: &[f32],
        w: &[f32],
        off: usize,
        width: usize,
        mut add: impl FnMut(usize, f32, &[f32]),
    ) {
        let (hd, bs) = (self.head_dim, self.block_size);
        for (bi, values) in values.chunks_exact(bs * hd).enumerate() {
            let start = bi * bs;
            let len = bs.min(self.n_ctx - start);
            let at = |p: usize| &values[p * hd + off..][..width];
            let mut pairs = w[start..start + len].chunks_exact(2);
            for (p, w2) in (&mut pairs).enumerate() {
                add(0, w2[0], at(2 * p));
                add(1, w2[1], at(2 * p + 1));
            }
            if let [wl] = pairs.remainder() {
                add(0, *wl, at(len - 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_are_runs_of_one_sequence() {
        // Sequence 0 prefills 20 tokens, 1 and 2 decode one each, 3 prefills 3.
        let mut token_seq = vec![0; 20];
        token_seq.extend([1, 2, 3, 3, 3]);
        assert_eq!(tasks(&token_seq), [0..16, 16..20, 20..21, 21..22, 22..25]);
        assert!(tasks(&[]).is_empty());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_weighted_values_equal_the_generic_ones() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return;
        }
        // An odd last block (37 = 2·16 + 5) and an odd block size, both with remainders.
        for (bs, n_ctx) in [(16usize, 37usize), (5, 23)] {
            let hd = 64;
            let blocks = n_ctx.div_ceil(bs);
            let values: Vec<f32> = (0..blocks * bs * hd)
                .map(|i| ((i * 7919) % 1013) as f32 / 500.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..n_ctx).map(|j| ((j * 31) % 17) as f32 / 17.0).collect();
            let task = AttentionTask {
                block_size: bs,
                head_dim: hd,
                n_ctx,
                context: 0..blocks * bs * hd,
                q: &[],
            };
            for off in [0, 32] {
                let (mut generic, mut avx2) = ([0f32; 32], [0f32; 32]);
                task.weighted_values::<32>(&values, &w, off, 0.7, &mut generic);
                // SAFETY: the CPU has the features.
                unsafe { task.weighted_values_avx2(&values, &w, off, 0.7, &mut avx2) };
                assert_eq!(generic, avx2, "block size {bs}, offset {off}");
            }
        }
    }
}
