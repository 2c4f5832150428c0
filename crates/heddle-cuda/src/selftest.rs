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
    for qwen2 in [false, true] {
        write_tiny_model(&dir, qwen2)?;
        for dtype in [DType::F32, DType::Bf16] {
            checks.extend(runner_vs_cpu(
                &dir,
                dtype,
                qwen2,
                Quantization::None,
                KvCacheDtype::Auto,
            )?);
        }
        if fp8 {
            checks.extend(runner_vs_cpu(
                &dir,
                DType::Bf16,
                qwen2,
                Quantization::None,
                KvCacheDtype::Fp8,
            )?);
        }
        if fp8 {
            checks.extend(runner_vs_cpu(
                &dir,
                DType::Bf16,
                qwen2,
                Quantization::Fp8,
                KvCacheDtype::Auto,
            )?);
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

struct History(HashMap<RequestId, (Vec<TokenId>, usize)>);

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
    }
}

fn kernel_checks(dtype: DType) -> anyhow::Result<Vec<Check>> {
    let shape = KernelShape {
        head_dim: 64,
        num_heads: 8,
        num_kv_heads: 2,
        block_size: 16,
        dtype,
        kv_cache: KvCacheDtype::Auto,
    };
    let gpu = Gpu::new(&shape)?;
    let k = KernelBench { gpu: &gpu, dtype };
    let tag = match dtype {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
    };
    let mut checks = Vec::new();
    let mut check = |name: &str, error: f64, limit: f64| {
        checks.push(Check {
            name: format!("kernel {name} ({tag})"),
            error,
            limit: Some(limit),
        })
    };

    // RMSNorm fused with the residual add, 5 rows of 320.
    let (rows, h, eps) = (5usize, 320usize, 1e-5f32);
    let residual = random_values(rows * h, 1, 2.0);
    let (delta_buf, delta) = k.upload(&random_values(rows * h, 2, 1.0))?;
    let (weight_buf, weight) = k.upload(&random_values(h, 3, 1.0))?;
    let residual_buf = gpu.upload(&residual)?;
    let out_buf = k.alloc(rows * h)?;
    gpu.launch(
        "add_rmsnorm",
        grid(rows, 128),
        &[
            &residual_buf.ptr,
            &delta_buf.ptr,
            &weight_buf.ptr,
            &out_buf.ptr,
            &0u64,
            &(h as i32),
            &eps,
            &1i32,
        ],
    )?;
    let mut reference = Vec::new();
    let mut summed = Vec::new();
    for r in 0..rows {
        let x: Vec<f32> = (0..h)
            .map(|i| residual[r * h + i] + delta[r * h + i])
            .collect();
        let ms = x.iter().map(|v| (v * v) as f64).sum::<f64>() / h as f64;
        let scale = 1.0 / (ms as f32 + eps).sqrt();
        reference.extend(x.iter().zip(&weight).map(|(v, w)| v * scale * w));
        summed.extend(x);
    }
    check(
        "add_rmsnorm",
        relative_error(&k.read(&out_buf, rows * h)?, &reference),
        tolerance(dtype),
    );
    let mut written = vec![0f32; rows * h];
    gpu.read(&residual_buf, &mut written)?;
    check(
        "add_rmsnorm residual",
        relative_error(&written, &summed),
        tolerance(dtype),
    );

    // SiLU · mul over 3 rows of 200.
    let (rows, ffn) = (3usize, 200usize);
    let (gu_buf, gu) = k.upload(&random_values(rows * 2 * ffn, 4, 4.0))?;
    let act_buf = k.alloc(rows * ffn)?;
    gpu.launch(
        "silu_mul",
        grid(4, 256),
        &[
            &gu_buf.ptr,
            &act_buf.ptr,
            &(ffn as i32),
            &((rows * ffn) as i64),
        ],
    )?;
    let reference: Vec<f32> = (0..rows * ffn)
        .map(|i| {
            let (t, j) = (i / ffn, i % ffn);
            let g = gu[t * 2 * ffn + j];
            g / (1.0 + (-g).exp()) * gu[t * 2 * ffn + ffn + j]
        })
        .collect();
    check(
        "silu_mul",
        relative_error(&k.read(&act_buf, rows * ffn)?, &reference),
        tolerance(dtype),
    );

    // GEMM: [m × 96] · [150 × 96]ᵀ, in the dtype and with f32 output, at 7, 1 and 3 rows
    // (cuBLAS picks its kernel by shape: decode steps of one row get another).
    let (n, kk) = (150usize, 96usize);
    for m in [7usize, 1, 3] {
        let (x_buf, x) = k.upload(&random_values(m * kk, 5, 1.0))?;
        let (w_buf, w) = k.upload(&random_values(n * kk, 6, 1.0))?;
        let reference: Vec<f32> = (0..m * n)
            .map(|i| {
                let (r, c) = (i / n, i % n);
                (0..kk)
                    .map(|j| x[r * kk + j] as f64 * w[c * kk + j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let y_buf = gpu.alloc(m * n * 4)?;
        gpu.gemm(y_buf.ptr, true, x_buf.ptr, w_buf.ptr, m, n, kk)?;
        let mut y = vec![0f32; m * n];
        gpu.read(&y_buf, &mut y)?;
        check(
            &format!("gemm {m} rows (f32 out)"),
            relative_error(&y, &reference),
            tolerance(DType::F32) * 10.0,
        );
        let y_buf = k.alloc(m * n)?;
        gpu.gemm(y_buf.ptr, false, x_buf.ptr, w_buf.ptr, m, n, kk)?;
        check(
            &format!("gemm {m} rows"),
            relative_error(&k.read(&y_buf, m * n)?, &reference),
            tolerance(dtype),
        );
    }

    // RoPE + KV write + paged attention: a prefill of 37 tokens (several tiles), then a
    // decode token at position 37, over a shuffled block table.
    let (hd, nh, nkv, bs) = (64usize, 8usize, 2usize, 16usize);
    let qkv_w = (nh + 2 * nkv) * hd;
    let table = [5u32, 2, 7];
    let num_blocks = 8;
    let prefill = 37usize;
    let (qkv_buf, qkv) = k.upload(&random_values((prefill + 1) * qkv_w, 7, 1.0))?;
    let inv_freq: Vec<f64> = (0..hd / 2)
        .map(|i| 10_000f64.powf(-2.0 * i as f64 / hd as f64))
        .collect();
    let inv_freq_buf = gpu.upload(&inv_freq)?;
    let cache_len = num_blocks * bs * nkv * hd;
    let k_cache = k.alloc(cache_len)?;
    let v_cache = k.alloc(cache_len)?;
    let attn_buf = k.alloc((prefill + 1) * nh * hd)?;
    let history = History(HashMap::new());
    let scale = 1.0 / (hd as f32).sqrt();
    // Sized as the runner sizes it: splits keep blocks × ranges under 4 per multiprocessor.
    let partials = gpu.alloc(shape.decode_partial_words(4 * gpu.multiprocessors, 1) * 4)?;
    let mut outputs = Vec::new();
    for (start, count) in [(0usize, prefill), (prefill, 1)] {
        let batch = ScheduledBatch {
            seqs: vec![seq(1, vec![0; count], start, &table)],
            preempted: vec![],
        };
        let mut plan = StepPlan::default();
        plan.build(
            &batch,
            &history,
            bs,
            shape.tokens_per_tile(),
            shape.has_decode_kernel(),
            10,
            None,
        );
        let meta = gpu.upload(&plan.words)?;
        let at = |off: usize| meta.ptr + 4 * off as u64;
        let o = plan.offsets;
        let qkv_rows = qkv_buf.ptr + (start * qkv_w * dtype.size_in_bytes()) as u64;
        let out_rows = attn_buf.ptr + (start * nh * hd * dtype.size_in_bytes()) as u64;
        gpu.launch(
            "rope_kv_write",
            grid(count, 128),
            &[
                &qkv_rows,
                &0u64,
                &inv_freq_buf.ptr,
                &at(o.positions),
                &at(o.slots),
                &k_cache.ptr,
                &v_cache.ptr,
            ],
        )?;
        // Multi-token tiles go to the general kernel, single-token ones to the decode one
        // where the shape has it (bf16); the decode token also with its context split in 5
        // ranges (3 of them empty).
        let splits: &[Option<usize>] = match (count, shape.has_decode_kernel()) {
            (1, true) => &[Some(1), Some(5)],
            (1, false) => &[Some(1)],
            _ => &[None],
        };
        for &split in splits {
            launch_attention(
                &gpu,
                &shape,
                &AttentionArgs {
                    qkv: qkv_rows,
                    k_cache: k_cache.ptr,
                    v_cache: v_cache.ptr,
                    out: out_rows,
                    tiles: at(o.tiles),
                    num_tiles: plan.num_tiles,
                    num_decode_tiles: plan.num_decode_tiles,
                    block_tables: at(o.block_tables),
                    table_offsets: at(o.table_offsets),
                    scale,
                    partials: partials.ptr,
                    splits: split,
                },
            )?;
            outputs.push((split, k.read(&attn_buf, (prefill + 1) * nh * hd)?));
        }
    }
    let reference = attention_reference(&qkv, prefill + 1, nh, nkv, hd, &inv_freq);
    let split_at = prefill * nh * hd;
    for (split, out) in &outputs {
        let (name, range) = match split {
            None => ("prefill".to_string(), 0..split_at),
            Some(1) => ("decode".to_string(), split_at..out.len()),
            Some(n) => (
                format!("decode, context in {n} ranges"),
                split_at..out.len(),
            ),
        };
        check(
            &format!("rope_kv_write + attention, {name}"),
            relative_error(&out[range.clone()], &reference[range]),
            tolerance(dtype) * 2.0,
        );
    }

    // init_random: finite, centred, standard deviation about 0.02.
    let n = 1 << 20;
    let buf = k.alloc(n)?;
    gpu.launch(
        "init_random",
        grid(1024, 256),
        &[
            &buf.ptr,
            &(n as u64),
            &(n as u64),
            &(n as u64),
            &0u64,
            &42u64,
            &0f32,
            &0.049f32,
        ],
    )?;
    let values = k.read(&buf, n)?;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let std = (values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n as f64)
        .sqrt();
    let finite = values.iter().all(|v| v.is_finite());
    check(
        "init_random std vs 0.02",
        if finite {
            (std - 0.02).abs() / 0.02 + mean.abs()
        } else {
            f64::INFINITY
        },
        0.02,
    );

    checks.extend(sampler_checks(&gpu, tag)?);
    Ok(checks)
}

/// Decode attention over longer contexts than the kernel checks' (1 to 700 positions, six
/// sequences at once) at Llama 3 8B's head shape (head_dim 128, groups of 4) and at one
/// of head_dim 32 with a group of 8, whole and with the runner's context split; with an
/// FP8 cache, also through the general kernel (the one prefill chunks take).
fn decode_attention_checks(dtype: DType, kv_cache: KvCacheDtype) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (head_dim, num_heads, num_kv_heads) in [(128, 32, 8), (32, 8, 1)] {
        let shape = KernelShape {
            head_dim,
            num_heads,
            num_kv_heads,
            block_size: 16,
            dtype,
            kv_cache,
        };
        let gpu = Gpu::new(&shape)?;
        let case = DecodeCase::new(&gpu, &shape, &[1, 16, 17, 100, 333, 700], 11)?;
        let reference = case.reference(&gpu, &shape)?;
        let splits = crate::kernels::decode_splits(
            case.contexts.len() * shape.attention_grid_y(),
            gpu.multiprocessors,
        );
        // Without the decode kernel (f32) both would run the general kernel; None: the
        // general kernel itself.
        let variants: &[Option<Option<usize>>] = match (shape.has_decode_kernel(), kv_cache) {
            (false, _) => &[Some(Some(1))],
            (true, KvCacheDtype::Auto) => &[Some(Some(1)), Some(None)],
            (true, KvCacheDtype::Fp8) => &[Some(Some(1)), Some(None), None],
        };
        for &variant in variants {
            case.poison_output(&gpu)?;
            let ranges = match variant {
                Some(split) => {
                    case.launch(&gpu, &shape, split)?;
                    match split {
                        Some(1) => "whole".to_string(),
                        _ => format!("{splits} ranges"),
                    }
                }
                None => {
                    case.launch_general(&gpu, &shape)?;
                    "general kernel".to_string()
                }
            };
            checks.push(Check {
                name: format!(
                    "kernel decode attention, head_dim {head_dim}, {num_heads}/{num_kv_heads} \
                     heads, contexts 1-700, {ranges} ({}{})",
                    match dtype {
                        DType::F32 => "f32",
                        DType::Bf16 => "bf16",
                    },
                    match kv_cache {
                        KvCacheDtype::Auto => "",
                        KvCacheDtype::Fp8 => ", FP8 KV",
                    }
                ),
                error: relative_error(&case.output(&gpu, &shape)?, &reference),
                limit: Some(tolerance(dtype) * 2.0),
            });
        }
    }
    Ok(checks)
}

/// Causal GQA attention with RoPE (pairs i, i + d/2) in f64, from the packed qkv rows.
fn attention_reference(
    qkv: &[f32],
    tokens: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    inv_freq: &[f64],
) -> Vec<f32> {
    let width = (nh + 2 * nkv) * hd;
    let half = hd / 2;
    let rotate = |v: &[f32], pos: usize| -> Vec<f64> {
        let mut r = vec![0f64; hd];
        for i in 0..half {
            let (s, c) = (pos as f64 * inv_freq[i]).sin_cos();
            let (a, b) = (v[i] as f64, v[i + half] as f64);
            r[i] = a * c - b * s;
            r[i + half] = a * s + b * c;
        }
        r
    };
    let head = |t: usize, h: usize| &qkv[t * width + h * hd..][..hd];
    let mut out = vec![0f32; tokens * nh * hd];
    for t in 0..tokens {
        for h in 0..nh {
            let g = h / (nh / nkv);
            let q = rotate(head(t, h), t);
            let scores: Vec<f64> = (0..=t)
                .map(|j| {
                    let kj = rotate(head(j, nh + g), j);
                    q.iter().zip(&kj).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            for d in 0..hd {
                let v: f64 = (0..=t)
                    .map(|j| weights[j] * head(j, nh + nkv + g)[d] as f64)
                    .sum();
                out[(t * nh + h) * hd + d] = (v / total) as f32;
            }
        }
    }
    out
}

/// The device sampler against the CPU sampler: greedy with log-probabilities and with
/// penalties must match exactly; seeded draws must repeat and follow the distribution.
fn sampler_checks(gpu: &Gpu, tag: &str) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let vocab = 1000usize;
    let mut history = History(HashMap::new());
    history.0.insert(1, (vec![3, 5, 3, 7, 7], 2));
    let rows_params = [
        SamplingParams {
            logprobs: true,
            top_logprobs: 5,
            ..greedy()
        },
        SamplingParams {
            repetition_penalty: 1.3,
            frequency_penalty: 0.2,
            presence_penalty: 0.1,
            logprobs: true,
            ..greedy()
        },
    ];
    let mut logits = random_values(rows_params.len() * vocab, 11, 5.0);
    // Make the penalised tokens the leaders, so that the penalties decide.
    for (t, v) in [(3usize, 9.0f32), (7, 9.1), (5, -9.0)] {
        logits[vocab + t] = v;
    }
    let seqs = rows_params
        .iter()
        .enumerate()
        .map(|(i, p)| ScheduledSeq {
            sampling: *p,
            prompt_logprobs: None,
            ..seq(i as RequestId, vec![0], 0, &[0])
        })
        .collect();
    let (tokens, logprobs, tops) = run_sampler(
        gpu,
        &logits,
        vocab,
        ScheduledBatch {
            seqs,
            preempted: vec![],
        },
        &history,
    )?;
    let mut mismatch = 0usize;
    let mut lp_err = 0f64;
    for (i, p) in rows_params.iter().enumerate() {
        let hist = history.sequence_tokens(i as RequestId).to_vec();
        let prompt = history.prompt_len(i as RequestId);
        let mut row = logits[i * vocab..][..vocab].to_vec();
        let cpu = heddle_model::sampling::sample(&mut row, p, &hist, prompt, 0);
        mismatch += (cpu.token != tokens[i]) as usize;
        lp_err = lp_err.max((cpu.logprob.unwrap_or(0.0) - logprobs[i]).abs() as f64);
        for (a, b) in cpu.top_logprobs.iter().zip(&tops[i]) {
            mismatch += (a.0 != b.0) as usize;
            lp_err = lp_err.max((a.1 - b.1).abs() as f64);
        }
    }
    checks.push(Check {
        name: format!("kernel sample greedy/penalties/top-logprobs vs CPU, mismatches ({tag})"),
        error: mismatch as f64,
        limit: Some(0.0),
    });
    checks.push(Check {
        name: format!("kernel sample log-probabilities, abs error ({tag})"),
        error: lp_err,
        limit: Some(1e-4),
    });

    checks.extend(adjusted_sampler_checks(gpu, tag)?);
    checks.extend(score_kernel_checks(gpu, tag)?);

    // Probabilities 0.1 .. 0.4 over four tokens; 4000 seeded draws, then again.
    let vocab = 4usize;
    let draws = 4000usize;
    let row: Vec<f32> = (1..=4).map(|i| (i as f32).ln()).collect();
    let logits: Vec<f32> = (0..draws).flat_map(|_| row.clone()).collect();
    let batch = |p: SamplingParams| ScheduledBatch {
        seqs: (0..draws)
            .map(|i| ScheduledSeq {
                sampling: p,
                prompt_logprobs: None,
                num_generated: i,
                ..seq(i as RequestId, vec![0], 0, &[0])
            })
            .collect(),
        preempted: vec![],
    };
    let seeded = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..Default::default()
    };
    let (first, _, _) = run_sampler(gpu, &logits, vocab, batch(seeded), &history)?;
    let (second, _, _) = run_sampler(gpu, &logits, vocab, batch(seeded), &history)?;
    checks.push(Check {
        name: format!("kernel sample seeded draws repeat, mismatches ({tag})"),
        error: first.iter().zip(&second).filter(|(a, b)| a != b).count() as f64,
        limit: Some(0.0),
    });
    let mut counts = [0usize; 4];
    for &t in &first {
        counts[t as usize] += 1;
    }
    let worst = (0..4)
        .map(|i| (counts[i] as f64 / draws as f64 - (i + 1) as f64 / 10.0).abs())
        .fold(0.0, f64::max);
    checks.push(Check {
        name: format!("kernel sample distribution, max abs error ({tag})"),
        error: worst,
        limit: Some(0.03),
    });
    // top_k 2: only tokens 2 and 3; top_p 0.5: the same; min_p 0.6: the same.
    let mut outside = 0usize;
    for p in [
        SamplingParams { top_k: 2, ..seeded },
        SamplingParams {
            top_p: 0.5,
            ..seeded
        },
        SamplingParams {
            min_p: 0.6,
            ..seeded
        },
    ] {
        let (tokens, _, _) = run_sampler(gpu, &logits, vocab, batch(p), &history)?;
        outside += tokens.iter().filter(|&&t| t < 2).count();
    }
    checks.push(Check {
        name: format!("kernel sample top-k/top-p/min-p filters, tokens outside ({tag})"),
        error: outside as f64,
        limit: Some(0.0),
    });
    Ok(checks)
}

/// Logit biases and grammar masks applied by the device sampler against the CPU
/// sampler's `sample_adjusted`: greedy rows with a mask that excludes the leader, with a
/// ban of the leader and a boost, with both and penalties; log-probabilities stay the raw
/// ones; seeded draws under a mask never leave it.
fn adjusted_sampler_checks(gpu: &Gpu, tag: &str) -> anyhow::Result<Vec<Check>> {
    let vocab = 1000usize;
    let mut history = History(HashMap::new());
    history.0.insert(2, (vec![3, 5, 3, 7, 7], 2));
    let logits = random_values(4 * vocab, 12, 5.0);
    let leader = |row: usize| {
        let r = &logits[row * vocab..][..vocab];
        (0..vocab).max_by(|&a, &b| r[a].total_cmp(&r[b])).unwrap() as TokenId
    };
    // Allowed: every third token and the last few (past-the-mask tokens are banned).
    let allowed: Vec<TokenId> = (0..vocab as TokenId - 40)
        .filter(|t| t % 3 == 1 && *t != leader(0) && *t != leader(2))
        .collect();
    let mask = TokenMask::allowing(vocab - 40, &allowed);
    let with_logprobs = SamplingParams {
        logprobs: true,
        top_logprobs: 3,
        ..greedy()
    };
    let rows: Vec<(SamplingParams, LogitsAdjustment)> = vec![
        (
            with_logprobs,
            LogitsAdjustment {
                bias: Vec::new().into(),
                mask: Some(mask.clone()),
            },
        ),
        (
            with_logprobs,
            LogitsAdjustment {
                bias: vec![(leader(1), -100.0), (17, 30.0)].into(),
                mask: None,
            },
        ),
        (
            SamplingParams {
                repetition_penalty: 1.3,
                presence_penalty: 0.5,
                ..with_logprobs
            },
            LogitsAdjustment {
                bias: vec![(3, 40.0), (7, 39.5), (allowed[5], 1.0)].into(),
                mask: Some(mask.clone()),
            },
        ),
        (with_logprobs, LogitsAdjustment::default()),
    ];
    let mut adjustments = StepAdjustments::new();
    for (i, (_, a)) in rows.iter().enumerate() {
        adjustments.insert(i as RequestId, a.clone());
    }
    let batch = ScheduledBatch {
        seqs: rows
            .iter()
            .enumerate()
            .map(|(i, (p, _))| ScheduledSeq {
                sampling: *p,
                prompt_logprobs: None,
                ..seq(i as RequestId, vec![0], 0, &[0])
            })
            .collect(),
        preempted: vec![],
    };
    let (tokens, logprobs, tops) =
        run_adjusted_sampler(gpu, &logits, vocab, batch, &history, Some(&adjustments))?;
    let mut sampler = heddle_model::sampling::Sampler::default();
    let (mut mismatch, mut lp_err) = (0usize, 0f64);
    for (i, (p, a)) in rows.iter().enumerate() {
        let hist = history.sequence_tokens(i as RequestId).to_vec();
        let prompt = history.prompt_len(i as RequestId);
        let mut row = logits[i * vocab..][..vocab].to_vec();
        let cpu = sampler.sample_adjusted(&mut row, p, Some(a), &hist, prompt, 0);
        mismatch += (cpu.token != tokens[i]) as usize;
        lp_err = lp_err.max((cpu.logprob.unwrap_or(0.0) - logprobs[i]).abs() as f64);
        for (a, b) in cpu.top_logprobs.iter().zip(&tops[i]) {
            mismatch += (a.0 != b.0) as usize;
            lp_err = lp_err.max((a.1 - b.1).abs() as f64);
        }
    }
    // The rows must have changed the choice, or the check proves nothing.
    let changed = (0..3).filter(|&i| tokens[i] != leader(i)).count();
    let mut checks = vec![
        Check {
            name: format!(
                "kernel sample with logit biases and grammar masks vs CPU, mismatches ({tag})"
            ),
            error: (mismatch + (3 - changed)) as f64,
            limit: Some(0.0),
        },
        Check {
            name: format!("kernel sample adjusted log-probabilities stay raw, abs error ({tag})"),
            error: lp_err,
            limit: Some(1e-4),
        },
    ];

    // 2000 seeded draws under the mask at temperature 1: none outside it.
    let draws = 2000usize;
    let drawn = SamplingParams {
        temperature: 1.0,
        seed: Some(9),
        ..Default::default()
    };
    let mut adjustments = StepAdjustments::new();
    let row_logits: Vec<f32> = (0..draws)
        .flat_map(|_| logits[..vocab].iter().copied())
        .collect();
    let seqs = (0..draws)
        .map(|i| {
            adjustments.insert(
                i as RequestId,
                LogitsAdjustment {
                    bias: Vec::new().into(),
                    mask: Some(mask.clone()),
                },
            );
            ScheduledSeq {
                sampling: drawn,
                prompt_logprobs: None,
                num_generated: i,
                ..seq(i as RequestId, vec![0], 0, &[0])
            }
        })
        .collect();
    let batch = ScheduledBatch {
        seqs,
        preempted: vec![],
    };
    let (tokens, _, _) =
        run_adjusted_sampler(gpu, &row_logits, vocab, batch, &history, Some(&adjustments))?;
    checks.push(Check {
        name: format!("kernel sample seeded draws under a grammar mask, tokens outside ({tag})"),
        error: tokens.iter().filter(|&&t| !mask.allows(t)).count() as f64,
        limit: Some(0.0),
    });
    Ok(checks)
}

/// `score_tokens` against the CPU's `token_logprobs` on random rows: the target's
/// log-probability and the top alternatives (none, a few, the most).
fn score_kernel_checks(gpu: &Gpu, tag: &str) -> anyhow::Result<Vec<Check>> {
    let vocab = 1000usize;
    let tops = [0i32, 3, MAX_TOP_LOGPROBS as i32, 1];
    let targets = [7i32, 999, 0, 512];
    let mut logits = random_values(tops.len() * vocab, 23, 6.0);
    // A tie among the leaders: the lower id comes first, as on the CPU.
    logits[vocab + 10] = 8.0;
    logits[vocab + 20] = 8.0;
    let rows = tops.len();
    let logits_buf = gpu.upload(&logits)?;
    let (targets_buf, tops_buf) = (gpu.upload(&targets)?, gpu.upload(&tops)?);
    let out = gpu.alloc(rows * SCORE_WORDS * 4)?;
    gpu.launch(
        "score_tokens",
        grid(rows, SAMPLE_THREADS),
        &[
            &logits_buf.ptr,
            &(vocab as i32),
            &targets_buf.ptr,
            &tops_buf.ptr,
            &out.ptr,
        ],
    )?;
    let mut words = vec![0i32; rows * SCORE_WORDS];
    gpu.read(&out, &mut words)?;
    let (mut mismatch, mut lp_err) = (0usize, 0f64);
    let mut ids = Vec::new();
    for (i, row_words) in words.chunks_exact(SCORE_WORDS).enumerate() {
        let row = &logits[i * vocab..][..vocab];
        let (logprob, top) = heddle_model::sampling::token_logprobs(
            row,
            targets[i] as TokenId,
            tops[i] as usize,
            &mut ids,
        );
        lp_err = lp_err.max((logprob - f32::from_bits(row_words[0] as u32)).abs() as f64);
        for (k, &(id, lp)) in top.iter().enumerate() {
            mismatch += (row_words[1 + 2 * k] as TokenId != id) as usize;
            lp_err = lp_err.max((lp - f32::from_bits(row_words[2 + 2 * k] as u32)).abs() as f64);
        }
    }
    Ok(vec![
        Check {
            name: format!("kernel score_tokens top ids vs CPU, mismatches ({tag})"),
            error: mismatch as f64,
            limit: Some(0.0),
        },
        Check {
            name: format!("kernel score_tokens log-probabilities, abs error ({tag})"),
            error: lp_err,
            limit: Some(1e-4),
        },
    ])
}

type SamplerOutput = (Vec<TokenId>, Vec<f32>, Vec<Vec<(TokenId, f32)>>);

fn run_sampler(
    gpu: &Gpu,
    logits: &[f32],
    vocab: usize,
    batch: ScheduledBatch,
    history: &History,
) -> anyhow::Result<SamplerOutput> {
    run_adjusted_sampler(gpu, logits, vocab, batch, history, None)
}

/// [`run_sampler`], with `adjustments` applied before the draw when given.
fn run_adjusted_sampler(
    gpu: &Gpu,
    logits: &[f32],
    vocab: usize,
    batch: ScheduledBatch,
    history: &History,
    adjustments: Option<&StepAdjustments>,
) -> anyhow::Result<SamplerOutput> {
    let mut plan = StepPlan::default();
    plan.build(&batch, history, 16, 1, false, vocab, None);
    let mut adjustment_words = vec![0];
    if let Some(adjustments) = adjustments {
        plan.mark_adjusted();
        adjustment_words = vec![0; crate::adjustments::packed_len(&plan.rows, adjustments)];
        crate::adjustments::pack(&plan.rows, adjustments, &mut adjustment_words);
    }
    let adjustment_buf = gpu.upload(&adjustment_words)?;
    let rows = plan.rows.len();
    let meta = gpu.upload(&plan.words)?;
    let logits_buf = gpu.upload(logits)?;
    let originals = gpu.alloc(plan.num_penalties.max(1) * 4)?;
    let out = gpu.alloc(rows * (2 + 2 * MAX_TOP_LOGPROBS) * 4)?;
    let o = plan.offsets;
    gpu.launch(
        "sample",
        grid(rows, SAMPLE_THREADS),
        &[
            &logits_buf.ptr,
            &(vocab as i32),
            &(meta.ptr + 4 * o.sample_params as u64),
            &(meta.ptr + 4 * o.penalties as u64),
            &originals.ptr,
            &adjustment_buf.ptr,
            &out.ptr,
            &(rows as i32),
        ],
    )?;
    let mut words = vec![0i32; rows * (2 + 2 * MAX_TOP_LOGPROBS)];
    gpu.read(&out, &mut words)?;
    let tokens = words[..rows].iter().map(|&t| t as TokenId).collect();
    let logprobs = words[rows..2 * rows]
        .iter()
        .map(|&b| f32::from_bits(b as u32))
        .collect();
    let tops = (0..rows)
        .map(|i| {
            words[2 * rows + i * 2 * MAX_TOP_LOGPROBS..][..2 * MAX_TOP_LOGPROBS]
                .chunks_exact(2)
                .take(plan.rows[i].top_logprobs)
                .map(|p| (p[0] as TokenId, f32::from_bits(p[1] as u32)))
                .collect()
        })
        .collect();
    Ok((tokens, logprobs, tops))
}

const TINY_VOCAB: usize = 300;
const TINY_HIDDEN: usize = 128;

/// A small random model as an HF checkpoint (f32 safetensors): Llama with tied
/// embeddings, or Qwen2 with biases and its own head.
pub fn write_tiny_model(dir: &Path, qwen2: bool) -> anyhow::Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    std::fs::create_dir_all(dir)?;
    let (h, ffn, layers, heads, kv, hd) = (TINY_HIDDEN, 256, 2, 4, 2, 32);
    let config = serde_json::json!({
        "model_type": if qwen2 { "qwen2" } else { "llama" },
        "hidden_size": h, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "vocab_size": TINY_VOCAB, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": !qwen2,
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut seed = 100;
    let mut add = |name: String, shape: Vec<usize>, center: f32, scale: f32| {
        seed += 1;
        let n = shape.iter().product();
        let bytes = random_values(n, seed, scale)
            .into_iter()
            .flat_map(|v| (v + center).to_le_bytes())
            .collect();
        tensors.push((name, shape, bytes));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![TINY_VOCAB, h],
        0.0,
        1.0,
    );
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        add(p("input_layernorm.weight"), vec![h], 1.0, 0.2);
        add(p("self_attn.q_proj.weight"), vec![heads * hd, h], 0.0, 0.15);
        add(p("self_attn.k_proj.weight"), vec![kv * hd, h], 0.0, 0.15);
        add(p("self_attn.v_proj.weight"), vec![kv * hd, h], 0.0, 0.15);
        add(p("self_attn.o_proj.weight"), vec![h, heads * hd], 0.0, 0.1);
        if qwen2 {
            add(p("self_attn.q_proj.bias"), vec![heads * hd], 0.0, 0.3);
            add(p("self_attn.k_proj.bias"), vec![kv * hd], 0.0, 0.3);
            add(p("self_attn.v_proj.bias"), vec![kv * hd], 0.0, 0.3);
        }
        add(p("post_attention_layernorm.weight"), vec![h], 1.0, 0.2);
        add(p("mlp.gate_proj.weight"), vec![ffn, h], 0.0, 0.15);
        add(p("mlp.up_proj.weight"), vec![ffn, h], 0.0, 0.15);
        add(p("mlp.down_proj.weight"), vec![h, ffn], 0.0, 0.1);
    }
    add("model.norm.weight".into(), vec![h], 1.0, 0.2);
    if qwen2 {
        add("lm_head.weight".into(), vec![TINY_VOCAB, h], 0.0, 0.3);
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(())
}

/// Prefill in chunks of 8, then greedy decoding, on both runners; compares every logits
/// row and the greedy tokens, and the device sampler's tokens with the logits' arg-max.
fn runner_vs_cpu(
    dir: &Path,
    dtype: DType,
    qwen2: bool,
    quantization: Quantization,
    kv_cache_dtype: KvCacheDtype,
) -> anyhow::Result<Vec<Check>> {
    let name = format!(
        "runner vs CPU, {} {}{}{}",
        if qwen2 { "qwen2" } else { "llama" },
        match dtype {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        },
        match quantization {
            Quantization::None => "",
            Quantization::Fp8 => " fp8",
        },
        match kv_cache_dtype {
            KvCacheDtype::Auto => "",
            KvCacheDtype::Fp8 => " fp8-kv",
        }
    );
    let (cpu, _) = Llama::load(dir).context("loading the tiny model on the CPU")?;
    let config = cpu.config().clone();
    let bs = 16;
    let mut cache = KvCache::new(&config, 16, bs, KvDtype::F32)?;
    let mut scratch = Scratch::default();
    let options = CudaOptions {
        dtype,
        block_size: bs,
        max_batched_tokens: 64,
        max_running: 8,
        kv: KvBudget::Blocks(16),
        quantization,
        kv_cache_dtype,
        ..CudaOptions::default()
    };
    let mut gpu = CudaRunner::new(
        config.clone(),
        &WeightSource::Checkpoint(dir.to_path_buf()),
        options,
    )?;
    let table: Vec<u32> = vec![3, 9, 0, 12];
    let prompt: Vec<TokenId> = (0..21).map(|i| (i * 37 % TINY_VOCAB) as TokenId).collect();
    // Teacher-forced: both runners decode the CPU's greedy tokens, so that each step's
    // logits are compared on the same inputs. (Along each runner's own tokens, one
    // near-tie that rounds the other way makes every later step's logits unrelated: the
    // FP8 path's relative error then read 1.5 for half of the random seeds of the Qwen2
    // model, 0.08 for the others.) `gpu_tokens` are the GPU's own choices at each step.
    let mut cpu_tokens = prompt.clone();
    let mut gpu_tokens = prompt.clone();
    let mut worst = 0f64;
    let mut sampler_mismatch = 0usize;
    let mut history = History(HashMap::new());
    let steps = 12;
    let mut start = 0;
    for step in 0..steps {
        // Prefill chunks of 8 first; each later step decodes one token.
        let chunk = if start < prompt.len() {
            prompt[start..(start + 8).min(prompt.len())].to_vec()
        } else {
            vec![*cpu_tokens.last().unwrap()]
        };
        let gpu_chunk = chunk.clone();
        let is_last = start + chunk.len() >= prompt.len();
        let input = SeqInput {
            tokens: &chunk,
            start_position: start,
            block_table: &table,
            logits: if is_last { Logits::Last } else { Logits::None },
        };
        let cpu_logits = cpu.forward(&[input], &mut cache, &mut scratch)?.to_vec();
        let mut s = seq(1, gpu_chunk.clone(), start, &table);
        s.needs_logits = is_last;
        s.num_generated = step;
        let batch = ScheduledBatch {
            seqs: vec![s],
            preempted: vec![],
        };
        history.0.insert(1, (cpu_tokens.clone(), prompt.len()));
        let gpu_logits = gpu.step_logits(&batch, &history)?;
        ensure!(
            gpu_logits.len() == cpu_logits.len(),
            "{name}: logits rows differ"
        );
        start += chunk.len();
        if is_last {
            worst = worst.max(relative_error(&gpu_logits, &cpu_logits));
            cpu_tokens.push(heddle_model::sampling::argmax(&cpu_logits));
            gpu_tokens.push(heddle_model::sampling::argmax(&gpu_logits));
        }
    }
    // The device sampler over the same step gives the arg-max of the same logits.
    let last = *cpu_tokens.last().unwrap();
    let mut s = seq(1, vec![last], cpu_tokens.len() - 1, &table);
    s.num_generated = steps;
    let batch = ScheduledBatch {
        seqs: vec![s.clone()],
        preempted: vec![],
    };
    let logits = gpu.step_logits(&batch, &history)?;
    let sampled = gpu.step(&batch, &history)?;
    sampler_mismatch += (sampled[0].token != heddle_model::sampling::argmax(&logits)) as usize;

    let generated = |t: &[TokenId]| t[prompt.len()..].to_vec();
    let token_mismatch = generated(&cpu_tokens)
        .iter()
        .zip(&generated(&gpu_tokens))
        .filter(|(a, b)| a != b)
        .count();
    tracing::info!(cpu = ?generated(&cpu_tokens), gpu = ?generated(&gpu_tokens), "{name}");
    Ok(vec![
        Check {
            name: format!("{name}: logits relative error"),
            error: worst,
            limit: Some(match (dtype, quantization, kv_cache_dtype) {
                (DType::F32, _, _) => 1e-4,
                (DType::Bf16, Quantization::None, KvCacheDtype::Auto) => 3e-2,
                // E4M3 keeps 3 mantissa bits of every weight and activation, or of every
                // key and value: a few percent, where a wrong scale or layout would be of
                // the order of 1.
                (DType::Bf16, _, _) => 0.15,
            }),
        },
        Check {
            name: format!(
                "{name}: greedy choices differing, same inputs (of {})",
                cpu_tokens.len() - prompt.len()
            ),
            error: token_mismatch as f64,
            limit: match dtype {
                DType::F32 => Some(0.0),
                // bf16 rounding may flip a near-tie: reported, not a check.
                DType::Bf16 => None,
            },
        },
        Check {
            name: format!("{name}: device greedy sampler vs arg-max of its logits"),
            error: sampler_mismatch as f64,
            limit: Some(0.0),
        },
    ])
}

/// Eight prompts arriving one step apart, greedy, in bf16 on the small random checkpoint
/// in `dir`, with decode steps replayed as CUDA graphs and with every step launched
/// directly: the tokens must be the same.
fn graph_replay(dir: &Path) -> anyhow::Result<Vec<Check>> {
    let config = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let options = CudaOptions {
        max_batched_tokens: 2048,
        max_running: 16,
        kv: KvBudget::Blocks(512),
        ..CudaOptions::default()
    };
    let source = WeightSource::Checkpoint(dir.to_path_buf());
    let prompts: Vec<(usize, Vec<TokenId>)> = (0..8)
        .map(|i| {
            let prompt = random_values(100 + 13 * i, 50 + i as u64, 1.0)
                .iter()
                .map(|v| ((v + 1.0) * 0.5 * (TINY_VOCAB - 1) as f32) as TokenId)
                .collect();
            (i, prompt)
        })
        .collect();
    let mut with_graphs = CudaRunner::new(config.clone(), &source, options.clone())?;
    let replayed = generate(&mut with_graphs, &prompts, 32)?;
    drop(with_graphs);
    let mut direct = CudaRunner::new(
        config,
        &source,
        CudaOptions {
            cuda_graphs: false,
            ..options
        },
    )?;
    let launched = generate(&mut direct, &prompts, 32)?;
    let differing = replayed
        .iter()
        .flatten()
        .zip(launched.iter().flatten())
        .filter(|(a, b)| a != b)
        .count();
    Ok(vec![Check {
        name: "CUDA graphs: greedy tokens differing with vs without graph replay (of 256)".into(),
        error: differing as f64,
        limit: Some(0.0),
    }])
}

/// Prompt log-probabilities on the small random checkpoint in `dir`: a prompt generates 8
/// tokens greedily with their log-probabilities; then the prompt plus those tokens is
/// scored as a prompt, alone in one chunk, in chunks of 8 tokens, and beside 6 decoding
/// sequences. Scoring must reproduce the generation's log-probabilities (the same model,
/// through prefill instead of decode attention) and its top alternatives, and must not
/// depend on the chunking or the company.
fn prompt_scoring(dir: &Path, dtype: DType) -> anyhow::Result<Vec<Check>> {
    let tag = match dtype {
        DType::F32 => "f32",
        DType::Bf16 => "bf16",
    };
    let config = ModelConfig::from_hf_json(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let options = CudaOptions {
        dtype,
        max_batched_tokens: 256,
        max_running: 16,
        kv: KvBudget::Blocks(256),
        ..CudaOptions::default()
    };
    let mut runner = CudaRunner::new(
        config,
        &WeightSource::Checkpoint(dir.to_path_buf()),
        options,
    )?;
    let prompt: Vec<TokenId> = (0..37).map(|i| (i * 53 % TINY_VOCAB) as TokenId).collect();
    let top = 3usize;
    let generated = drive(&mut runner, &prompt, 8, None, 0, 256)?.generated;
    let mut scored_prompt = prompt.clone();
    scored_prompt.extend(generated.iter().map(|g| g.token));
    let alone = drive(&mut runner, &scored_prompt, 0, Some(top as u32), 0, 256)?.scored;
    let chunked = drive(&mut runner, &scored_prompt, 0, Some(top as u32), 0, 8)?.scored;
    let busy = drive(&mut runner, &scored_prompt, 0, Some(top as u32), 6, 256)?.scored;

    let positions: Vec<usize> = alone.iter().map(|s| s.position).collect();
    ensure!(
        positions == (1..scored_prompt.len()).collect::<Vec<_>>(),
        "{tag}: scored positions {positions:?}"
    );
    // Position p of the scored prompt holds the generated token p - prompt.len().
    let (mut lp_err, mut top_mismatch) = (0f64, 0usize);
    for (g, s) in generated.iter().zip(&alone[prompt.len() - 1..]) {
        lp_err = lp_err.max((g.logprob.unwrap_or(f32::NAN) - s.logprob).abs() as f64);
        top_mismatch += g
            .top_logprobs
            .iter()
            .zip(&s.top_logprobs)
            .filter(|(a, b)| a.0 != b.0)
            .count();
        top_mismatch += (s.top_logprobs.len() != top) as usize;
    }
    let differs = |other: &[heddle_model::runner::PromptTokenLogprobs]| {
        alone
            .iter()
            .zip(other)
            .map(|(a, b)| (a.logprob - b.logprob).abs() as f64)
            .fold(
                if alone.len() == other.len() {
                    0.0
                } else {
                    f64::INFINITY
                },
                f64::max,
            )
    };
    let (generation_limit, top_limit, invariance_limit) = match dtype {
        DType::F32 => (Some(1e-4), Some(0.0), Some(1e-5)),
        // bf16 activations round differently through prefill and decode attention, and
        // the chunking changes the tiling: reported, judged in f32.
        DType::Bf16 => (None, None, None),
    };
    Ok(vec![
        Check {
            name: format!(
                "prompt scoring vs the generation's own log-probabilities, abs error ({tag})"
            ),
            error: lp_err,
            limit: generation_limit,
        },
        Check {
            name: format!("prompt scoring top-{top} ids vs the generation's, mismatches ({tag})"),
            error: top_mismatch as f64,
            limit: top_limit,
        },
        Check {
            name: format!("prompt scoring in chunks of 8 vs one chunk, abs error ({tag})"),
            error: differs(&chunked),
            limit: invariance_limit,
        },
        Check {
            name: format!("prompt scoring beside 6 decoding sequences vs alone, abs error ({tag})"),
            error: differs(&busy),
            limit: invariance_limit,
        },
    ])
}

/// What [`drive`] collected for its request.
pub(crate) struct Driven {
    pub(crate) generated: Vec<heddle_model::runner::SampledOutput>,
    pub(crate) scored: Vec<heddle_model::runner::PromptTokenLogprobs>,
}

/// Runs `prompt` through the scheduler and `runner` (at most `chunk` tokens a step), greedy
/// with log-probabilities and 3 top alternatives, for `max_tokens` (0: score only, with
/// `prompt_logprobs`), after `company` other greedy requests have started decoding; the
/// company is cancelled once the request ends.
pub(crate) fn drive(
    runner: &mut CudaRunner,
    prompt: &[TokenId],
    max_tokens: usize,
    prompt_logprobs: Option<u32>,
    company: usize,
    chunk: usize,
) -> anyhow::Result<Driven> {
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_running: 16,
        max_batched_tokens: chunk,
        num_blocks: runner.num_blocks(),
        block_size: runner.options().block_size,
        enable_prefix_cache: false,
        ..SchedulerConfig::default()
    })?;
    let add = |scheduler: &mut Scheduler, request: heddle_core::Request| {
        scheduler.add(request).map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    for i in 0..company {
        let others: Vec<TokenId> = (0..5 + i).map(|t| (t * 11 + i) as TokenId).collect();
        let mut request = heddle_core::Request::new(i as RequestId + 1, others, 1000, 0.0);
        request.sampling = greedy();
        request.stop.ignore_eos = true;
        add(&mut scheduler, request)?;
    }
    // The company's prompts are computed before the request arrives: it then decodes.
    let warm_up_steps = if company > 0 { 2 } else { 0 };
    for _ in 0..warm_up_steps {
        let batch = scheduler.schedule();
        let sampled = runner.step(&batch, &scheduler)?;
        let tokens: Vec<_> = sampled
            .iter()
            .map(heddle_core::SampledToken::from)
            .collect();
        scheduler.update(&tokens);
    }
    let id: RequestId = 0;
    // Scoring alone is a request for one token whose output is ignored, as the engine
    // does for `max_tokens: 0`.
    let mut request = heddle_core::Request::new(id, prompt.to_vec(), max_tokens.max(1), 1.0);
    request.sampling = SamplingParams {
        logprobs: true,
        top_logprobs: 3,
        prompt_logprobs,
        ..greedy()
    };
    request.stop.ignore_eos = true;
    add(&mut scheduler, request)?;
    let mut driven = Driven {
        generated: Vec::new(),
        scored: Vec::new(),
    };
    for _ in 0..1000 {
        let batch = scheduler.schedule();
        let sampled = runner.step(&batch, &scheduler)?;
        driven.scored.extend(
            runner
                .take_prompt_logprobs()
                .into_iter()
                .filter(|s| s.id == id),
        );
        driven
            .generated
            .extend(sampled.iter().filter(|s| s.id == id).cloned());
        let tokens: Vec<_> = sampled
            .iter()
            .map(heddle_core::SampledToken::from)
            .collect();
        if scheduler
            .update(&tokens)
            .iter()
            .any(|e| e.id == id && e.finish.is_some())
        {
            for i in 0..company {
                scheduler.cancel(i as RequestId + 1);
            }
            return Ok(driven);
        }
    }
    anyhow::bail!("the request did not finish in 1000 steps")
}

/// Greedy generation of `max_tokens` per prompt through the scheduler (16 sequences and
/// 2048 tokens a step at most; the runner must allow as many), ignoring EOS; prompt i is
/// added at step `arrival`. Returns each prompt's output.
pub fn generate(
    runner: &mut CudaRunner,
    prompts: &[(usize, Vec<TokenId>)],
    max_tokens: usize,
) -> anyhow::Result<Vec<Vec<TokenId>>> {
    let mut scheduler = Scheduler::new(SchedulerConfig {
        max_running: 16,
        max_batched_tokens: 2048,
        num_blocks: runner.num_blocks(),
        block_size: runner.options().block_size,
        enable_prefix_cache: false,
        ..SchedulerConfig::default()
    })?;
    let mut outputs = vec![Vec::new(); prompts.len()];
    let mut step = 0;
    let mut done = 0;
    while done < prompts.len() {
        for (i, (arrival, prompt)) in prompts.iter().enumerate() {
            if *arrival == step {
                let mut request = heddle_core::Request::new(
                    i as RequestId,
                    prompt.clone(),
                    max_tokens,
                    step as f64,
                );
                request.sampling = greedy();
                request.stop.ignore_eos = true;
                scheduler
                    .add(request)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
        }
        let batch = scheduler.schedule();
        let sampled = runner.step(&batch, &scheduler)?;
        let tokens: Vec<_> = sampled
            .iter()
            .map(heddle_core::SampledToken::from)
            .collect();
        for event in scheduler.update(&tokens) {
            outputs[event.id as usize].push(event.token);
            done += event.finish.is_some() as usize;
        }
        step += 1;
        ensure!(step < 10_000, "generation did not finish");
    }
    Ok(outputs)
}
