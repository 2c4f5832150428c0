//! Checks on a real GPU, each against a CPU reference on fresh random inputs:
//! (a) every kernel, by relative error ‖out − ref‖ / ‖ref‖ (NaN counts as infinite);
//! (b) the whole runner against heddle's CPU runner on a small random-weight safetensors
//!     model, in f32 (greedy tokens must be identical) and bf16;
//! (c) CUDA graph replay against direct launches;
//! (d) prompt log-probabilities: the scoring kernel against the CPU's, and a scored
//!     prompt against the log-probabilities its own generation reported;
//! (e) tensor parallelism: the runner split over two ranks on this one GPU against one
//!     rank (src/parallel_checks.rs).
//!
//! Split by what it checks: `kernels` (each kernel against f64), `sampler` (the device
//! sampler and scoring kernel against the CPU's), `runner` (the whole runner against the
//! CPU runner, graph replay, prompt scoring); `driving` runs requests through the
//! scheduler for them and for the other checks.
//!
//! Batch invariance at a real shape is `heddle-cuda invariance` (src/invariance.rs); the
//! comparison with an independent implementation is scripts/gpu/reference/.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context};
use half::bf16;
use heddle_core::{
    RequestId, SamplingParams, ScheduledBatch, ScheduledSeq, Scheduler, SchedulerConfig,
    SequenceTokens, TokenId,
};
use heddle_model::driver::StepDriver;
use heddle_model::grammar::TokenMask;
use heddle_model::kv_cache::{KvCache, KvDtype};
use heddle_model::llama::{Llama, Logits, Scratch, SeqInput};
use heddle_model::logits_processing::{LogitsAdjustment, StepAdjustments};
use heddle_model::runner::ModelRunner;
use heddle_model::ModelConfig;

use crate::decode_case::DecodeCase;
use crate::gpu::{grid, DeviceBuffer, Gpu};
use crate::kernels::{
    DType, KernelShape, KvCacheDtype, MAX_TOP_LOGPROBS, SAMPLE_THREADS, SCORE_WORDS,
};
use crate::plan::StepPlan;
use crate::runner::{
    launch_attention, AttentionArgs, CudaOptions, CudaRunner, KvBudget, Quantization, WeightSource,
};

mod driving;
mod kernels;
mod runner;
mod sampler;

pub(crate) use driving::drive;
pub use driving::{generate, generate_stepping};
use kernels::{decode_attention_checks, kernel_checks};
pub use runner::write_tiny_model;
use runner::{graph_replay, prompt_scoring, runner_vs_cpu};
use sampler::sampler_checks;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    /// Relative error, or the fraction of mismatches for token comparisons.
    pub error: f64,
    /// None for a figure that is reported but judged by no limit (not counted as a check).
    pub limit: Option<f64>,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.limit.is_none_or(|limit| self.error <= limit)
    }
}

/// ‖out − reference‖ / ‖reference‖, infinite when anything is NaN.
pub fn relative_error(out: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&o, &r) in out.iter().zip(reference) {
        if o.is_nan() || r.is_nan() {
            return f64::INFINITY;
        }
        diff += ((o - r) as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// Deterministic values in [-scale, scale).
pub fn random_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    crate::xorshift::xorshift64(seed)
        .take(n)
        .map(|s| scale * ((s >> 40) as f32 / (1u64 << 23) as f32 - 1.0))
        .collect()
}

/// Runs every check; returns them all (the caller prints and judges).
pub fn run_all() -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let fp8 = crate::gpu::open_device(0)?.compute_capability()? >= (8, 9);
    for dtype in [DType::F32, DType::Bf16] {
        checks.extend(kernel_checks(dtype)?);
        checks.extend(decode_attention_checks(dtype, KvCacheDtype::Auto)?);
    }
    if fp8 {
        checks.extend(decode_attention_checks(DType::Bf16, KvCacheDtype::Fp8)?);
    }
    let dir = std::env::temp_dir().join(format!("heddle-cuda-selftest-{}", std::process::id()));
    // The runner in f32 and bf16, then (on GPUs with FP8) with the FP8 KV cache and with
    // FP8 projections.
    let mut variants = vec![
        (DType::F32, Quantization::None, KvCacheDtype::Auto),
        (DType::Bf16, Quantization::None, KvCacheDtype::Auto),
    ];
    if fp8 {
        variants.push((DType::Bf16, Quantization::None, KvCacheDtype::Fp8));
        variants.push((DType::Bf16, Quantization::Fp8, KvCacheDtype::Auto));
    }
    for qwen2 in [false, true] {
        write_tiny_model(&dir, qwen2)?;
        for &(dtype, quantization, kv_cache) in &variants {
            checks.extend(runner_vs_cpu(&dir, dtype, qwen2, quantization, kv_cache)?);
        }
    }
    checks.extend(graph_replay(&dir)?);
    for dtype in [DType::F32, DType::Bf16] {
        checks.extend(prompt_scoring(&dir, dtype)?);
    }
    for qwen2 in [false, true] {
        write_tiny_model(&dir, qwen2)?;
        checks.extend(crate::parallel_checks::same_gpu_ranks(&dir, qwen2)?);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(checks)
}

/// Tolerance of a kernel's relative error in `dtype`.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::Bf16 => 1e-2,
    }
}

struct KernelBench<'a> {
    gpu: &'a Gpu,
    dtype: DType,
}

impl KernelBench<'_> {
    /// Uploads values in the device dtype; returns them as the device holds them.
    fn upload(&self, values: &[f32]) -> anyhow::Result<(DeviceBuffer, Vec<f32>)> {
        Ok(match self.dtype {
            DType::F32 => (self.gpu.upload(values)?, values.to_vec()),
            DType::Bf16 => {
                let bits: Vec<u16> = values
                    .iter()
                    .map(|&v| bf16::from_f32(v).to_bits())
                    .collect();
                let rounded = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
                (self.gpu.upload(&bits)?, rounded)
            }
        })
    }

    fn read(&self, buffer: &DeviceBuffer, n: usize) -> anyhow::Result<Vec<f32>> {
        Ok(match self.dtype {
            DType::F32 => {
                let mut out = vec![0f32; n];
                self.gpu.read(buffer, &mut out)?;
                out
            }
            DType::Bf16 => {
                let mut out = vec![0u16; n];
                self.gpu.read(buffer, &mut out)?;
                out.into_iter()
                    .map(|b| bf16::from_bits(b).to_f32())
                    .collect()
            }
        })
    }

    fn alloc(&self, n: usize) -> anyhow::Result<DeviceBuffer> {
        self.gpu.alloc(n * self.dtype.size_in_bytes())
    }
}

/// Each sequence's tokens and prompt length, as the scheduler would give them.
pub(crate) struct History(pub(crate) HashMap<RequestId, (Vec<TokenId>, usize)>);

impl SequenceTokens for History {
    fn sequence_tokens(&self, id: RequestId) -> &[TokenId] {
        self.0.get(&id).map_or(&[], |h| &h.0)
    }
    fn prompt_len(&self, id: RequestId) -> usize {
        self.0.get(&id).map_or(0, |h| h.1)
    }
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..Default::default()
    }
}

fn seq(id: RequestId, tokens: Vec<TokenId>, start: usize, table: &[u32]) -> ScheduledSeq {
    ScheduledSeq {
        id,
        tokens,
        start_position: start,
        block_table: table.to_vec(),
        needs_logits: true,
        sampling: greedy(),
        prompt_logprobs: None,
        num_generated: 0,
        last_token_pending: false,
    }
}
