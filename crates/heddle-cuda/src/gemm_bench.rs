//! The weight GEMMs of a model's layer (and its LM head) timed alone at decode-sized row
//! counts, with the weight-read bandwidth and the arithmetic rate each reaches: where a
//! decode step's GEMM time goes, and how far each GEMM is from its floor (the weight read
//! at a few rows, the tensor cores at many).

use std::time::Instant;

use heddle_model::ModelConfig;

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
        for &rows in row_counts {
            // One pass first: cuBLAS loads its kernels on first use.
            for w in weights.iter().take(REPEATS) {
                gpu.gemm(y.ptr, f32_out, x.ptr, w.ptr, rows, n, k)?;
            }
            gpu.stream.synchronize()?;
            let started = Instant::now();
            for i in 0..REPEATS {
                let w = &weights[i % copies];
                gpu.gemm(y.ptr, f32_out, x.ptr, w.ptr, rows, n, k)?;
            }
            gpu.stream.synchronize()?;
            timings.push(GemmTiming {
                name,
                rows,
                n,
                k,
                us: started.elapsed().as_secs_f64() * 1e6 / REPEATS as f64,
            });
        }
    }
    Ok(timings)
}

fn random_buffer(gpu: &Gpu, len: usize, seed: u64) -> anyhow::Result<DeviceBuffer> {
    let buffer = gpu.alloc(len * gpu.dtype.size_in_bytes())?;
    crate::weights::fill_random(gpu, buffer.ptr, len, seed, 0.0, 0.05)?;
    Ok(buffer)
}
