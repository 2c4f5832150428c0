//! `heddle-cuda fp8`: whether this GPU and its cuBLASLt run heddle's FP8 path, how exactly,
//! and how fast. The device's quantization against the CPU's byte for byte; the FP8 GEMM
//! (per-row and per-tensor scales) against an f64 product of the same quantized values;
//! then FP8 against bf16 GEMMs at a model's layer shapes.

use std::time::Instant;

use half::bf16;
use heddle_model::ModelConfig;

use crate::fp8::{quantize_row, Accumulation, Fp8Gemms, Fp8Tensor, ScaleMode};
use crate::gpu::{DeviceBuffer, Gpu};
use crate::kernels::{DType, KernelShape};
use crate::selftest::{random_values, relative_error};
use crate::weights::Dims;

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Finding {
    pub what: String,
    pub value: String,
    /// None for a measurement; Some(passed) for a check.
    pub passed: Option<bool>,
}

const WORKSPACE_BYTES: usize = 32 << 20;

/// Runs the checks and timings at `config`'s layer shapes.
pub fn run(config: &ModelConfig) -> anyhow::Result<Vec<Finding>> {
    let gpu = Gpu::new(&KernelShape::new(config, 16, DType::Bf16)?)?;
    let (major, minor) = gpu.compute_capability;
    let mut findings = vec![Finding {
        what: "GPU".into(),
        value: format!("{} (compute capability {major}.{minor})", gpu.name),
        passed: None,
    }];
    if !gpu.has_fp8() {
        findings.push(Finding {
            what: "FP8 tensor cores".into(),
            value: "none (compute capability 8.9 or newer needed)".into(),
            passed: Some(false),
        });
        return Ok(findings);
    }
    findings.push(tensor_quantization_check(&gpu)?);
    let workspace = gpu.alloc(WORKSPACE_BYTES)?;
    // Per-row scales (per output channel and per token) run too, with fast accumulation,
    // but their kernels are 1.3–2.2x slower at decode sizes (<= 256 rows; docs/CUDA.md), so
    // the runner uses per-tensor scales. Both are checked; only a failure of the runner's
    // own form fails the check.
    for mode in [ScaleMode::PerRow, ScaleMode::PerTensor] {
        let gemms = Fp8Gemms::new(mode, Accumulation::Fast, workspace.ptr, WORKSPACE_BYTES)?;
        let runner_form = mode == ScaleMode::PerTensor;
        match gemm_check(&gpu, &gemms) {
            Ok(error) => {
                // Hopper's FP8 tensor cores accumulate with fewer bits than f32.
                findings.push(Finding {
                    what: format!("FP8 GEMM, {mode:?} scales, 37x256x512 vs f64 (relative error)"),
                    value: format!("{error:.2e}"),
                    passed: Some(error < 1e-3),
                });
                if runner_form {
                    findings.extend(timings(&gpu, &gemms, config)?);
                }
            }
            Err(e) => findings.push(Finding {
                what: format!("FP8 GEMM, {mode:?} scales"),
                value: format!("refused: {e:#}"),
                passed: if runner_form { Some(false) } else { None },
            }),
        }
    }
    Ok(findings)
}

/// Random bf16 values with one large value, quantized as one tensor on the device and on
/// the CPU: codes and scale must agree.
fn tensor_quantization_check(gpu: &Gpu) -> anyhow::Result<Finding> {
    let len = 3 * 65_536 + 6;
    let mut values = random_values(len, 37, 2.0);
    values[40_000] = -700.0;
    let bits: Vec<u16> = values
        .iter()
        .map(|&v| bf16::from_f32(v).to_bits())
        .collect();
    let held: Vec<f32> = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    let x = gpu.upload(&bits)?;
    let q = Fp8Tensor::alloc(gpu, len)?;
    q.quantize(gpu, x.ptr, len)?;
    let mut codes = vec![0u8; len];
    gpu.read(&q.codes, &mut codes)?;
    let mut scale = [0f32; 1];
    gpu.read(&q.scale, &mut scale)?;
    let (expected, expected_scale) = quantize_row(&held);
    let mismatches = expected.iter().zip(&codes).filter(|(a, b)| a != b).count()
        + (expected_scale != scale[0]) as usize;
    Ok(Finding {
        what: format!(
            "FP8 tensor quantization vs the CPU, {len} values: codes and scale differing"
        ),
        value: mismatches.to_string(),
        passed: Some(mismatches == 0),
    })
}

/// Quantizes rows on the CPU (per row, or the whole matrix with one scale).
fn quantized(values: &[f32], cols: usize, mode: ScaleMode) -> (Vec<u8>, Vec<f32>) {
    match mode {
        ScaleMode::PerRow => {
            let mut codes = Vec::with_capacity(values.len());
            let mut scales = Vec::new();
            for row in values.chunks_exact(cols) {
                let (c, s) = quantize_row(row);
                codes.extend(c);
                scales.push(s);
            }
            (codes, scales)
        }
        ScaleMode::PerTensor => {
            let (codes, scale) = quantize_row(values);
            (codes, vec![scale])
        }
    }
}

/// The FP8 GEMM on CPU-quantized inputs against the f64 product of their dequantized
/// values: relative error.
fn gemm_check(gpu: &Gpu, gemms: &Fp8Gemms) -> anyhow::Result<f64> {
    let (rows, n, k) = (37usize, 256usize, 512usize);
    let (xq, xs) = quantized(&random_values(rows * k, 41, 2.0), k, gemms.mode());
    let (wq, ws) = quantized(&random_values(n * k, 43, 0.1), k, gemms.mode());
    let dequantized = |codes: &[u8], scales: &[f32], i: usize| {
        let scale = scales[if scales.len() == 1 { 0 } else { i / k }];
        crate::fp8::e4m3_to_f32(codes[i]) as f64 * scale as f64
    };
    let reference: Vec<f32> = (0..rows * n)
        .map(|i| {
            let (r, c) = (i / n, i % n);
            (0..k)
                .map(|j| dequantized(&xq, &xs, r * k + j) * dequantized(&wq, &ws, c * k + j))
                .sum::<f64>() as f32
        })
        .collect();
    let buffers = [
        gpu.upload(&xq)?,
        gpu.upload(&xs)?,
        gpu.upload(&wq)?,
        gpu.upload(&ws)?,
    ];
    let y = gpu.alloc(rows * n * 4)?;
    let [xq_buf, xs_buf, wq_buf, ws_buf] = &buffers;
    gemms.gemm(
        &gpu.stream,
        y.ptr,
        true,
        xq_buf.ptr,
        xs_buf.ptr,
        wq_buf.ptr,
        ws_buf.ptr,
        rows,
        n,
        k,
    )?;
    let mut out = vec![0f32; rows * n];
    gpu.read(&y, &mut out)?;
    Ok(relative_error(&out, &reference))
}

const REPEATS: usize = 20;

/// FP8 (the runner's form: per-tensor scales, the activations' quantization included) and
/// bf16 GEMMs at the layer's gate/up and down shapes, at a decode batch and a prefill step:
/// microseconds and TFLOP/s.
fn timings(gpu: &Gpu, gemms: &Fp8Gemms, config: &ModelConfig) -> anyhow::Result<Vec<Finding>> {
    let d = Dims::of(config);
    let mut findings = Vec::new();
    for (name, n, k) in [("gate_up", 2 * d.ffn, d.hidden), ("down", d.hidden, d.ffn)] {
        for rows in [256usize, 8192] {
            let w16 = gpu.alloc(n * k * 2)?;
            let x16 = gpu.alloc(rows * k * 2)?;
            for (buffer, len) in [(&w16, n * k), (&x16, rows * k)] {
                fill(gpu, buffer, len)?;
            }
            let w8 = Fp8Tensor::of_weight(gpu, &w16, n * k)?;
            let x8 = Fp8Tensor::alloc(gpu, rows * k)?;
            let y = gpu.alloc(rows * n * 2)?;
            let time = |run: &dyn Fn() -> anyhow::Result<()>| -> anyhow::Result<f64> {
                run()?;
                gpu.stream.synchronize()?;
                let started = Instant::now();
                for _ in 0..REPEATS {
                    run()?;
                }
                gpu.stream.synchronize()?;
                Ok(started.elapsed().as_secs_f64() * 1e6 / REPEATS as f64)
            };
            // The activations' quantization is part of an FP8 GEMM's cost.
            let fp8_us = time(&|| {
                x8.quantize(gpu, x16.ptr, rows * k)?;
                gemms.gemm(
                    &gpu.stream,
                    y.ptr,
                    false,
                    x8.codes.ptr,
                    x8.scale.ptr,
                    w8.codes.ptr,
                    w8.scale.ptr,
                    rows,
                    n,
                    k,
                )
            })?;
            let bf16_us = time(&|| gpu.gemm(y.ptr, false, x16.ptr, w16.ptr, rows, n, k))?;
            let tflops = |us: f64| (2 * rows * n * k) as f64 / (us * 1e6);
            findings.push(Finding {
                what: format!("{name} {rows}x{n}x{k}, {:?} scales", gemms.mode()),
                value: format!(
                    "FP8 {fp8_us:.1} us ({:.0} TFLOP/s), bf16 {bf16_us:.1} us ({:.0} TFLOP/s): {:.2}x",
                    tflops(fp8_us),
                    tflops(bf16_us),
                    bf16_us / fp8_us
                ),
                passed: None,
            });
        }
    }
    Ok(findings)
}

fn fill(gpu: &Gpu, buffer: &DeviceBuffer, len: usize) -> anyhow::Result<()> {
    crate::weights::fill_random(gpu, buffer.ptr, len, 7, 0.0, 0.05)
}
