//! Each kernel against an f64 CPU reference on random inputs.

use super::*;

pub(super) fn kernel_checks(dtype: DType) -> anyhow::Result<Vec<Check>> {
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
pub(super) fn decode_attention_checks(
    dtype: DType,
    kv_cache: KvCacheDtype,
) -> anyhow::Result<Vec<Check>> {
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
