//! The weight GEMMs of a model's layer (and its LM head) timed alone at decode- and
//! prefill-sized row counts, with the weight-read bandwidth and the arithmetic rate each
//! reaches: where a step's GEMM time goes, and how far each GEMM is from its floor (the
//! weight read at a few rows, the tensor cores at many). On GPUs with FP8 tensor cores the
//! projections are also timed in FP8 three ways: cuBLASLt's first choice with f32
//! promotion of the sums, with fast accumulation, and the fastest timed candidate with
//! fast accumulation.

use std::time::Instant;

use heddle_model::ModelConfig;

use crate::fp8::{Accumulation, Fp8Gemms, Fp8Tensor, ScaleMode};
use crate::gpu::{DeviceBuffer, Gpu};
use crate::kernels::{DType, KernelShape};
use crate::weights::Dims;

/// One weight shape at one row count.
#[derive(Debug, Clone)]
pub struct GemmTiming {
    pub name: &'static str,
    pub rows: usize,
    pub n: usize,
    pub k: usize,
    /// Microseconds per GEMM.
    pub us: f64,
    /// The FP8 timings of a projection, where the GPU has FP8 tensor cores.
    pub fp8: Option<Fp8Timing>,
}

/// Microseconds per FP8 GEMM (activations already quantized), by how it is run.
#[derive(Debug, Clone, Copy)]
pub struct Fp8Timing {
    /// cuBLASLt's first choice, sums promoted to f32 every few steps.
    pub first: f64,
    /// cuBLASLt's first choice with fast accumulation.
    pub first_fast: f64,
    /// The fastest of the timed candidates, fast accumulation (the runner's way from
    /// 1,024 rows on).
    pub timed: f64,
}

impl GemmTiming {
    /// GB/s of weight bytes read.
    pub fn weight_gb_per_s(&self, dtype: DType) -> f64 {
        (self.n * self.k * dtype.size_in_bytes()) as f64 / (self.us * 1e3)
    }

    /// TFLOP/s of multiply-adds (2 per weight and row).
    pub fn tflop_per_s(&self) -> f64 {
        (2 * self.rows * self.n * self.k) as f64 / (self.us * 1e6)
    }
}

/// Weight copies cycled through so that no GEMM finds its weights in L2 (tens of MB):
/// each shape gets at least this many bytes of copies.
const ROTATION_BYTES: usize = 1 << 30;
const REPEATS: usize = 40;
const WORKSPACE_BYTES: usize = 32 << 20;

/// Times the layer's and the head's GEMMs (the runner's `Gpu::gemm`) at each of
/// `row_counts` rows, in `dtype`.
pub fn run(
    config: &ModelConfig,
    dtype: DType,
    row_counts: &[usize],
) -> anyhow::Result<Vec<GemmTiming>> {
    let gpu = Gpu::new(&KernelShape::new(config, 16, dtype)?)?;
    let d = Dims::of(config);
    let shapes: [(&'static str, usize, usize, bool); 5] = [
        ("qkv", d.qkv, d.hidden, false),
        ("o", d.hidden, d.q, false),
        ("gate_up", 2 * d.ffn, d.hidden, false),
        ("down", d.hidden, d.ffn, false),
        ("lm_head", config.vocab_size, d.hidden, true),
    ];
    let max_rows = row_counts.iter().copied().max().unwrap_or(1);
    let workspace = gpu.alloc(WORKSPACE_BYTES)?;
    let fp8_ways = if gpu.has_fp8() && dtype == DType::Bf16 {
        let way = |accumulation| {
            Fp8Gemms::new(
                ScaleMode::PerTensor,
                accumulation,
                workspace.ptr,
                WORKSPACE_BYTES,
            )
        };
        Some([
            way(Accumulation::PromotedToF32)?,
            way(Accumulation::Fast)?,
            way(Accumulation::Fast)?,
        ])
    } else {
        None
    };
    let mut timings = Vec::new();
    for (name, n, k, f32_out) in shapes {
        let copies = ROTATION_BYTES
            .div_ceil(n * k * dtype.size_in_bytes())
            .max(2);
        let weights = (0..copies)
            .map(|i| random_buffer(&gpu, n * k, i as u64))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let x = random_buffer(&gpu, max_rows * k, 99)?;
        let y = gpu.alloc(max_rows * n * 4)?;
        // The LM head stays in the runner's dtype under FP8.
        let fp8 = match &fp8_ways {
            Some(ways) if !f32_out => {
                let codes = weights
                    .iter()
                    .map(|w| Fp8Tensor::of_weight(&gpu, w, n * k))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let activations = Fp8Tensor::alloc(&gpu, max_rows * k)?;
                activations.quantize(&gpu, x.ptr, max_rows * k)?;
                Some((ways, codes, activations))
            }
            _ => None,
        };
        for &rows in row_counts {
            let us = time(&gpu, copies, |i| {
                gpu.gemm(y.ptr, f32_out, x.ptr, weights[i].ptr, rows, n, k)
            })?;
            let fp8 = match &fp8 {
                Some((ways, codes, activations)) => {
                    let [first, first_fast, timed] = ways;
                    // SAFETY: the buffers are live and of the problem's shapes; nothing
                    // captures this stream.
                    unsafe {
                        timed.time_choice(
                            &gpu.stream,
                            y.ptr,
                            activations,
                            &codes[0],
                            (rows, n, k),
                        )?;
                    }
                    let [first, first_fast, timed] = [first, first_fast, timed].map(|gemms| {
                        time(&gpu, copies, |i| {
                            gemms.gemm(
                                &gpu.stream,
                                y.ptr,
                                false,
                                activations.codes.ptr,
                                activations.scale.ptr,
                                codes[i].codes.ptr,
                                codes[i].scale.ptr,
                                rows,
                                n,
                                k,
                            )
                        })
                    });
                    Some(Fp8Timing {
                        first: first?,
                        first_fast: first_fast?,
                        timed: timed?,
                    })
                }
                None => None,
            };
            timings.push(GemmTiming {
                name,
                rows,
                n,
                k,
                us,
                fp8,
            });
        }
    }
    Ok(timings)
}

/// Microseconds per call of `gemm` (given the weight copy to use), over the copies in
/// turn, after one untimed pass (cuBLAS loads its kernels, and chooses, on first use).
fn time(
    gpu: &Gpu,
    copies: usize,
    gemm: impl Fn(usize) -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for i in 0..REPEATS.min(copies) {
        gemm(i)?;
    }
    gpu.stream.synchronize()?;
    let started = Instant::now();
    for i in 0..REPEATS {
        gemm(i % copies)?;
    }
    gpu.stream.synchronize()?;
    Ok(started.elapsed().as_secs_f64() * 1e6 / REPEATS as f64)
}

fn random_buffer(gpu: &Gpu, len: usize, seed: u64) -> anyhow::Result<DeviceBuffer> {
    let buffer = gpu.alloc(len * gpu.dtype.size_in_bytes())?;
    crate::weights::fill_random(gpu, buffer.ptr, len, seed, 0.0, 0.05)?;
    Ok(buffer)
}
