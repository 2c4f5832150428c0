//! The CPU model runner: the Llama-family model, its paged KV cache and the sampler.

use std::path::Path;

use candle_core::quantized::gguf_file;
use heddle_core::{ScheduledBatch, ScheduledSeq, SequenceTokens, TokenId};
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, KvDtype};
use crate::llama::{Llama, Logits, Scratch, SeqInput};
use crate::logits_processing::{LogitsAdjustment, PendingAdjustments, StepAdjustments};
use crate::runner::{refuse_pending, ModelRunner, PromptTokenLogprobs, SampledOutput};
use crate::sampling::{token_logprobs, Sampler};

pub struct CpuRunner {
    model: Llama,
    cache: KvCache,
    scratch: Scratch,
    /// One per group of rows sampled in parallel (at most one per thread), each keeping
    /// its buffers from step to step.
    samplers: Vec<Sampler>,
    /// The prompt log-probabilities of the last step, until the engine takes them.
    prompt_logprobs: Vec<PromptTokenLogprobs>,
    gguf: Option<gguf_file::Content>,
}

impl CpuRunner {
    /// Loads a GGUF file or an HF checkpoint directory and allocates a KV cache of
    /// `num_blocks` blocks of `block_size` positions (the scheduler's block pool geometry).
    pub fn load(path: &Path, num_blocks: usize, block_size: usize) -> Result<Self> {
        let (model, gguf) = Llama::load(path)?;
        let mut runner = Self::new(model, num_blocks, block_size, KvDtype::default())?;
        runner.gguf = gguf;
        Ok(runner)
    }

    pub fn new(model: Llama, num_blocks: usize, block_size: usize, kv: KvDtype) -> Result<Self> {
        let cache = KvCache::new(model.config(), num_blocks, block_size, kv)?;
        Ok(CpuRunner {
            model,
            cache,
            scratch: Scratch::default(),
            samplers: Vec::new(),
            prompt_logprobs: Vec::new(),
            gguf: None,
        })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    pub fn kv_cache(&self) -> &KvCache {
        &self.cache
    }

    /// The GGUF header of the loaded file (tokenizer, chat template, metadata), if the
    /// model came from GGUF.
    pub fn gguf(&self) -> Option<&gguf_file::Content> {
        self.gguf.as_ref()
    }
}

impl ModelRunner for CpuRunner {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn step(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.step_adjusted(batch, history, Box::new(|| Ok(StepAdjustments::new())))
    }

    fn applies_logits_adjustments(&self) -> bool {
        true
    }

    fn computes_prompt_logprobs(&self) -> bool {
        true
    }

    fn take_prompt_logprobs(&mut self) -> Vec<PromptTokenLogprobs> {
        std::mem::take(&mut self.prompt_logprobs)
    }

    fn step_adjusted(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
        adjustments: PendingAdjustments<'_>,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.prompt_logprobs.clear();
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        refuse_pending(batch)?;
        let inputs: Vec<SeqInput> = batch
            .seqs
            .iter()
            .map(|s| SeqInput {
                tokens: &s.tokens,
                start_position: s.start_position,
                block_table: &s.block_table,
                logits: if s.prompt_logprobs.is_some() {
                    Logits::All
                } else if s.needs_logits {
                    Logits::Last
                } else {
                    Logits::None
                },
            })
            .collect();
        let vocab = self.model.config().vocab_size;
        let scores_prompts = batch.seqs.iter().any(|s| s.prompt_logprobs.is_some());
        let mut logits = self
            .model
            .forward(&inputs, &mut self.cache, &mut self.scratch)?;
        if scores_prompts {
            logits = score_prompts(batch, history, logits, vocab, &mut self.prompt_logprobs);
        }
        let adjustments = adjustments().map_err(ModelError::LogitsProcessing)?;
        let sampled: Vec<_> = batch
            .seqs
            .iter()
            .filter(|s| s.needs_logits)
            .map(|s| RowToSample {
                seq: s,
                history: history.sequence_tokens(s.id),
                prompt_len: history.prompt_len(s.id),
                adjustment: adjustments.get(&s.id),
            })
            .collect();
        if sampled.is_empty() {
            if scores_prompts {
                self.scratch.release_logits();
            }
            return Ok(Vec::new());
        }
        // Rows are split into one contiguous group per thread, each group sampled with
        // its own sampler. Each row is sampled on its own, so the grouping changes nothing.
        let groups = sampled.len().min(rayon::current_num_threads());
        if self.samplers.len() < groups {
            self.samplers.resize_with(groups, Sampler::default);
        }
        let rows_per_group = sampled.len().div_ceil(groups);
        let outputs = if groups > 1 {
            logits
                .par_chunks_mut(rows_per_group * vocab)
                .zip(sampled.par_chunks(rows_per_group))
                .zip(self.samplers.par_iter_mut())
                .flat_map_iter(|((rows, seqs), sampler)| sample_rows(sampler, rows, seqs, vocab))
                .collect()
        } else {
            sample_rows(&mut self.samplers[0], logits, &sampled, vocab).collect()
        };
        if scores_prompts {
            self.scratch.release_logits();
        }
        Ok(outputs)
    }
}

/// Scores the prompt tokens predicted by the rows of the sequences with `prompt_logprobs`
/// (every row of theirs but one at the prompt's last position, which predicts the first
/// generated token) into `scored`, then moves the rows to sample to the front, in batch
/// order: the returned rows are those a forward pass without scoring would have given.
fn score_prompts<'a>(
    batch: &ScheduledBatch,
    history: &dyn SequenceTokens,
    logits: &'a mut [f32],
    vocab: usize,
    scored: &mut Vec<PromptTokenLogprobs>,
) -> &'a mut [f32] {
    // (row, sequence, position of the predicted token, that token, top-N)
    let mut to_score = Vec::new();
    let mut sampled_rows = Vec::new();
    let mut row = 0;
    for s in &batch.seqs {
        let rows = match s.prompt_logprobs {
            Some(top) => {
                let tokens = history.sequence_tokens(s.id);
                let prompt_len = history.prompt_len(s.id).min(tokens.len());
                for (offset, position) in (s.start_position..s.end_position()).enumerate() {
                    let next = position + 1;
                    if next < prompt_len {
                        to_score.push((row + offset, s.id, next, tokens[next], top as usize));
                    }
                }
                s.tokens.len()
            }
            None => usize::from(s.needs_logits),
        };
        if s.needs_logits {
            sampled_rows.push(row + rows - 1);
        }
        row += rows;
    }
    let rows: &[f32] = logits;
    to_score
        .par_iter()
        .map_init(Vec::new, |ids, &(row, id, position, token, top)| {
            let (logprob, top_logprobs) =
                token_logprobs(&rows[row * vocab..][..vocab], token, top, ids);
            PromptTokenLogprobs {
                id,
                position,
                logprob,
                top_logprobs,
            }
        })
        .collect_into_vec(scored);
    // Each sampled row moves to an index no later than its own: moving them in order
    // never overwrites one still to move.
    for (to, &from) in sampled_rows.iter().enumerate() {
        if from != to {
            logits.copy_within(from * vocab..(from + 1) * vocab, to * vocab);
        }
    }
    &mut logits[..sampled_rows.len() * vocab]
}

/// A row to sample: its sequence, the sequence's tokens so far, its prompt length and
/// what changes its logits.
struct RowToSample<'a> {
    seq: &'a ScheduledSeq,
    history: &'a [TokenId],
    prompt_len: usize,
    adjustment: Option<&'a LogitsAdjustment>,
}

/// Samples consecutive logits rows with one sampler.
fn sample_rows<'a>(
    sampler: &'a mut Sampler,
    rows: &'a mut [f32],
    seqs: &'a [RowToSample<'a>],
    vocab: usize,
) -> impl Iterator<Item = SampledOutput> + 'a {
    rows.chunks_exact_mut(vocab).zip(seqs).map(move |(row, r)| {
        let s = sampler.sample_adjusted(
            row,
            &r.seq.sampling,
            r.adjustment,
            r.history,
            r.prompt_len,
            r.seq.num_generated,
        );
        SampledOutput {
            id: r.seq.id,
            token: s.token,
            logprob: s.logprob,
            top_logprobs: s.top_logprobs,
        }
    })
}
