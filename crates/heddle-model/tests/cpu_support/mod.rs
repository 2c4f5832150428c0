//! A tiny stand-in for the scheduler, for driving `ModelRunner::step` by hand: sequences
//! own block tables taken from a free list, prefill in chunks, then decode one token per
//! step.

use heddle_core::kv::BlockId;
use heddle_core::{
    RequestId, SamplingParams, ScheduledBatch, ScheduledSeq, SequenceTokens, TokenId,
};
use heddle_model::{embedded_model_path, CpuRunner, ModelRunner, SampledOutput};

pub const BLOCK_SIZE: usize = 16;

/// The embedded model with a cache of `num_blocks` blocks of [`BLOCK_SIZE`]; a missing
/// model file fails with the message that says how to fetch it.
// Each test binary compiles this module; cpu_perf loads its model itself.
#[allow(dead_code)]
pub fn embedded_runner(num_blocks: usize) -> CpuRunner {
    embedded_runner_with(num_blocks, BLOCK_SIZE)
}

#[allow(dead_code)]
pub fn embedded_runner_with(num_blocks: usize, block_size: usize) -> CpuRunner {
    let path = embedded_model_path().unwrap_or_else(|e| panic!("{e}"));
    CpuRunner::load(&path, num_blocks, block_size).unwrap()
}

#[derive(Debug, Clone)]
pub struct Seq {
    pub id: RequestId,
    /// Prompt then output.
    pub tokens: Vec<TokenId>,
    pub prompt_len: usize,
    pub blocks: Vec<BlockId>,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    pub params: SamplingParams,
    pub outputs: Vec<SampledOutput>,
}

impl Seq {
    pub fn new(id: RequestId, prompt: &[TokenId], params: SamplingParams) -> Self {
        Seq {
            id,
            tokens: prompt.to_vec(),
            prompt_len: prompt.len(),
            blocks: Vec::new(),
            computed: 0,
            params,
            outputs: Vec::new(),
        }
    }

    pub fn generated(&self) -> &[TokenId] {
        &self.tokens[self.prompt_len..]
    }
}

struct History<'a>(Vec<&'a Seq>);

impl SequenceTokens for History<'_> {
    fn sequence_tokens(&self, id: RequestId) -> &[TokenId] {
        self.0
            .iter()
            .find(|s| s.id == id)
            .map_or(&[], |s| &s.tokens)
    }

    fn prompt_len(&self, id: RequestId) -> usize {
        self.0
            .iter()
            .find(|s| s.id == id)
            .map_or(0, |s| s.prompt_len)
    }
}

pub struct Driver {
    pub runner: CpuRunner,
    free: Vec<BlockId>,
}

impl Driver {
    /// Blocks are handed out from both ends of the pool in turn, so block tables are
    /// never contiguous.
    pub fn new(runner: CpuRunner) -> Self {
        let n = runner.kv_cache().num_blocks() as BlockId;
        let mut free = Vec::new();
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            hi -= 1;
            free.push(hi);
            if lo < hi {
                free.push(lo);
                lo += 1;
            }
        }
        free.reverse();
        Driver { runner, free }
    }

    pub fn alloc(&mut self) -> BlockId {
        self.free.pop().expect("the test's KV cache is too small")
    }

    /// Returns finished sequences' blocks to the free list.
    // Only cpu_perf measures round after round on one cache.
    #[allow(dead_code)]
    pub fn release(&mut self, seqs: Vec<Seq>) {
        self.free.extend(seqs.into_iter().flat_map(|s| s.blocks));
    }

    /// One step over `seqs`: up to `chunk` uncomputed tokens of each; the sampled tokens
    /// are appended.
    pub fn step(&mut self, seqs: &mut [&mut Seq], chunk: usize) {
        let block_size = self.runner.kv_cache().block_size();
        let mut batch = ScheduledBatch::default();
        for s in seqs.iter_mut() {
            let end = s.computed.saturating_add(chunk).min(s.tokens.len());
            while s.blocks.len() * block_size < end {
                let b = self.alloc();
                s.blocks.push(b);
            }
            batch.seqs.push(ScheduledSeq {
                id: s.id,
                tokens: s.tokens[s.computed..end].to_vec(),
                start_position: s.computed,
                block_table: s.blocks.clone(),
                needs_logits: end == s.tokens.len(),
                sampling: s.params,
                prompt_logprobs: None,
                num_generated: s.tokens.len() - s.prompt_len,
                last_token_pending: false,
            });
        }
        let history = History(seqs.iter().map(|s| &**s).collect());
        let outputs = self.runner.step(&batch, &history).unwrap();
        assert_eq!(
            outputs.len(),
            batch.seqs.iter().filter(|s| s.needs_logits).count()
        );
        let mut outputs = outputs.into_iter();
        for (s, sched) in seqs.iter_mut().zip(&batch.seqs) {
            s.computed = sched.end_position();
            if sched.needs_logits {
                let out = outputs.next().unwrap();
                assert_eq!(out.id, s.id);
                s.tokens.push(out.token);
                s.outputs.push(out);
            }
        }
    }

    /// Steps `seqs` together until each has generated `n` tokens, prefilling in chunks of
    /// `chunk`.
    pub fn generate(&mut self, seqs: &mut [Seq], chunk: usize, n: usize) {
        loop {
            let mut active: Vec<&mut Seq> = seqs
                .iter_mut()
                .filter(|s| s.generated().len() < n)
                .collect();
            if active.is_empty() {
                return;
            }
            self.step(&mut active, chunk);
        }
    }
}
