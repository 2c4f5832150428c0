//! Checks of tensor parallelism on GPUs: the model split over ranks against the same model
//! on one rank (teacher-forced logits, greedy tokens through the device sampler, prompt
//! log-probabilities, CUDA graphs against direct launches), and NCCL's all-reduce, the
//! logits gather and the peer-to-peer all-reduce on their own.
//!
//! With one GPU the ranks all run on it (`RankPlacement::AllOnFirstGpu`): that checks
//! every shard's arithmetic and the order of the collectives, not NCCL's transport, which
//! needs a GPU per rank. `heddle-cuda tensor-parallel` runs the same comparisons at a real
//! shape, on one GPU or over NCCL.

use std::path::Path;

use anyhow::Context;

use half::bf16;
use heddle_core::TokenId;
use heddle_model::ModelConfig;

use crate::bench::random_prompt;
use crate::collective::{Collective, Part};
use crate::gpu::{capture_graphs, DeviceBuffer, Gpu};
use crate::kernels::{DType, KernelShape, KvCacheDtype};
use crate::peer_sums::{PeerSums, Slot};
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

/// Eight prompts of different lengths, all there from the first step, greedy through the
/// scheduler with each step queued behind the one in flight and one step at a time, on
/// one runner at `options` (16 sequences and 2048 tokens a step at most): how many tokens
/// differ, of how many. With every request admitted at once, both ways run the same
/// batches, so the tokens must be identical in any mode: what is checked is that a token
/// sampled by one step reaches the next one's input on the GPUs.
pub fn overlapped_against_single(
    config: &ModelConfig,
    source: &WeightSource,
    options: CudaOptions,
) -> anyhow::Result<(usize, usize)> {
    let prompts: Vec<(usize, Vec<TokenId>)> = (0..8)
        .map(|i| {
            (
                0,
                random_prompt(40 + 29 * i, config.vocab_size, 70 + i as u64),
            )
        })
        .collect();
    let options = CudaOptions {
        max_batched_tokens: 2048,
        max_running: 16,
        kv: KvBudget::Blocks(512),
        ..options
    };
    let mut runner = CudaRunner::new(config.clone(), source, options)?;
    let overlapped: Vec<TokenId> = selftest::generate_stepping(&mut runner, &prompts, 24, true)?
        .into_iter()
        .flatten()
        .collect();
    let single: Vec<TokenId> = selftest::generate_stepping(&mut runner, &prompts, 24, false)?
        .into_iter()
        .flatten()
        .collect();
    let differing = overlapped
        .iter()
        .zip(&single)
        .filter(|(a, b)| a != b)
        .count()
        + overlapped.len().abs_diff(single.len());
    Ok((differing, single.len()))
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
        ..TensorParallel::default()
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
    let (differing, tokens, captured) = graphs_against_launches(&config, &source, options.clone())?;
    let (overlap_differing, overlap_tokens) = overlapped_against_single(&config, &source, options)?;
    checks.push(Check {
        name: format!(
            "tensor parallel, 2 ranks on one GPU, {model} bf16: greedy tokens differing \
             with vs without overlapped steps (of {overlap_tokens})"
        ),
        error: overlap_differing as f64,
        limit: Some(0.0),
    });
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
        ..TensorParallel::default()
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
                let graphs =
                    capture_graphs(&gpu_refs, || collective.all_reduce_sum(&parts, n, dtype))?;
                // One rank's in-place sum is nothing to do, and its capture is empty.
                for graph in graphs.into_iter().flatten() {
                    graph.launch()?;
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
    if ranks > 1 && placement == RankPlacement::OneGpuEach {
        checks.extend(peer_checks(&gpu_refs)?);
        checks.extend(all_reduce_timings(&gpu_refs, &collective)?);
    }
    Ok(checks)
}

/// The peer-to-peer all-reduce fused with the norm (peer_sums.rs), one rank per GPU of
/// `gpus`, bf16, at a 70B-wide row (8192: two chunks a thread) and more rows than blocks
/// (blocks take several rows). Rank r's partials are (r + 1) × small integers, so every
/// sum is exact: the residual must equal the CPU's sum exactly, every rank's, and the
/// normed rows must match the CPU's norm of it within bf16 rounding. In turn: a layer sum
/// launched directly; a CUDA graph of two layer sums (the MLP slot, then the attention
/// slot) replayed three times, whose block counters must keep agreeing; the embedding's
/// sum (f32 partials, replacing the residual); and a sum of listed rows, not written back.
fn peer_checks(gpus: &[&Gpu]) -> anyhow::Result<Vec<Check>> {
    let (rows, hidden) = (300usize, 8192usize);
    let n = rows * hidden;
    let peer = PeerSums::new(gpus, hidden, rows, DType::Bf16)?
        .context("the peer-to-peer all-reduce is not available between these GPUs")?;
    let label = format!("peer-to-peer, {} ranks", gpus.len());
    let ranks = gpus.len();
    let total = (ranks * (ranks + 1) / 2) as f32;
    let small =
        |seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + seed) % 9) as f32 - 4.0).collect() };
    let (attention, mlp, embedding) = (small(1), small(2), small(3));
    let weight: Vec<f32> = (0..hidden).map(|i| 0.5 + (i % 7) as f32 / 8.0).collect();
    let base: Vec<f32> = (0..n).map(|i| (i % 5) as f32 - 2.0).collect();
    let mut residuals = Vec::with_capacity(ranks);
    let (mut weights, mut outs) = (Vec::new(), Vec::new());
    for (rank, gpu) in gpus.iter().enumerate() {
        let scaled = |v: &[f32]| -> Vec<f32> { v.iter().map(|x| x * (rank + 1) as f32).collect() };
        write_at(
            gpu,
            peer.partial(rank, Slot::Attention),
            &bf16_bits(&scaled(&attention)),
        )?;
        write_at(
            gpu,
            peer.partial(rank, Slot::Mlp),
            &bf16_bits(&scaled(&mlp)),
        )?;
        // The embedding: each row's values on one rank only, as a vocabulary slice gives.
        let embedded: Vec<f32> = embedding
            .iter()
            .enumerate()
            .map(|(i, &x)| if (i / hidden) % ranks == rank { x } else { 0.0 })
            .collect();
        write_at(gpu, peer.partial(rank, Slot::Embedding), &embedded)?;
        residuals.push(gpu.upload(&base)?);
        weights.push(gpu.upload(&bf16_bits(&weight))?);
        outs.push(gpu.alloc(n * 2)?);
    }
    let eps = 1e-5f32;
    let call = |slot: Slot, list: &[Option<DeviceBuffer>], count: usize| -> anyhow::Result<()> {
        for (rank, gpu) in gpus.iter().enumerate() {
            let rows_ptr = list.get(rank).and_then(|l| l.as_ref()).map_or(0, |l| l.ptr);
            peer.sum_rmsnorm(
                gpu,
                rank,
                slot,
                residuals[rank].ptr,
                weights[rank].ptr,
                outs[rank].ptr,
                rows_ptr,
                count,
                eps,
                rows_ptr == 0,
            )?;
        }
        Ok(())
    };
    let mut checks = Vec::new();
    let mut expected = base.clone();
    let mut check_phase =
        |what: &str, expected: &[f32], source_rows: &[usize]| -> anyhow::Result<()> {
            let mut worst_residual = 0f64;
            let mut worst_norm = 0f64;
            let reference = rmsnorm_rows(expected, &weight, hidden, source_rows, eps);
            for (rank, gpu) in gpus.iter().enumerate() {
                let got = download(gpu, &residuals[rank], n, DType::F32)?;
                worst_residual = worst_residual.max(max_abs_difference(&got, expected));
                let normed = download(gpu, &outs[rank], source_rows.len() * hidden, DType::Bf16)?;
                worst_norm = worst_norm.max(relative_error(&normed, &reference));
            }
            checks.extend(sum_checks(
                &format!("{label}: {what}: residual (the all-reduce)"),
                worst_residual,
                &format!("{label}: {what}"),
                worst_norm,
            ));
            Ok(())
        };
    let every_row: Vec<usize> = (0..rows).collect();

    call(Slot::Attention, &[], rows)?;
    add_scaled(&mut expected, &attention, total);
    check_phase(
        &format!("{rows} rows x {hidden}, direct"),
        &expected,
        &every_row,
    )?;

    let graphs = capture_graphs(gpus, || {
        call(Slot::Mlp, &[], rows).and_then(|_| call(Slot::Attention, &[], rows))
    })?
    .into_iter()
    .map(|g| g.context("an empty capture"))
    .collect::<anyhow::Result<Vec<_>>>()?;
    for _ in 0..3 {
        for graph in &graphs {
            graph.launch()?;
        }
        add_scaled(&mut expected, &mlp, total);
        add_scaled(&mut expected, &attention, total);
    }
    check_phase(
        "two sums from a CUDA graph, replayed 3 times",
        &expected,
        &every_row,
    )?;

    call(Slot::Embedding, &[], rows)?;
    expected.clone_from(&embedding);
    check_phase(
        "the embedding's sum (f32, replacing the residual)",
        &expected,
        &every_row,
    )?;

    let listed = [299usize, 0, 131, 132, 7];
    let lists = gpus
        .iter()
        .map(|gpu| {
            let words: Vec<i32> = listed.iter().map(|&r| r as i32).collect();
            gpu.upload(&words).map(Some)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    call(Slot::Mlp, &lists, listed.len())?;
    // Not written back: the residual stays, and the listed rows are normed with the sum.
    let mut with_mlp = expected.clone();
    add_scaled(&mut with_mlp, &mlp, total);
    let reference = rmsnorm_rows(&with_mlp, &weight, hidden, &listed, eps);
    let mut worst_residual = 0f64;
    let mut worst_norm = 0f64;
    for (rank, gpu) in gpus.iter().enumerate() {
        let got = download(gpu, &residuals[rank], n, DType::F32)?;
        worst_residual = worst_residual.max(max_abs_difference(&got, &expected));
        let normed = download(gpu, &outs[rank], listed.len() * hidden, DType::Bf16)?;
        worst_norm = worst_norm.max(relative_error(&normed, &reference));
    }
    checks.extend(sum_checks(
        &format!("{label}: listed rows, not written back: residual unchanged"),
        worst_residual,
        &format!("{label}: listed rows, not written back"),
        worst_norm,
    ));
    checks.push(greedy_check(gpus, &peer, rows)?);
    Ok(checks)
}

/// Greedy sampling over vocabulary slices (`PeerSums::greedy`) against the arg-max of the
/// whole rows on the CPU, by the sampler's rule (larger value, then lower id; NaN never
/// wins): `rows` rows of small integers, so that ties within and across slices are common,
/// plus a row of -inf, one of NaN but for one token, and one all NaN (no token: -1).
/// Returns the count of rows whose token differs.
fn greedy_check(gpus: &[&Gpu], peer: &PeerSums, rows: usize) -> anyhow::Result<Check> {
    let (ranks, slice) = (gpus.len(), 1000usize);
    let vocab = ranks * slice;
    let mut whole: Vec<f32> = crate::xorshift::xorshift64(17)
        .take(rows * vocab)
        .map(|x| (x % 13) as f32)
        .collect();
    whole[..vocab].fill(f32::NEG_INFINITY);
    whole[vocab..2 * vocab].fill(f32::NAN);
    whole[vocab + vocab - 3] = -5.0;
    whole[2 * vocab..3 * vocab].fill(f32::NAN);
    let expected: Vec<i32> = whole
        .chunks_exact(vocab)
        .map(|row| {
            let mut best: Option<(f32, usize)> = None;
            for (i, &v) in row.iter().enumerate() {
                if !v.is_nan() && best.is_none_or(|(b, _)| v > b) {
                    best = Some((v, i));
                }
            }
            best.map_or(-1, |(_, i)| i as i32)
        })
        .collect();
    let out = gpus[0].alloc(rows * 4)?;
    let slices = gpus
        .iter()
        .enumerate()
        .map(|(rank, gpu)| {
            let mine: Vec<f32> = whole
                .chunks_exact(vocab)
                .flat_map(|row| &row[rank * slice..(rank + 1) * slice])
                .copied()
                .collect();
            gpu.upload(&mine)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Twice, so that the second call's barrier follows the first's.
    for _ in 0..2 {
        for (rank, (gpu, logits)) in gpus.iter().zip(&slices).enumerate() {
            let to = if rank == 0 { out.ptr } else { 0 };
            peer.greedy(gpu, rank, logits.ptr, slice, rank * slice, to, rows)?;
        }
    }
    let mut got = vec![0i32; rows];
    gpus[0].read(&out, &mut got)?;
    for gpu in &gpus[1..] {
        gpu.bind()?;
        gpu.stream.synchronize()?;
    }
    let differing = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
    Ok(Check {
        name: format!(
            "peer-to-peer, {ranks} ranks: greedy tokens over {rows} rows of {ranks} x {slice} \
             logits slices differing from the whole rows' arg-max"
        ),
        error: differing as f64,
        limit: Some(0.0),
    })
}

/// Microseconds per all-reduce of one decode row (4096 bf16, the 8B shape's) replayed from
/// a CUDA graph of 64: NCCL followed by the norm, against the peer-to-peer sum fused with
/// it. Reported, not judged.
fn all_reduce_timings(gpus: &[&Gpu], collective: &Collective) -> anyhow::Result<Vec<Check>> {
    let (hidden, calls, replays) = (4096usize, 64usize, 50usize);
    let peer = PeerSums::new(gpus, hidden, 1, DType::Bf16)?
        .context("the peer-to-peer all-reduce is not available between these GPUs")?;
    let buffers = gpus
        .iter()
        .map(|gpu| -> anyhow::Result<[DeviceBuffer; 4]> {
            Ok([
                gpu.alloc(hidden * 4)?,
                gpu.alloc(hidden * 2)?,
                gpu.upload(&bf16_bits(&vec![1.0; hidden]))?,
                gpu.alloc(hidden * 2)?,
            ])
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let time = |queue: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        let graphs = capture_graphs(gpus, || (0..calls).try_for_each(|_| queue()))?
            .into_iter()
            .map(|g| g.context("an empty capture"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut best = f64::INFINITY;
        for _ in 0..replays {
            let started = std::time::Instant::now();
            for graph in &graphs {
                graph.launch()?;
            }
            for gpu in gpus {
                gpu.bind()?;
                gpu.stream.synchronize()?;
            }
            best = best.min(started.elapsed().as_secs_f64());
        }
        Ok(best * 1e6 / calls as f64)
    };
    let nccl = time(&|| {
        let parts: Vec<Part> = gpus
            .iter()
            .zip(&buffers)
            .map(|(gpu, b)| Part { gpu, ptr: b[1].ptr })
            .collect();
        collective.all_reduce_sum(&parts, hidden, DType::Bf16)?;
        for (gpu, [residual, projected, weight, out]) in gpus.iter().zip(&buffers) {
            gpu.launch(
                "add_rmsnorm",
                crate::gpu::grid(1, 1024),
                &[
                    &residual.ptr,
                    &projected.ptr,
                    &weight.ptr,
                    &out.ptr,
                    &0u64,
                    &(hidden as i32),
                    &1e-5f32,
                    &1i32,
                ],
            )?;
        }
        Ok(())
    })?;
    let peer_to_peer = time(&|| {
        for (rank, (gpu, [residual, _, weight, out])) in gpus.iter().zip(&buffers).enumerate() {
            peer.sum_rmsnorm(
                gpu,
                rank,
                Slot::Attention,
                residual.ptr,
                weight.ptr,
                out.ptr,
                0,
                1,
                1e-5,
                true,
            )?;
        }
        Ok(())
    })?;
    Ok(vec![
        Check {
            name: format!(
                "{} ranks: microseconds per all-reduce + norm of one {hidden}-wide bf16 row, NCCL",
                gpus.len()
            ),
            error: nccl,
            limit: None,
        },
        Check {
            name: format!(
                "{} ranks: microseconds per all-reduce + norm of one {hidden}-wide bf16 row, \
                 peer-to-peer fused",
                gpus.len()
            ),
            error: peer_to_peer,
            limit: None,
        },
    ])
}

/// values += scale × add.
fn add_scaled(values: &mut [f32], add: &[f32], scale: f32) {
    for (v, a) in values.iter_mut().zip(add) {
        *v += scale * a;
    }
}

/// RMSNorm (f64) of `source_rows` of `values` ([rows][hidden]) by `weight`.
fn rmsnorm_rows(
    values: &[f32],
    weight: &[f32],
    hidden: usize,
    source_rows: &[usize],
    eps: f32,
) -> Vec<f32> {
    source_rows
        .iter()
        .flat_map(|&row| {
            let x = &values[row * hidden..(row + 1) * hidden];
            let mean_square = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / hidden as f64;
            let scale = 1.0 / (mean_square + eps as f64).sqrt();
            x.iter()
                .zip(weight)
                .map(move |(&v, &w)| (v as f64 * scale * w as f64) as f32)
        })
        .collect()
}

fn bf16_bits(values: &[f32]) -> Vec<u16> {
    values
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect()
}

/// Copies `data` to `ptr` on `gpu` and waits.
fn write_at<T: cudarc::driver::DeviceRepr>(gpu: &Gpu, ptr: u64, data: &[T]) -> anyhow::Result<()> {
    gpu.bind()?;
    // SAFETY: the caller passes an allocation on `gpu` that holds `data`.
    unsafe { cudarc::driver::result::memcpy_htod_async(ptr, data, gpu.stream.cu_stream()) }?;
    gpu.stream.synchronize()?;
    Ok(())
}

fn upload(gpu: &Gpu, values: &[f32], dtype: DType) -> anyhow::Result<DeviceBuffer> {
    match dtype {
        DType::F32 => gpu.upload(values),
        DType::Bf16 => gpu.upload(&bf16_bits(values)),
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

/// The two checks of a fused sum: the residual exact (`residual`: what it is, its worst
/// absolute error), the normed rows within bf16 rounding (`normed`: whose rows).
fn sum_checks(residual: &str, residual_error: f64, normed: &str, norm_error: f64) -> [Check; 2] {
    [
        Check {
            name: format!("{residual} max abs error"),
            error: residual_error,
            limit: Some(0.0),
        },
        Check {
            name: format!("{normed}: normed rows relative error"),
            error: norm_error,
            limit: Some(5e-3),
        },
    ]
}
