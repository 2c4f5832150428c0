//! Checks of tensor parallelism on GPUs: the model split over ranks against the same model
//! on one rank (teacher-forced logits, greedy tokens through the device sampler, prompt
//! log-probabilities, CUDA graphs against direct launches), and NCCL's all-reduce and the
//! logits gather on their own.
//!
//! With one GPU the ranks all run on it (`RankPlacement::AllOnFirstGpu`): that checks
//! every shard's arithmetic and the order of the collectives, not NCCL's transport, which
//! needs a GPU per rank. `heddle-cuda tensor-parallel` runs the same comparisons at a real
//! shape, on one GPU or over NCCL.

use std::path::Path;

use half::bf16;
use heddle_core::TokenId;
use heddle_model::ModelConfig;

use crate::bench::random_prompt;
use crate::collective::{Collective, Part};
use crate::gpu::{DeviceBuffer, Gpu};
use crate::kernels::{DType, KernelShape, KvCacheDtype};
use crate::reference::{self, Job};
use crate::runner::{CudaOptions, CudaRunner, KvBudget, WeightSource};
use crate::selftest::{self, relative_error, Check};
use crate::tensor_parallel::{RankPlacement, TensorParallel};

/// The same model on one rank and split over several: how far apart their results are.
#[derive(Debug, Clone)]
pub struct RankComparison {
    /// Greedy tokens generated through the device sampler, and how many differ.
    pub tokens: usize,
    pub tokens_differing: usize,
    /// Over every teacher-forced logit: the largest |Δ|, and ‖Δ‖ / ‖one rank's logits‖.
    pub max_abs_error: f64,
    pub relative_error: f64,
}

/// Runs `job` (reference.rs: prefill chunks of several prompts, teacher-forced decode
/// positions, then greedy tokens through the sampler, decode steps from CUDA graphs) on
/// `parallel`'s ranks.
pub fn run_job(
    config: &ModelConfig,
    source: &WeightSource,
    dtype: DType,
    parallel: TensorParallel,
    job: &Job,
) -> anyhow::Result<reference::Output> {
    let block_size = 16;
    let options = CudaOptions {
        dtype,
        block_size,
        max_batched_tokens: job.max_step_tokens(),
        max_running: job.prompts.len().next_power_of_two(),
        kv: KvBudget::Blocks(job.blocks_needed(block_size)),
        tensor_parallel: parallel,
        ..CudaOptions::default()
    };
    let mut runner = CudaRunner::new(config.clone(), source, options)?;
    reference::run(&mut runner, job)
}

/// How far `split`'s results are from `one`'s.
pub fn compare(one: &reference::Output, split: &reference::Output) -> RankComparison {
    let (one_tokens, split_tokens): (Vec<_>, Vec<_>) = (
        one.greedy.iter().flatten().collect(),
        split.greedy.iter().flatten().collect(),
    );
    RankComparison {
        tokens: one_tokens.len(),
        tokens_differing: one_tokens
            .iter()
            .zip(&split_tokens)
            .filter(|(a, b)| a != b)
            .count()
            + one_tokens.len().abs_diff(split_tokens.len()),
        max_abs_error: max_abs_difference(&split.logits, &one.logits),
        relative_error: relative_error(&split.logits, &one.logits),
    }
}

/// `job` on one rank, then on `parallel`'s ranks, with the same weights, compared.
pub fn compare_with_one_rank(
    config: &ModelConfig,
    source: &WeightSource,
    dtype: DType,
    parallel: TensorParallel,
    job: &Job,
) -> anyhow::Result<RankComparison> {
    let one = run_job(config, source, dtype, TensorParallel::default(), job)?;
    let split = run_job(config, source, dtype, parallel, job)?;
    Ok(compare(&one, &split))
}

/// Three prompts of random tokens below `vocab` (`lengths`), each teacher-forced over its
/// last 8 positions after prefill chunks of `chunk`, then 16 greedy tokens.
pub fn random_job(vocab: usize, lengths: [usize; 3], chunk: usize) -> Job {
    Job {
        prompts: lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| random_prompt(len, vocab, 70 + i as u64))
            .collect(),
        teacher_from: lengths.iter().map(|len| len - 8).collect(),
        generate: 16,
        chunk,
    }
}

/// Eight prompts arriving a step apart, 32 greedy tokens each through the scheduler, with
/// decode steps replayed as CUDA graphs and launched directly, both at `options` (16
/// sequences and 2048 tokens a step at most): how many tokens differ, of how many, and how
/// many decode layouts the first runner captured as graphs.
pub fn graphs_against_launches(
    config: &ModelConfig,
    source: &WeightSource,
    options: CudaOptions,
) -> anyhow::Result<(usize, usize, usize)> {
    let prompts: Vec<(usize, Vec<TokenId>)> = (0..8)
        .map(|i| {
            let prompt = random_prompt(100 + 13 * i, config.vocab_size, 50 + i as u64);
            (i, prompt)
        })
        .collect();
    let options = CudaOptions {
        max_batched_tokens: 2048,
        max_running: 16,
        kv: KvBudget::Blocks(512),
        cuda_graphs: true,
        ..options
    };
    let mut with_graphs = CudaRunner::new(config.clone(), source, options.clone())?;
    let replayed = selftest::generate(&mut with_graphs, &prompts, 32)?;
    let captured = with_graphs.captured_graphs();
    drop(with_graphs);
    let mut direct = CudaRunner::new(
        config.clone(),
        source,
        CudaOptions {
            cuda_graphs: false,
            ..options
        },
    )?;
    let launched = selftest::generate(&mut direct, &prompts, 32)?;
    let (replayed, launched): (Vec<_>, Vec<_>) = (
        replayed.into_iter().flatten().collect(),
        launched.into_iter().flatten().collect(),
    );
    let differing = replayed
        .iter()
        .zip(&launched)
        .filter(|(a, b)| a != b)
        .count()
        + replayed.len().abs_diff(launched.len());
    Ok((differing, replayed.len(), captured))
}

/// The self-test's tensor-parallel checks on the small random checkpoint in `dir` (Llama
/// with tied embeddings, or Qwen2 with biases and its own head): two ranks on this GPU
/// against one, in f32 (greedy tokens identical) and bf16 (within bf16 rounding).
pub fn same_gpu_ranks(dir: &Path, qwen2: bool) -> anyhow::Result<Vec<Check>> {
    let config = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let source = WeightSource::Checkpoint(dir.to_path_buf());
    let parallel = TensorParallel {
        size: 2,
        placement: RankPlacement::AllOnFirstGpu,
    };
    let model = if qwen2 { "qwen2" } else { "llama" };
    let job = random_job(config.vocab_size, [45, 29, 60], 8);
    let mut checks = Vec::new();
    for dtype in [DType::F32, DType::Bf16] {
        let (tag, exact) = match dtype {
            DType::F32 => ("f32", true),
            DType::Bf16 => ("bf16", false),
        };
        let name = format!("tensor parallel, 2 ranks on one GPU vs 1 rank, {model} {tag}");
        let c = compare_with_one_rank(&config, &source, dtype, parallel, &job)?;
        let scoring = scoring_against_one_rank(&config, &source, dtype, parallel, &job)?;
        checks.extend([
            Check {
                name: format!("{name}: logits relative error"),
                error: c.relative_error,
                limit: Some(if exact { 1e-4 } else { 3e-2 }),
            },
            Check {
                name: format!("{name}: logits max abs error"),
                error: c.max_abs_error,
                limit: None,
            },
            Check {
                name: format!("{name}: greedy tokens differing (of {})", c.tokens),
                error: c.tokens_differing as f64,
                // bf16 rounding may flip a near-tie: reported, not a check.
                limit: exact.then_some(0.0),
            },
            Check {
                name: format!("{name}: prompt log-probabilities, max abs error"),
                error: scoring,
                limit: exact.then_some(1e-4),
            },
        ]);
    }
    let options = CudaOptions {
        tensor_parallel: parallel,
        ..CudaOptions::default()
    };
    let (differing, tokens, captured) = graphs_against_launches(&config, &source, options)?;
    checks.extend([
        Check {
            name: format!(
                "tensor parallel, 2 ranks on one GPU, {model} bf16: greedy tokens differing \
                 with vs without graph replay (of {tokens})"
            ),
            error: differing as f64,
            limit: Some(0.0),
        },
        Check {
            name: format!(
                "tensor parallel, 2 ranks on one GPU, {model} bf16: decode layouts captured \
                 as graphs ({captured}), none is a failure"
            ),
            error: (captured == 0) as u8 as f64,
            limit: Some(0.0),
        },
    ]);
    Ok(checks)
}

/// The prompt log-probabilities of the job's first prompt (scored in chunks of 8, top 3)
/// on one rank and on `parallel`'s: the largest |Δ|.
fn scoring_against_one_rank(
    config: &ModelConfig,
    source: &WeightSource,
    dtype: DType,
    parallel: TensorParallel,
    job: &Job,
) -> anyhow::Result<f64> {
    let score = |tensor_parallel| -> anyhow::Result<Vec<f32>> {
        let options = CudaOptions {
            dtype,
            max_batched_tokens: 256,
            max_running: 16,
            kv: KvBudget::Blocks(256),
            tensor_parallel,
            ..CudaOptions::default()
        };
        let mut runner = CudaRunner::new(config.clone(), source, options)?;
        let driven = selftest::drive(&mut runner, &job.prompts[0], 0, Some(3), 0, 8)?;
        Ok(driven.scored.iter().map(|s| s.logprob).collect())
    };
    let (one, split) = (score(TensorParallel::default())?, score(parallel)?);
    anyhow::ensure!(
        one.len() == split.len() && !one.is_empty(),
        "scored {} prompt tokens on one rank, {} on several",
        one.len(),
        split.len()
    );
    Ok(max_abs_difference(&split, &one))
}

/// NCCL on its own, with `ranks` communicators placed as `placement` says (NCCL refuses
/// two ranks on one GPU; the error says so): rank r's buffer holds (r + 1) × v, with v
/// small integers so that every sum is exact; after the all-reduce every rank must hold
/// Σ (r + 1) × v, in f32 and bf16, queued directly and replayed from captured CUDA graphs.
/// Then the logits gather: rank r's [rows][columns] block must land in columns
/// [r·columns, (r+1)·columns) of rank 0's whole matrix.
pub fn nccl_checks(ranks: usize, placement: RankPlacement) -> anyhow::Result<Vec<Check>> {
    let ordinals = TensorParallel {
        size: ranks,
        placement,
    }
    .devices(crate::gpu::device_count()?)?;
    // Any shape compiles the kernels; these checks use none of the model's.
    let shape = KernelShape {
        head_dim: 64,
        num_heads: 8,
        num_kv_heads: 2,
        block_size: 16,
        dtype: DType::Bf16,
        kv_cache: KvCacheDtype::Auto,
    };
    let gpus = ordinals
        .iter()
        .map(|&o| Gpu::on_device(o, &shape))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let gpu_refs: Vec<&Gpu> = gpus.iter().collect();
    let (rows, columns) = (5usize, 300usize);
    let collective = Collective::nccl(&gpu_refs, (ranks - 1) * rows * columns * 4)?;
    let label = format!("NCCL, {ranks} rank(s) on GPUs {ordinals:?}");
    let mut checks = Vec::new();

    let n = 1_000_003usize;
    let v: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
    let total = (ranks * (ranks + 1) / 2) as f32;
    let expected: Vec<f32> = v.iter().map(|x| x * total).collect();
    for dtype in [DType::F32, DType::Bf16] {
        for graph in [false, true] {
            let buffers = gpus
                .iter()
                .enumerate()
                .map(|(r, gpu)| {
                    let values: Vec<f32> = v.iter().map(|x| x * (r + 1) as f32).collect();
                    upload(gpu, &values, dtype)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let parts: Vec<Part> = gpus
                .iter()
                .zip(&buffers)
                .map(|(gpu, b)| Part { gpu, ptr: b.ptr })
                .collect();
            if graph {
                let mut captured = Vec::new();
                for gpu in &gpus {
                    gpu.stream
                        .begin_capture(crate::gpu::capture_mode(gpus.len()))?;
                }
                let queued = collective.all_reduce_sum(&parts, n, dtype);
                for gpu in &gpus {
                    captured.push(
                        gpu.stream
                            .end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0)),
                    );
                }
                queued?;
                // One rank's in-place sum is nothing to do, and its capture is empty.
                for graph in captured.into_iter().filter_map(Result::transpose) {
                    graph?.launch()?;
                }
            } else {
                collective.all_reduce_sum(&parts, n, dtype)?;
            }
            let mut worst = 0f64;
            for (gpu, buffer) in gpus.iter().zip(&buffers) {
                let got = download(gpu, buffer, n, dtype)?;
                worst = worst.max(max_abs_difference(&got, &expected));
            }
            checks.push(Check {
                name: format!(
                    "{label}: all-reduce of {n} {} values{}, max abs error",
                    match dtype {
                        DType::F32 => "f32",
                        DType::Bf16 => "bf16",
                    },
                    if graph { " from a CUDA graph" } else { "" }
                ),
                error: worst,
                limit: Some(0.0),
            });
        }
    }

    let slices = gpus
        .iter()
        .enumerate()
        .map(|(r, gpu)| {
            let values: Vec<f32> = (0..rows * columns)
                .map(|i| (r * 100_000 + i) as f32)
                .collect();
            gpu.upload(&values)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let whole = gpus[0].alloc(rows * ranks * columns * 4)?;
    let parts: Vec<Part> = gpus
        .iter()
        .zip(&slices)
        .map(|(gpu, b)| Part { gpu, ptr: b.ptr })
        .collect();
    collective.gather_columns(&parts, whole.ptr, rows, columns)?;
    let mut got = vec![0f32; rows * ranks * columns];
    gpus[0].read(&whole, &mut got)?;
    for gpu in &gpus[1..] {
        gpu.bind()?;
        gpu.stream.synchronize()?;
    }
    let expected: Vec<f32> = (0..rows)
        .flat_map(|row| {
            (0..ranks).flat_map(move |r| {
                (0..columns).map(move |c| (r * 100_000 + row * columns + c) as f32)
            })
        })
        .collect();
    checks.push(Check {
        name: format!("{label}: logits gather of {rows} x {columns} per rank, max abs error"),
        error: max_abs_difference(&got, &expected),
        limit: Some(0.0),
    });
    Ok(checks)
}

fn upload(gpu: &Gpu, values: &[f32], dtype: DType) -> anyhow::Result<DeviceBuffer> {
    match dtype {
        DType::F32 => gpu.upload(values),
        DType::Bf16 => {
            let bits: Vec<u16> = values
                .iter()
                .map(|&v| bf16::from_f32(v).to_bits())
                .collect();
            gpu.upload(&bits)
        }
    }
}

fn download(gpu: &Gpu, buffer: &DeviceBuffer, n: usize, dtype: DType) -> anyhow::Result<Vec<f32>> {
    Ok(match dtype {
        DType::F32 => {
            let mut out = vec![0f32; n];
            gpu.read(buffer, &mut out)?;
            out
        }
        DType::Bf16 => {
            let mut out = vec![0u16; n];
            gpu.read(buffer, &mut out)?;
            out.into_iter()
                .map(|b| bf16::from_bits(b).to_f32())
                .collect()
        }
    })
}

/// The largest |a − b|, infinite when anything is NaN.
fn max_abs_difference(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, |worst, d| {
            if d.is_nan() {
                f64::INFINITY
            } else {
                worst.max(d)
            }
        })
}
