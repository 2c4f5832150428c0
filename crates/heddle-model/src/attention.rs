//! Causal attention over the paged KV cache: each new token attends to its own
//! sequence's cached positions through the sequence's block table. One task per run of
//! up to [`TOKENS_PER_TASK`] consecutive tokens of one sequence. A one-token task (a
//! decode step) walks its context twice, a block at a time: first the keys, converting
//! one block of every KV head from the cache into an f32 buffer that stays in L1 and
//! scoring each query head against it; then, after the soft-max, the values, each block
//! added into every head's weighted sums. A longer run (a prefill) converts its context
//! once for all its tokens, then each token attends to its prefix of it. Both do the same
//! operations in the same order for each output, and each token's arithmetic depends on
//! nothing but its own query and context, so results do not depend on the batch or on how
//! tokens are grouped into tasks.

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

/// How many blocks ahead of the one it works on an attention task prefetches. It asks
/// for that block a part at a time, one part per query head of the block's first token,
/// not all at once: a block's 96 lines (6 KB of keys or values) requested together
/// filled the core's queue of outstanding misses, and the work on the current block
/// waited behind them. Spread out, the reads overlap that work: decode attention at batch
/// 16 took 30% less time (docs/PERFORMANCE.md, session 8). 2 and 4 blocks ahead did
/// equally well.
const CONTEXT_PREFETCH_BLOCKS: usize = 2;

/// Consecutive tokens of one sequence (a prefill) that share one conversion of their
/// context: a 128-token prompt converts 16 + 32 + … + 128 = 576 positions per KV head
/// instead of 1 + 2 + … + 128 = 8,256, and still makes 8 tasks to share among threads.
const TOKENS_PER_TASK: usize = 16;

/// Per-thread scratch of one attention task, reused across calls.
#[derive(Default)]
struct AttentionScratch {
    /// `[query head][position]`: one token's scores, then their soft-max weights.
    scores: Vec<f32>,
    /// Per row of `scores`, the inverse of its weights' total.
    inv: Vec<f32>,
    /// One block's keys or values of every KV head as f32, in the cache's layouts.
    block: Vec<f32>,
    /// One block's raw scores, then 4 partial sums per slot for block sizes other
    /// than 16 and 32.
    block_scores: Vec<f32>,
    /// `[query head][even, odd][head_dim]`: one token's weighted sums of values over the
    /// even and the odd slots of each block.
    sums: Vec<f32>,
    /// A run of tokens' whole context, converted block after block in the cache's
    /// layouts.
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
    let row = config.num_heads * config.head_dim;
    let bs = cache.block_size();
    assert_eq!(out.len(), positions.len() * row);
    assert_eq!(q.len(), out.len());
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
        let rows = tokens.start * row..tokens.end * row;
        let task = ContextTask {
            config,
            cache,
            layer,
            table: context_of(tokens),
            // The next task (most often the next one this thread runs) starts on its
            // first blocks from memory instead of waiting for them.
            next: tasks.get(i + 1).map_or(&[], context_of),
            positions: &positions[tokens.clone()],
            q: &q[rows.clone()],
        };
        ATTENTION_SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: these tokens' rows belong to this task alone.
            task.run(scratch, unsafe { shared.rows(rows.start, rows.len()) })
        });
    };
    let work: usize = positions.iter().map(|p| p + 1).sum::<usize>() * row;
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

/// One task: a run of consecutive tokens of one sequence, every query head.
struct ContextTask<'a> {
    config: &'a ModelConfig,
    cache: &'a KvCache,
    layer: usize,
    /// The blocks of the last token's context (the others' are a prefix of it).
    table: &'a [BlockId],
    /// The next task's blocks, prefetched as this one ends.
    next: &'a [BlockId],
    /// The tokens' positions, consecutive.
    positions: &'a [usize],
    /// The tokens' query heads: `[token][query head][head_dim]`.
    q: &'a [f32],
}

impl ContextTask<'_> {
    /// Writes the tokens' outputs (laid out like `q`).
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

    /// Asks for part `part` of `parts` of the context's `i`-th block ahead of its use, in
    /// the order the task reads them: the keys of every block, then their values, then
    /// the next task's keys.
    fn prefetch(&self, i: usize, part: usize, parts: usize) {
        let (cache, layer, n) = (self.cache, self.layer, self.table.len());
        if let Some(&block) = self.table.get(i) {
            cache.prefetch_keys(layer, block, part, parts);
        } else if let Some(&block) = self.table.get(i - n) {
            cache.prefetch_values(layer, block, part, parts);
        } else if let Some(&block) = self.next.get(i - 2 * n) {
            cache.prefetch_keys(layer, block, part, parts);
        }
    }

    /// Scores are scaled by 1/√d and soft-maxed in f32; the weighted sums of values are
    /// divided by the totals at the end. `avx2`: the caller has checked for AVX2 and FMA.
    #[inline(always)]
    fn run_generic(&self, scratch: &mut AttentionScratch, out: &mut [f32], avx2: bool) {
        let bs = self.cache.block_size();
        scratch.block_scores.resize(5 * bs, 0.0);
        if self.positions.len() == 1 {
            self.stream_context(scratch, out, avx2)
        } else {
            self.convert_context(scratch, out, avx2)
        }
    }

    /// One token (a decode step): its context read twice, a block at a time, so that the
    /// converted block stays in L1 and the reads of the blocks ahead overlap the work.
    #[inline(always)]
    fn stream_context(&self, scratch: &mut AttentionScratch, out: &mut [f32], avx2: bool) {
        let AttentionScratch {
            scores,
            inv,
            block,
            block_scores,
            sums,
            ..
        } = scratch;
        let c = self.config;
        let (hd, nh) = (c.head_dim, c.num_heads);
        let group = nh / c.num_kv_heads;
        let bs = self.cache.block_size();
        let head_block = bs * hd;
        let n = self.positions[0] + 1;
        let blocks = self.table.len();
        scores.resize(nh * n, 0.0);
        block.resize(c.num_kv_heads * head_block, 0.0);
        (0..CONTEXT_PREFETCH_BLOCKS).for_each(|i| self.prefetch(i, 0, 1));

        for (bi, &b) in self.table.iter().enumerate() {
            self.cache.read_keys(self.layer, b, block);
            let (start, len) = (bi * bs, bs.min(n - bi * bs));
            for (h, qh) in self.q.chunks_exact(hd).enumerate() {
                self.prefetch(bi + CONTEXT_PREFETCH_BLOCKS, h, nh);
                let keys = &block[h / group * head_block..][..head_block];
                let row = &mut scores[h * n + start..][..len];
                score_block(qh, keys, block_scores, row);
            }
        }
        soft_max_rows(scores, n, inv);

        sums.clear();
        sums.resize(nh * 2 * hd, 0.0);
        for (bi, &b) in self.table.iter().enumerate() {
            self.cache.read_values(self.layer, b, block);
            let (start, len) = (bi * bs, bs.min(n - bi * bs));
            for (h, sums) in sums.chunks_exact_mut(2 * hd).enumerate() {
                self.prefetch(blocks + bi + CONTEXT_PREFETCH_BLOCKS, h, nh);
                let values = &block[h / group * head_block..][..len * hd];
                let w = &scores[h * n + start..][..len];
                add_weighted_values([(values, w)], sums, avx2);
            }
        }
        finish(sums, inv, hd, out);
    }

    /// A run of tokens (a prefill): the context converted whole first, then each token's
    /// heads attend to their prefix of it, each head's weighted sums over every block in
    /// registers. The tokens share one conversion of the context; against it the block at
    /// a time of [`Self::stream_context`], which keeps every token's and head's scores and
    /// sums between blocks, ran a 16 × 128-token prefill's attention 10–30% slower.
    #[inline(always)]
    fn convert_context(&self, scratch: &mut AttentionScratch, out: &mut [f32], avx2: bool) {
        let AttentionScratch {
            scores,
            inv,
            block_scores,
            sums,
            keys,
            values,
            ..
        } = scratch;
        let c = self.config;
        let (hd, nh, nkv) = (c.head_dim, c.num_heads, c.num_kv_heads);
        let group = nh / nkv;
        let bs = self.cache.block_size();
        let (head_block, block_len) = (bs * hd, nkv * bs * hd);
        let blocks = self.table.len();
        keys.resize(blocks * block_len, 0.0);
        values.resize(blocks * block_len, 0.0);
        (0..CONTEXT_PREFETCH_BLOCKS).for_each(|i| {
            self.prefetch(i, 0, 1);
            self.prefetch(blocks + i, 0, 1);
        });
        for (bi, &b) in self.table.iter().enumerate() {
            self.prefetch(bi + CONTEXT_PREFETCH_BLOCKS, 0, 1);
            self.prefetch(blocks + bi + CONTEXT_PREFETCH_BLOCKS, 0, 1);
            let at = bi * block_len..(bi + 1) * block_len;
            self.cache.read_keys(self.layer, b, &mut keys[at.clone()]);
            self.cache.read_values(self.layer, b, &mut values[at]);
        }
        // The next task's first blocks, as the stream's last prefetches ask for them.
        (0..CONTEXT_PREFETCH_BLOCKS).for_each(|i| self.prefetch(2 * blocks + i, 0, 1));
        // Head g's part of block bi of the converted keys or values.
        let head_of = |v: &'_ [f32], bi: usize, g: usize| -> Range<usize> {
            let at = bi * block_len + g * head_block;
            debug_assert!(at + head_block <= v.len());
            at..at + head_block
        };

        for ((&p, q), out) in self
            .positions
            .iter()
            .zip(self.q.chunks_exact(nh * hd))
            .zip(out.chunks_exact_mut(nh * hd))
        {
            let n = p + 1;
            let used = n.div_ceil(bs);
            scores.resize(nh * n, 0.0);
            for (h, qh) in q.chunks_exact(hd).enumerate() {
                for bi in 0..used {
                    let (start, len) = (bi * bs, bs.min(n - bi * bs));
                    let row = &mut scores[h * n + start..][..len];
                    score_block(qh, &keys[head_of(keys, bi, h / group)], block_scores, row);
                }
            }
            soft_max_rows(scores, n, inv);
            sums.clear();
            sums.resize(nh * 2 * hd, 0.0);
            for (h, sums) in sums.chunks_exact_mut(2 * hd).enumerate() {
                let row = &scores[h * n..][..n];
                let blocks = (0..used).map(|bi| {
                    let (start, len) = (bi * bs, bs.min(n - bi * bs));
                    let v = &values[head_of(values, bi, h / group)];
                    (&v[..len * hd], &row[start..start + len])
                });
                add_weighted_values(blocks, sums, avx2);
            }
            finish(sums, inv, hd, out);
        }
    }
}

/// One query head's scores against a block of keys (`head_dim × block_size`, transposed),
/// scaled by 1/√d, into `row` (the block's first `row.len()` slots). `scratch`: one
/// block's raw scores, then 4 partial sums per slot.
#[inline(always)]
fn score_block(q: &[f32], keys: &[f32], scratch: &mut [f32], row: &mut [f32]) {
    let bs = keys.len() / q.len();
    let (raw, partials) = scratch.split_at_mut(bs);
    // The usual block sizes get fixed-size accumulators held in registers.
    match bs {
        16 => block_scores_fixed::<16>(q, keys, raw),
        32 => block_scores_fixed::<32>(q, keys, raw),
        _ => block_scores_any(q, keys, &mut partials[..4 * bs], raw),
    }
    let scale = 1.0 / (q.len() as f32).sqrt();
    for (s, &r) in row.iter_mut().zip(raw.iter()) {
        *s = r * scale;
    }
}

/// Each row of `n` scores into its soft-max weights, not yet divided by their total;
/// the totals' inverses into `inv`. A plain loop, not an iterator adapter: std's adapters
/// are compiled without the caller's target features, and `exp`'s fused multiply-adds
/// then become library calls.
#[inline(always)]
fn soft_max_rows(scores: &mut [f32], n: usize, inv: &mut Vec<f32>) {
    inv.clear();
    for row in scores.chunks_exact_mut(n) {
        let max = lanes(row, f32::NEG_INFINITY, f32::max);
        for s in row.iter_mut() {
            let d = *s - max;
            *s = if d < NEGLIGIBLE_SCORE { 0.0 } else { exp(d) };
        }
        inv.push(1.0 / lanes(row, 0.0, |a, b| a + b));
    }
}

/// Each head's output: its even and odd sums (`[head][even, odd][head_dim]`) added and
/// divided by its weights' total.
#[inline(always)]
fn finish(sums: &[f32], inv: &[f32], hd: usize, out: &mut [f32]) {
    for ((o, s), &inv) in out
        .chunks_exact_mut(hd)
        .zip(sums.chunks_exact(2 * hd))
        .zip(inv)
    {
        let (even, odd) = s.split_at(hd);
        for ((o, &e), &d) in o.iter_mut().zip(even).zip(odd) {
            *o = (e + d) * inv;
        }
    }
}

/// Adds blocks of values, weighted, into a head's sums (`[even, odd][head_dim]`):
/// `even += w[j]·V[j]` over each block's even slots j and `odd` likewise over its odd
/// ones, two chains of fused multiply-adds in flight, block after block in slot order.
/// With an even block size these are the even and odd positions, so the block size
/// changes no result. Each block: its values (`w.len() × head_dim`) and weights.
/// `avx2`: the caller has checked for AVX2 and FMA.
#[inline(always)]
fn add_weighted_values<'a>(
    blocks: impl IntoIterator<Item = (&'a [f32], &'a [f32])> + Clone,
    sums: &mut [f32],
    avx2: bool,
) {
    let hd = sums.len() / 2;
    let (even, odd) = sums.split_at_mut(hd);
    let mut off = 0;
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        while off + 32 <= hd {
            // SAFETY: the caller checked the features.
            unsafe {
                add_weighted_values_avx2(
                    blocks.clone(),
                    off,
                    &mut even[off..][..32],
                    &mut odd[off..][..32],
                )
            };
            off += 32;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = avx2;
    if off == hd {
        return;
    }
    let (even, odd) = (&mut even[off..], &mut odd[off..]);
    for (values, w) in blocks {
        let at = |j: usize| &values[j * hd + off..(j + 1) * hd];
        let mut pairs = w.chunks_exact(2);
        for (p, w2) in (&mut pairs).enumerate() {
            for (e, &v) in even.iter_mut().zip(at(2 * p)) {
                *e = w2[0].mul_add(v, *e);
            }
            for (o, &v) in odd.iter_mut().zip(at(2 * p + 1)) {
                *o = w2[1].mul_add(v, *o);
            }
        }
        if let [wl] = pairs.remainder() {
            for (e, &v) in even.iter_mut().zip(at(w.len() - 1)) {
                *e = wl.mul_add(v, *e);
            }
        }
    }
}

/// [`add_weighted_values`] for the 32 dimensions from `off` with AVX2 intrinsics, the
/// sums held in registers across all the blocks (LLVM keeps the generic loop's in
/// memory, a store-to-load round trip per position). The same operations in the same
/// order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn add_weighted_values_avx2<'a>(
    blocks: impl IntoIterator<Item = (&'a [f32], &'a [f32])>,
    off: usize,
    even: &mut [f32],
    odd: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(even.len() == 32 && odd.len() == 32);
    // SAFETY (all loads and stores): `even` and `odd` hold 32 floats, and every row of
    // a block's values holds `off + 32` or more (asserted per block).
    let load = |s: &[f32]| unsafe { [0, 8, 16, 24].map(|i| _mm256_loadu_ps(s.as_ptr().add(i))) };
    let (mut e, mut o) = (load(even), load(odd));
    for (values, w) in blocks {
        let hd = values.len() / w.len();
        assert!(off + 32 <= hd);
        let add = |sums: &mut [__m256; 4], w: f32, j: usize| {
            let w = _mm256_set1_ps(w);
            let v = values[j * hd + off..].as_ptr();
            for (i, sum) in sums.iter_mut().enumerate() {
                *sum = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(v.add(8 * i)) }, *sum);
            }
        };
        let mut pairs = w.chunks_exact(2);
        for (p, w2) in (&mut pairs).enumerate() {
            add(&mut e, w2[0], 2 * p);
            add(&mut o, w2[1], 2 * p + 1);
        }
        if let [wl] = pairs.remainder() {
            add(&mut e, *wl, w.len() - 1);
        }
    }
    for (i, (&e, &o)) in e.iter().zip(&o).enumerate() {
        unsafe {
            _mm256_storeu_ps(even.as_mut_ptr().add(8 * i), e);
            _mm256_storeu_ps(odd.as_mut_ptr().add(8 * i), o);
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
        // Odd and even block lengths; 72 dimensions: two slices of 32, then 8 generic.
        for len in [16usize, 5] {
            let hd = 72;
            let values: Vec<f32> = (0..len * hd)
                .map(|i| ((i * 7919) % 1013) as f32 / 500.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..len).map(|j| ((j * 31) % 17) as f32 / 17.0).collect();
            let start: Vec<f32> = (0..2 * hd).map(|i| (i % 7) as f32 - 3.0).collect();
            // The block once, and twice in a row as one call.
            for blocks in [1, 2] {
                let (mut generic, mut avx2) = (start.clone(), start.clone());
                let twice = vec![(&values[..], &w[..]); blocks];
                add_weighted_values(twice.clone(), &mut generic, false);
                add_weighted_values(twice, &mut avx2, true);
                assert_eq!(generic, avx2, "block length {len}, {blocks} blocks");
                assert_ne!(generic, start);
            }
        }
    }

    /// A sequence of 23 tokens in a scattered block table, at block sizes 5 and 16 and
    /// with an f16 and an f32 cache (the values are exact in f16): its tokens attended in
    /// one batch (tasks of 16 and 7 tokens) give exactly what each token gives alone, and
    /// both are within f32 rounding of attention computed in f64.
    #[test]
    fn attention_matches_a_reference_however_tokens_are_grouped() {
        use crate::kv_cache::KvDtype;
        // 4 query heads over 2 KV heads of 40 dimensions (an AVX2 slice of 32, then 8).
        let config = ModelConfig {
            architecture: crate::config::Architecture::Llama,
            vocab_size: 8,
            hidden_size: 160,
            intermediate_size: 8,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 40,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: false,
            fp8_checkpoint: false,
        };
        let (n, nh, nkv, hd) = (23, 4, 2, 40);
        let value = |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 255) as f32 / 64.0 - 2.0;
        let keys: Vec<f32> = (0..n * nkv * hd).map(|i| value(i, 1)).collect();
        let values: Vec<f32> = (0..n * nkv * hd).map(|i| value(i, 2)).collect();
        let q: Vec<f32> = (0..n * nh * hd).map(|i| value(i, 3) / 4.0).collect();
        for bs in [5, 16] {
            let blocks = n.div_ceil(bs);
            // Every other block from the end: never two neighbours in order.
            let table: Vec<BlockId> = (0..blocks as BlockId)
                .rev()
                .step_by(2)
                .chain((0..blocks as BlockId).rev().skip(1).step_by(2))
                .collect();
            for dtype in [KvDtype::F16, KvDtype::F32] {
                let mut cache = KvCache::new(&config, blocks, bs, dtype).unwrap();
                for p in 0..n {
                    let row = p * nkv * hd..(p + 1) * nkv * hd;
                    cache.write(1, table[p / bs], p % bs, &keys[row.clone()], &values[row]);
                }
                let seq = |tokens| SeqInput {
                    tokens,
                    start_position: 0,
                    block_table: &table,
                    logits: crate::llama::Logits::None,
                };
                let ids = vec![0; n];
                let positions: Vec<usize> = (0..n).collect();
                let mut batched = vec![0f32; n * nh * hd];
                attention(
                    &config,
                    1,
                    &cache,
                    &q,
                    &mut batched,
                    &positions,
                    &vec![0; n],
                    &[seq(&ids)],
                );
                for p in 0..n {
                    let row = p * nh * hd..(p + 1) * nh * hd;
                    let mut alone = vec![0f32; nh * hd];
                    attention(
                        &config,
                        1,
                        &cache,
                        &q[row.clone()],
                        &mut alone,
                        &[p],
                        &[0],
                        &[seq(&ids[..1])],
                    );
                    assert_eq!(
                        alone,
                        batched[row.clone()],
                        "block size {bs}, {dtype:?}, position {p}"
                    );
                    for h in 0..nh {
                        let g = h / (nh / nkv);
                        let qh = &q[(p * nh + h) * hd..][..hd];
                        let dot = |j: usize| {
                            (0..hd)
                                .map(|d| qh[d] as f64 * keys[(j * nkv + g) * hd + d] as f64)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        };
                        let max = (0..=p).map(dot).fold(f64::NEG_INFINITY, f64::max);
                        let w: Vec<f64> = (0..=p).map(|j| (dot(j) - max).exp()).collect();
                        let total: f64 = w.iter().sum();
                        for d in 0..hd {
                            let want = (0..=p)
                                .map(|j| w[j] * values[(j * nkv + g) * hd + d] as f64)
                                .sum::<f64>()
                                / total;
                            let got = alone[h * hd + d] as f64;
                            assert!((got - want).abs() < 1e-5, "block size {bs}, {dtype:?}, position {p}, head {h}, dim {d}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
