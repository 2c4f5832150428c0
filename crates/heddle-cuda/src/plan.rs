//! One step's metadata, packed on the host into a single buffer of i32 words so that it
//! reaches the GPU in one copy: token ids, positions, cache slots, attention tiles, block
//! tables, the rows that get logits, each sampled row's parameters and its penalty list,
//! and the prompt tokens scored for requests that ask for prompt log-probabilities.

use rustc_hash::FxHashMap;

use heddle_core::{
    RequestId, SamplingParams, ScheduledBatch, ScheduledSeq, SequenceTokens, TokenId,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Words per sampled row's parameters (`SP_FIELDS` in the kernel source).
pub const SAMPLE_FIELDS: usize = 15;
/// The word of a row's parameters that says its logits are adjusted (`SP_ADJUSTED`).
const SAMPLE_ADJUSTED: usize = 14;
/// The greedy flag's word (`SP_GREEDY`).
const SAMPLE_GREEDY: usize = 7;

/// Where each part starts in [`StepPlan::words`], in words.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offsets {
    pub tokens: usize,
    pub positions: usize,
    pub slots: usize,
    pub tiles: usize,
    pub block_tables: usize,
    pub table_offsets: usize,
    pub logit_rows: usize,
    pub sample_params: usize,
    pub penalties: usize,
    /// Per scored prompt token: the row (token index) whose logits predict it, the token,
    /// and how many top alternatives it asked for; three arrays of `scored.len()` words.
    pub score_rows: usize,
    pub score_targets: usize,
    pub score_tops: usize,
    /// Per pending token: its index among the step's tokens and the row of the step
    /// before that sampled it (pairs).
    pub pending: usize,
}

/// A sampled row: whose it is and what it asked for back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampledRow {
    pub id: RequestId,
    pub logprob: bool,
    pub top_logprobs: usize,
}

/// A prompt token whose log-probability the step computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoredToken {
    pub id: RequestId,
    /// Its position in the prompt (the row before it predicts it).
    pub position: usize,
    pub top_logprobs: usize,
}

/// Padding of a decode step to a fixed layout, so that a CUDA graph captured for that
/// layout replays with the step's own data: `rows` sequences (the real ones first, then
/// single-token stand-ins that write to the cache's scratch block) and block tables
/// padded to `block_capacity` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Padding {
    pub rows: usize,
    pub block_capacity: usize,
    pub scratch_block: u32,
}

/// The packed metadata of one step. Buffers are kept between steps.
#[derive(Debug, Default)]
pub struct StepPlan {
    pub words: Vec<i32>,
    pub offsets: Offsets,
    pub num_tokens: usize,
    /// Attention tiles for the general kernel, at `offsets.tiles`.
    pub num_tiles: usize,
    /// Single-token tiles for the decode kernel, right after the others.
    pub num_decode_tiles: usize,
    pub rows: Vec<SampledRow>,
    /// Rows the sampler computes: `rows.len()`, or the padded count.
    pub sampled_rows: usize,
    /// Penalty entries (token, count) over all rows.
    pub num_penalties: usize,
    /// The prompt tokens scored, in batch order.
    pub scored: Vec<ScoredToken>,
    /// Pending tokens, filled on the device from the step before's samples.
    pub num_pending: usize,
    /// Pending tokens whose sequence the step before did not sample.
    pub unmatched_pending: usize,
    tokens: Vec<i32>,
    positions: Vec<i32>,
    slots: Vec<i32>,
    tiles: Vec<i32>,
    decode_tiles: Vec<i32>,
    block_tables: Vec<i32>,
    table_offsets: Vec<i32>,
    logit_rows: Vec<i32>,
    sample_params: Vec<i32>,
    penalties: Vec<i32>,
    score_rows: Vec<i32>,
    score_targets: Vec<i32>,
    score_tops: Vec<i32>,
    pending: Vec<i32>,
}

/// The uniform number in [0, 1) a sampled row draws with, from the same generator as the
/// CPU sampler: ChaCha8 seeded with the request's seed, on stream `num_generated`. A
/// request without a seed gets a fresh one per token.
pub fn draw_uniform(params: &SamplingParams, num_generated: usize) -> f64 {
    let seed = params.seed.unwrap_or_else(|| rand::rng().random());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(num_generated as u64);
    rng.random::<f64>()
}

/// The penalty entries of one row as the CPU sampler applies them: every distinct token
/// the penalties touch (the whole history for the repetition penalty, else the output),
/// with its number of occurrences in the output.
pub fn penalty_entries(
    params: &SamplingParams,
    history: &[TokenId],
    prompt_len: usize,
    vocab_size: usize,
    out: &mut Vec<i32>,
) {
    if !params.has_penalties() {
        return;
    }
    let output = &history[prompt_len.min(history.len())..];
    let mut touched: Vec<TokenId> = if params.repetition_penalty != 1.0 {
        history
    } else {
        output
    }
    .to_vec();
    touched.sort_unstable();
    touched.dedup();
    touched.retain(|&t| (t as usize) < vocab_size);
    let mut counts = output.to_vec();
    counts.sort_unstable();
    for t in touched {
        let n = counts.partition_point(|&c| c <= t) - counts.partition_point(|&c| c < t);
        out.extend([t as i32, n as i32]);
    }
}

impl StepPlan {
    /// Packs `batch`. `tokens_per_tile` is the attention kernel's tile length; with
    /// `split_decode`, single-token tiles are set apart for the decode kernel. `padding`
    /// is only for batches of single-token sequences that all need logits. A pending
    /// token comes from the row that the plan built before this one sampled for its
    /// sequence (overlapped steps are planned in launch order); one with no such row is
    /// counted in `unmatched_pending`.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
        block_size: usize,
        tokens_per_tile: usize,
        split_decode: bool,
        vocab_size: usize,
        padding: Option<Padding>,
    ) {
        let previous_rows: FxHashMap<RequestId, usize> =
            if batch.seqs.iter().any(|s| s.last_token_pending) {
                self.rows
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.id, i))
                    .collect()
            } else {
                FxHashMap::default()
            };
        self.unmatched_pending = 0;
        for v in [
            &mut self.tokens,
            &mut self.positions,
            &mut self.slots,
            &mut self.tiles,
            &mut self.decode_tiles,
            &mut self.block_tables,
            &mut self.table_offsets,
            &mut self.logit_rows,
            &mut self.sample_params,
            &mut self.penalties,
            &mut self.score_rows,
            &mut self.score_targets,
            &mut self.score_tops,
            &mut self.pending,
        ] {
            v.clear();
        }
        self.rows.clear();
        self.scored.clear();
        for (si, seq) in batch.seqs.iter().enumerate() {
            let first = self.tokens.len();
            self.table_offsets.push(self.block_tables.len() as i32);
            self.block_tables
                .extend(seq.block_table.iter().map(|&b| b as i32));
            for (i, &tok) in seq.tokens.iter().enumerate() {
                let pos = seq.start_position + i;
                self.tokens.push(tok as i32);
                self.positions.push(pos as i32);
                let block = seq.block_table[pos / block_size] as usize;
                self.slots
                    .push((block * block_size + pos % block_size) as i32);
            }
            if seq.last_token_pending {
                match previous_rows.get(&seq.id) {
                    Some(&row) => self
                        .pending
                        .extend([(self.tokens.len() - 1) as i32, row as i32]),
                    None => self.unmatched_pending += 1,
                }
            }
            for start in (0..seq.tokens.len()).step_by(tokens_per_tile) {
                let n = tokens_per_tile.min(seq.tokens.len() - start);
                let tiles = if split_decode && n == 1 {
                    &mut self.decode_tiles
                } else {
                    &mut self.tiles
                };
                tiles.extend([
                    (first + start) as i32,
                    n as i32,
                    si as i32,
                    (seq.start_position + start) as i32,
                ]);
            }
            if let Some(top) = seq.prompt_logprobs {
                self.score_prompt(seq, first, top as usize, history);
            }
            if seq.needs_logits {
                self.logit_rows.push((self.tokens.len() - 1) as i32);
                let p = &seq.sampling;
                let pen_offset = self.penalties.len() / 2;
                penalty_entries(
                    p,
                    history.sequence_tokens(seq.id),
                    history.prompt_len(seq.id),
                    vocab_size,
                    &mut self.penalties,
                );
                let pen_count = self.penalties.len() / 2 - pen_offset;
                let uniform = if p.is_greedy() {
                    0.0
                } else {
                    draw_uniform(p, seq.num_generated)
                };
                let u = uniform.to_bits();
                let f = |x: f32| x.to_bits() as i32;
                self.sample_params.extend([
                    f(p.temperature),
                    f(p.top_p),
                    p.top_k as i32,
                    f(p.min_p),
                    f(p.repetition_penalty),
                    f(p.frequency_penalty),
                    f(p.presence_penalty),
                    p.is_greedy() as i32,
                    p.logprobs as i32,
                    p.top_logprobs as i32,
                    pen_offset as i32,
                    pen_count as i32,
                    u as u32 as i32,
                    (u >> 32) as u32 as i32,
                    0,
                ]);
                self.rows.push(SampledRow {
                    id: seq.id,
                    logprob: p.logprobs,
                    top_logprobs: p.top_logprobs as usize,
                });
            }
        }
        if let Some(pad) = padding {
            let greedy = SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            };
            for i in self.tokens.len()..pad.rows {
                self.tokens.push(0);
                self.positions.push(0);
                self.slots
                    .push((pad.scratch_block as usize * block_size) as i32);
                let tiles = if split_decode {
                    &mut self.decode_tiles
                } else {
                    &mut self.tiles
                };
                tiles.extend([i as i32, 1, i as i32, 0]);
                self.table_offsets.push(self.block_tables.len() as i32);
                self.block_tables.push(pad.scratch_block as i32);
                self.logit_rows.push(i as i32);
                let f = |x: f32| x.to_bits() as i32;
                self.sample_params.extend([
                    f(greedy.temperature),
                    f(greedy.top_p),
                    0,
                    f(greedy.min_p),
                    f(greedy.repetition_penalty),
                    f(greedy.frequency_penalty),
                    f(greedy.presence_penalty),
                    1,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                ]);
            }
            self.block_tables.resize(pad.block_capacity, 0);
        }
        self.sampled_rows = self.logit_rows.len();
        self.num_tokens = self.tokens.len();
        self.num_tiles = self.tiles.len() / 4;
        self.num_decode_tiles = self.decode_tiles.len() / 4;
        self.tiles.extend_from_slice(&self.decode_tiles);
        self.num_penalties = self.penalties.len() / 2;
        self.num_pending = self.pending.len() / 2;
        self.words.clear();
        let mut offsets = Offsets::default();
        for (part, offset) in [
            (&self.tokens, &mut offsets.tokens),
            (&self.positions, &mut offsets.positions),
            (&self.slots, &mut offsets.slots),
            (&self.tiles, &mut offsets.tiles),
            (&self.block_tables, &mut offsets.block_tables),
            (&self.table_offsets, &mut offsets.table_offsets),
            (&self.logit_rows, &mut offsets.logit_rows),
            (&self.sample_params, &mut offsets.sample_params),
            (&self.penalties, &mut offsets.penalties),
            (&self.score_rows, &mut offsets.score_rows),
            (&self.score_targets, &mut offsets.score_targets),
            (&self.score_tops, &mut offsets.score_tops),
            (&self.pending, &mut offsets.pending),
        ] {
            // Parts start on 4-word boundaries so every device pointer is 16-byte aligned.
            while !self.words.len().is_multiple_of(4) {
                self.words.push(0);
            }
            *offset = self.words.len();
            self.words.extend_from_slice(part);
        }
        self.offsets = offsets;
    }

    /// Adds the prompt tokens that `seq`'s chunk (its first token at index `first`)
    /// predicts: each row but one at the prompt's last position, whose prediction is the
    /// first generated token.
    fn score_prompt(
        &mut self,
        seq: &ScheduledSeq,
        first: usize,
        top_logprobs: usize,
        history: &dyn SequenceTokens,
    ) {
        let tokens = history.sequence_tokens(seq.id);
        let prompt_len = history.prompt_len(seq.id).min(tokens.len());
        for i in 0..seq.tokens.len() {
            let position = seq.start_position + i + 1;
            if position < prompt_len {
                self.score_rows.push((first + i) as i32);
                self.score_targets.push(tokens[position] as i32);
                self.score_tops.push(top_logprobs as i32);
                self.scored.push(ScoredToken {
                    id: seq.id,
                    position,
                    top_logprobs,
                });
            }
        }
    }

    /// Marks every sampled row as having its logits adjusted: the sampler then reads the
    /// row's record from the step's adjustment words (see crate::adjustments), which
    /// must be copied before it runs.
    pub fn mark_adjusted(&mut self) {
        for i in 0..self.rows.len() {
            self.words[self.offsets.sample_params + i * SAMPLE_FIELDS + SAMPLE_ADJUSTED] = 1;
        }
    }

    /// Whether any row asked for log-probabilities (then the whole output comes back).
    pub fn wants_logprobs(&self) -> bool {
        self.rows.iter().any(|r| r.logprob || r.top_logprobs > 0)
    }

    /// Whether every sampled row (padding included) takes the plain arg-max of its raw
    /// logits: greedy, with no penalties, log-probabilities, biases or grammar mask. Such
    /// a row needs only the best of each slice of its logits, not the whole row.
    pub fn plain_greedy(&self) -> bool {
        let params = &self.words[self.offsets.sample_params..];
        self.num_penalties == 0
            && !self.wants_logprobs()
            && params
                .chunks_exact(SAMPLE_FIELDS)
                .take(self.sampled_rows)
                .all(|row| row[SAMPLE_GREEDY] == 1 && row[SAMPLE_ADJUSTED] == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use crate::selftest::History;

    fn seq(id: RequestId, tokens: Vec<TokenId>, start: usize, table: Vec<u32>) -> ScheduledSeq {
        ScheduledSeq {
            id,
            tokens,
            start_position: start,
            block_table: table,
            needs_logits: true,
            sampling: SamplingParams::default(),
            prompt_logprobs: None,
            num_generated: 0,
            last_token_pending: false,
        }
    }

    #[test]
    fn pending_tokens_point_at_the_rows_the_step_before_sampled() {
        let history = History(HashMap::new());
        let mut plan = StepPlan::default();
        let before = ScheduledBatch {
            seqs: vec![seq(4, vec![1], 3, vec![0]), seq(9, vec![2], 5, vec![1])],
            preempted: vec![],
        };
        plan.build(&before, &history, 16, 8, true, 100, None);
        assert_eq!(plan.num_pending, 0);
        // Sequence 9 sampled row 1, sequence 4 row 0; sequence 7 was not sampled.
        let pending = |id, start| ScheduledSeq {
            last_token_pending: true,
            ..seq(id, vec![0], start, vec![2])
        };
        let after = ScheduledBatch {
            seqs: vec![
                pending(9, 6),
                seq(5, vec![3, 4], 0, vec![3]),
                pending(4, 4),
                pending(7, 2),
            ],
            preempted: vec![],
        };
        plan.build(&after, &history, 16, 8, true, 100, None);
        let o = plan.offsets;
        assert_eq!(plan.num_pending, 2);
        assert_eq!(&plan.words[o.pending..o.pending + 4], &[0, 1, 3, 0]);
        assert_eq!(plan.unmatched_pending, 1);
    }

    #[test]
    fn a_mixed_batch_packs_slots_tiles_and_rows() {
        let mut prefill = seq(1, (10..30).collect(), 4, vec![7, 3]);
        prefill.needs_logits = false;
        let mut decode = seq(2, vec![5], 17, vec![0, 9]);
        decode.sampling = SamplingParams {
            temperature: 0.0,
            logprobs: true,
            ..Default::default()
        };
        let batch = ScheduledBatch {
            seqs: vec![prefill, decode],
            preempted: vec![],
        };
        let history = History(HashMap::new());
        let mut plan = StepPlan::default();
        plan.build(&batch, &history, 16, 8, false, 100, None);
        let w = &plan.words;
        let o = plan.offsets;
        assert_eq!(plan.num_tokens, 21);
        assert_eq!(&w[o.tokens..o.tokens + 3], &[10, 11, 12]);
        // Position 4 is slot 4 of block 7; position 16 is slot 0 of block 3.
        assert_eq!(w[o.slots], 7 * 16 + 4);
        assert_eq!(w[o.slots + 12], 3 * 16);
        // The decode token: position 17 in block 9, slot 1.
        assert_eq!(w[o.slots + 20], 9 * 16 + 1);
        // 20 prefill tokens in tiles of 8 (8, 8, 4), then the decode token.
        assert_eq!((plan.num_tiles, plan.num_decode_tiles), (4, 0));
        assert_eq!(&w[o.tiles..o.tiles + 4], &[0, 8, 0, 4]);
        assert_eq!(&w[o.tiles + 8..o.tiles + 16], &[16, 4, 0, 20, 20, 1, 1, 17]);
        assert_eq!(&w[o.table_offsets..o.table_offsets + 2], &[0, 2]);
        assert_eq!(&w[o.block_tables..o.block_tables + 4], &[7, 3, 0, 9]);
        // Only the decode sequence is sampled, at its one token.
        assert_eq!(plan.rows.len(), 1);
        assert_eq!(w[o.logit_rows], 20);
        assert_eq!(w[o.sample_params + 7], 1, "greedy");
        assert!(plan.wants_logprobs());
        assert_eq!(plan.sample_params.len(), SAMPLE_FIELDS * plan.rows.len());
        assert_eq!(w[o.sample_params + SAMPLE_ADJUSTED], 0);
        plan.mark_adjusted();
        assert_eq!(plan.words[o.sample_params + SAMPLE_ADJUSTED], 1);
        // Split for the decode kernel: the single-token tile moves after the others.
        plan.build(&batch, &history, 16, 8, true, 100, None);
        assert_eq!((plan.num_tiles, plan.num_decode_tiles), (3, 1));
        let o = plan.offsets;
        assert_eq!(&plan.words[o.tiles + 12..o.tiles + 16], &[20, 1, 1, 17]);
        for off in [o.positions, o.slots, o.tiles, o.sample_params, o.penalties] {
            assert_eq!(off % 4, 0);
        }
    }

    #[test]
    fn only_greedy_rows_without_extras_are_plain_greedy() {
        let history = History(HashMap::new());
        let plan_of = |sampling: SamplingParams, padding: Option<Padding>| {
            let mut decode = seq(2, vec![5], 17, vec![0, 9]);
            decode.sampling = sampling;
            let batch = ScheduledBatch {
                seqs: vec![decode],
                preempted: vec![],
            };
            let mut plan = StepPlan::default();
            plan.build(&batch, &history, 16, 8, true, 100, padding);
            plan
        };
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let padding = Padding {
            rows: 4,
            block_capacity: 64,
            scratch_block: 50,
        };
        // Padded rows are greedy too.
        assert!(plan_of(greedy, None).plain_greedy());
        assert!(plan_of(greedy, Some(padding)).plain_greedy());
        let mut adjusted = plan_of(greedy, None);
        adjusted.mark_adjusted();
        assert!(!adjusted.plain_greedy());
        for not_plain in [
            SamplingParams::default(),
            SamplingParams {
                logprobs: true,
                ..greedy
            },
            SamplingParams {
                top_logprobs: 2,
                ..greedy
            },
        ] {
            assert!(!plan_of(not_plain, Some(padding)).plain_greedy());
        }
    }

    #[test]
    fn scored_chunks_list_the_prompt_tokens_their_rows_predict() {
        // A 6-token prompt scored in two chunks (4 then 2 tokens), beside a decode token.
        let prompt: Vec<TokenId> = vec![40, 41, 42, 43, 44, 45];
        let mut history = History(HashMap::new());
        history.0.insert(1, (prompt.clone(), 6));
        let decode = seq(2, vec![5], 17, vec![0, 9]);
        let mut first = seq(1, prompt[..4].to_vec(), 0, vec![3]);
        first.needs_logits = false;
        first.prompt_logprobs = Some(2);
        let batch = ScheduledBatch {
            seqs: vec![decode.clone(), first],
            preempted: vec![],
        };
        let mut plan = StepPlan::default();
        plan.build(&batch, &history, 16, 8, true, 100, None);
        let (w, o) = (&plan.words, plan.offsets);
        // Rows 1..=4 (after the decode token) predict prompt positions 1..=4.
        assert_eq!(&w[o.score_rows..o.score_rows + 4], &[1, 2, 3, 4]);
        assert_eq!(&w[o.score_targets..o.score_targets + 4], &[41, 42, 43, 44]);
        assert_eq!(&w[o.score_tops..o.score_tops + 4], &[2, 2, 2, 2]);
        let positions: Vec<usize> = plan.scored.iter().map(|t| t.position).collect();
        assert_eq!(positions, [1, 2, 3, 4]);
        assert!(plan.scored.iter().all(|t| t.id == 1 && t.top_logprobs == 2));
        // The last chunk: its last row predicts the first generated token, not a prompt one.
        let mut last = seq(1, prompt[4..].to_vec(), 4, vec![3]);
        last.prompt_logprobs = Some(0);
        let batch = ScheduledBatch {
            seqs: vec![last, decode],
            preempted: vec![],
        };
        plan.build(&batch, &history, 16, 8, true, 100, None);
        let (w, o) = (&plan.words, plan.offsets);
        assert_eq!(plan.scored.len(), 1);
        assert_eq!(plan.scored[0].position, 5);
        assert_eq!(
            (w[o.score_rows], w[o.score_targets], w[o.score_tops]),
            (0, 45, 0)
        );
        assert_eq!(plan.rows.len(), 2, "both sequences are still sampled");
        for off in [o.score_rows, o.score_targets, o.score_tops] {
            assert_eq!(off % 4, 0);
        }
    }

    #[test]
    fn padded_decode_steps_have_a_fixed_layout() {
        let history = History(HashMap::new());
        let mut plan = StepPlan::default();
        let pad = Padding {
            rows: 4,
            block_capacity: 16,
            scratch_block: 99,
        };
        let mut offsets = Vec::new();
        for n in [1usize, 3] {
            let batch = ScheduledBatch {
                seqs: (0..n)
                    .map(|i| seq(i as RequestId, vec![7], 20 + i, vec![i as u32, 5]))
                    .collect(),
                preempted: vec![],
            };
            plan.build(&batch, &history, 16, 8, true, 100, Some(pad));
            assert_eq!((plan.rows.len(), plan.sampled_rows), (n, 4));
            assert_eq!((plan.num_tiles, plan.num_decode_tiles), (0, 4));
            let o = plan.offsets;
            // The stand-ins write to the scratch block and read only it.
            assert_eq!(plan.words[o.slots + 3], 99 * 16);
            assert_eq!(&plan.words[o.tiles + 12..o.tiles + 16], &[3, 1, 3, 0]);
            let table_at = plan.words[o.table_offsets + 3] as usize;
            assert_eq!(plan.words[o.block_tables + table_at], 99);
            offsets.push(o);
        }
        assert_eq!(
            offsets[0], offsets[1],
            "the layout depends on the padding only"
        );
    }

    #[test]
    fn penalty_entries_follow_the_cpu_sampler() {
        let history = [3, 5, 3, 7, 7, 7];
        let mut out = Vec::new();
        // Frequency only: distinct output tokens (prompt is [3, 5]) with their counts.
        let freq = SamplingParams {
            frequency_penalty: 0.5,
            ..Default::default()
        };
        penalty_entries(&freq, &history, 2, 100, &mut out);
        assert_eq!(out, vec![3, 1, 7, 3]);
        // Repetition touches the whole history, prompt-only tokens with count 0.
        out.clear();
        let rep = SamplingParams {
            repetition_penalty: 1.2,
            ..Default::default()
        };
        penalty_entries(&rep, &history, 2, 6, &mut out);
        assert_eq!(out, vec![3, 1, 5, 0], "7 is outside a vocabulary of 6");
        out.clear();
        penalty_entries(&SamplingParams::default(), &history, 2, 100, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn seeded_uniforms_repeat_per_token_index() {
        let p = SamplingParams {
            seed: Some(9),
            ..Default::default()
        };
        assert_eq!(draw_uniform(&p, 3), draw_uniform(&p, 3));
        assert_ne!(draw_uniform(&p, 3), draw_uniform(&p, 4));
        let u = draw_uniform(&p, 0);
        assert!((0.0..1.0).contains(&u));
    }
}
