//! Teacher-forced logits and greedy continuations of a set of prompts on an HF
//! checkpoint, for comparison with an independent implementation on the same files
//! (scripts/gpu/reference/check_reference.py runs HF transformers on them).
//!
//! All prompts run together, as the server would run them: each prompt's first part is
//! prefilled in chunks (the prefill attention kernel, chunks of several prompts in one
//! step), then the rest one token per step (the decode path), with logits at every
//! position from the end of the prefill on; then `generate` greedy tokens through the
//! device sampler (decode steps replayed as CUDA graphs).

use std::collections::HashMap;

use anyhow::ensure;
use heddle_core::{RequestId, SamplingParams, ScheduledBatch, ScheduledSeq, TokenId};
use heddle_model::runner::ModelRunner;
use serde_json::json;

use crate::runner::CudaRunner;

/// What to run: each prompt is teacher-forced from `teacher_from[i]` (≥ 1) on.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompts: Vec<Vec<TokenId>>,
    pub teacher_from: Vec<usize>,
    pub generate: usize,
    /// Prefill chunk length.
    pub chunk: usize,
}

impl Job {
    /// Reads `{"prompts": [[ids]], "teacher_from": [n], "generate": n, "chunk": n}`.
    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let list = |key: &str| -> anyhow::Result<&Vec<serde_json::Value>> {
            v[key]
                .as_array()
                .ok_or_else(|| anyhow::anyhow!("the job has no list {key:?}"))
        };
        let number = |x: &serde_json::Value| -> anyhow::Result<usize> {
            x.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| anyhow::anyhow!("{x} is not a count"))
        };
        let prompts = list("prompts")?
            .iter()
            .map(|p| {
                p.as_array()
                    .ok_or_else(|| anyhow::anyhow!("a prompt is not a list"))?
                    .iter()
                    .map(|t| number(t).map(|t| t as TokenId))
                    .collect()
            })
            .collect::<anyhow::Result<Vec<Vec<TokenId>>>>()?;
        let teacher_from = list("teacher_from")?
            .iter()
            .map(number)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let job = Job {
            prompts,
            teacher_from,
            generate: number(&v["generate"])?,
            chunk: number(&v["chunk"])?,
        };
        ensure!(
            job.prompts.len() == job.teacher_from.len()
                && job
                    .prompts
                    .iter()
                    .zip(&job.teacher_from)
                    .all(|(p, &f)| f >= 1 && f <= p.len()),
            "teacher_from must give, per prompt, a position in 1..=len"
        );
        ensure!(
            job.chunk > 0 && job.generate > 0,
            "chunk and generate must be > 0"
        );
        Ok(job)
    }

    /// KV blocks of `block_size` the job needs.
    pub fn blocks_needed(&self, block_size: usize) -> usize {
        self.prompts
            .iter()
            .map(|p| (p.len() + self.generate).div_ceil(block_size))
            .sum()
    }

    /// Most tokens one step of the job holds.
    pub fn max_step_tokens(&self) -> usize {
        self.prompts.len() * self.chunk
    }
}

/// The logits of every compared position, prompt after prompt, and each prompt's greedy
/// continuation.
pub struct Output {
    /// Rows of `vocab` f32: per prompt, positions `teacher_from - 1 ..= len - 1`.
    pub logits: Vec<f32>,
    pub vocab: usize,
    pub greedy: Vec<Vec<TokenId>>,
}

impl Output {
    pub fn summary(&self, job: &Job) -> serde_json::Value {
        json!({
            "vocab": self.vocab,
            "first_position": job.teacher_from.iter().map(|f| f - 1).collect::<Vec<_>>(),
            "rows": job.prompts.iter().zip(&job.teacher_from)
                .map(|(p, f)| p.len() - f + 1).collect::<Vec<_>>(),
            "greedy": self.greedy,
        })
    }
}

struct NoHistory;

impl heddle_core::SequenceTokens for NoHistory {
    fn sequence_tokens(&self, _: RequestId) -> &[TokenId] {
        &[]
    }
    fn prompt_len(&self, _: RequestId) -> usize {
        0
    }
}

pub fn run(runner: &mut CudaRunner, job: &Job) -> anyhow::Result<Output> {
    let vocab = runner.config().vocab_size;
    let block_size = runner.options().block_size;
    let mut next_block = 0u32;
    let tables: Vec<Vec<u32>> = job
        .prompts
        .iter()
        .map(|p| {
            let n = (p.len() + job.generate).div_ceil(block_size) as u32;
            next_block += n;
            (next_block - n..next_block).collect()
        })
        .collect();
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let seq =
        |i: usize, tokens: &[TokenId], start: usize, needs_logits: bool, generated| ScheduledSeq {
            id: i as RequestId,
            tokens: tokens.to_vec(),
            start_position: start,
            block_table: tables[i].clone(),
            needs_logits,
            sampling: greedy,
            prompt_logprobs: None,
            num_generated: generated,
            last_token_pending: false,
        };
    // Logits by (prompt, position).
    let mut rows: HashMap<(usize, usize), Vec<f32>> = HashMap::new();
    let mut cursor = vec![0usize; job.prompts.len()];
    loop {
        let mut seqs = Vec::new();
        let mut positions = Vec::new();
        for (i, prompt) in job.prompts.iter().enumerate() {
            let (at, from) = (cursor[i], job.teacher_from[i]);
            // Prefill chunks up to `from`, then one token per step.
            let end = if at < from {
                (at + job.chunk).min(from)
            } else if at < prompt.len() {
                at + 1
            } else {
                continue;
            };
            let logits = end >= from;
            seqs.push(seq(i, &prompt[at..end], at, logits, 0));
            if logits {
                positions.push((i, end - 1));
            }
            cursor[i] = end;
        }
        if seqs.is_empty() {
            break;
        }
        let batch = ScheduledBatch {
            seqs,
            preempted: vec![],
        };
        let logits = runner.step_logits(&batch, &NoHistory)?;
        ensure!(
            logits.len() == positions.len() * vocab,
            "logits rows missing"
        );
        for (row, key) in logits.chunks_exact(vocab).zip(positions) {
            rows.insert(key, row.to_vec());
        }
    }
    let mut logits = Vec::new();
    for (i, prompt) in job.prompts.iter().enumerate() {
        for pos in job.teacher_from[i] - 1..prompt.len() {
            logits.extend_from_slice(&rows[&(i, pos)]);
        }
    }

    let mut generated: Vec<Vec<TokenId>> = job
        .prompts
        .iter()
        .enumerate()
        .map(|(i, p)| vec![heddle_model::sampling::argmax(&rows[&(i, p.len() - 1)])])
        .collect();
    for g in 1..job.generate {
        let seqs = job
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| seq(i, &[generated[i][g - 1]], p.len() + g - 1, true, g))
            .collect();
        let batch = ScheduledBatch {
            seqs,
            preempted: vec![],
        };
        for out in runner.step(&batch, &NoHistory)? {
            generated[out.id as usize].push(out.token);
        }
    }
    Ok(Output {
        logits,
        vocab,
        greedy: generated,
    })
}
