//! FP8 (E4M3) matrix multiplication on Hopper: values quantized with a scale (per tensor,
//! as the runner does it: a weight once, at load, activations before each projection; or
//! per row, which `heddle-cuda fp8` tries), multiplied by cuBLASLt's FP8 kernels, which
//! apply the scales in their epilogue.
//!
//! E4M3 is 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities, largest finite
//! 448. Values x are stored as q = e4m3(x · 448 / max|x|) and scale = max|x| / 448, so that
//! x ≈ q · scale, using the format's whole range. The device quantizes with the
//! hardware conversion (round to nearest even, saturating); [`e4m3_from_f32`] is the same
//! on the CPU, the reference the checks compare the device's bytes with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use anyhow::Context;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaStream;

use crate::gpu::{grid, DeviceBuffer, Gpu};
use crate::kernels::QUANTIZE_THREADS;
use crate::lt_matmul::{layouts, Layout, LtMatmul};

/// The largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;
/// The smallest maximum magnitude a scale is computed from: all zeros get a finite scale.
pub const MIN_ABS_MAX: f32 = 1e-30;

/// The E4M3 code of `x`, rounded to nearest (ties to even), saturated to ±448; NaN stays
/// NaN (0x7f with the sign).
pub fn e4m3_from_f32(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7f;
    }
    // Subnormals are multiples of 2^-9 below 2^-6; their codes are those multiples, and a
    // value rounding up to 2^-6 gets code 8, the smallest normal, by the same formula.
    if a < 2f32.powi(-6) {
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    if a >= 2f32.powi(9) {
        return sign | 0x7e;
    }
    let mut exponent = ((a.to_bits() >> 23) as i32) - 127;
    let mut mantissa = ((a / 2f32.powi(exponent) - 1.0) * 8.0).round_ties_even() as i32;
    if mantissa == 8 {
        exponent += 1;
        mantissa = 0;
    }
    // 480 (exponent 8, mantissa 7) is the NaN code: anything that far saturates to 448.
    if exponent > 8 || (exponent == 8 && mantissa == 7) {
        return sign | 0x7e;
    }
    sign | (((exponent + 7) as u8) << 3) | mantissa as u8
}

/// The value of an E4M3 code.
pub fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let (exponent, mantissa) = ((code >> 3) & 0x0f, code & 0x07);
    if exponent == 0x0f && mantissa == 0x07 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa as f32 / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa as f32 / 8.0) * 2f32.powi(exponent as i32 - 7)
    };
    sign * magnitude
}

/// Values quantized with one scale as the device does it (`quantize_fp8_tensor`): their
/// codes and the scale.
pub fn quantize_row(row: &[f32]) -> (Vec<u8>, f32) {
    let max = row
        .iter()
        .fold(0f32, |m, &x| m.max(x.abs()))
        .max(MIN_ABS_MAX);
    let inverse = E4M3_MAX / max;
    (
        row.iter().map(|&x| e4m3_from_f32(x * inverse)).collect(),
        max / E4M3_MAX,
    )
}

/// A tensor of the runner's dtype quantized to E4M3 on the device with one scale: the
/// form the runner's FP8 projections take (weights once, at load; activations before each
/// projection). cuBLASLt applies the scale in the GEMM's epilogue. (It also runs per-row
/// scales, slower at decode sizes: `heddle-cuda gemm`.)
pub struct Fp8Tensor {
    /// The codes, a byte each.
    pub codes: DeviceBuffer,
    /// Three words: the scale (f32), which the GEMM reads, then two slots for the running
    /// maximum's bits that a scale is made from (see `quantize`).
    pub scale: DeviceBuffer,
    /// The maximum slot the next quantization uses.
    next_slot: AtomicU32,
}

impl Fp8Tensor {
    /// Room for `len` values.
    pub fn alloc(gpu: &Gpu, len: usize) -> anyhow::Result<Self> {
        let scale = gpu.alloc(12)?;
        gpu.zero(scale.ptr, 12)?;
        Ok(Fp8Tensor {
            codes: gpu.alloc(len)?,
            scale,
            next_slot: AtomicU32::new(0),
        })
    }

    /// Quantizes `len` values at `x` into these buffers (queued on the stream): the
    /// maximum magnitude, then the codes. `len` must be even and fit.
    ///
    /// The maximum is found with atomics into a slot that must start at zero. Calls take
    /// the two slots in turn and each one's second kernel zeroes the other slot, so that
    /// no launch is spent on zeroing. A runner's steps make an even number of calls, so
    /// graphs replay the same turns; were a call ever to find a slot not zeroed, its scale
    /// would come out larger (coarser codes), never too small.
    pub fn quantize(&self, gpu: &Gpu, x: u64, len: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            len <= self.codes.bytes && len.is_multiple_of(2),
            "FP8 tensor: {len} values do not fit"
        );
        let slot = self.next_slot.fetch_xor(1, Ordering::Relaxed) as i32;
        let max_bits = self.scale.ptr + 4 + 4 * slot as u64;
        let blocks = len.div_ceil(QUANTIZE_THREADS as usize * 8).clamp(1, 1024);
        gpu.launch(
            "absmax_bits",
            grid(blocks, QUANTIZE_THREADS),
            &[&x, &(len as i64), &max_bits],
        )?;
        gpu.launch(
            "quantize_fp8_tensor",
            grid(blocks, QUANTIZE_THREADS),
            &[
                &x,
                &self.codes.ptr,
                &self.scale.ptr,
                &(len as i64 / 2),
                &slot,
            ],
        )
    }

    /// A weight of `len` values quantized with one scale.
    pub fn of_weight(gpu: &Gpu, w: &DeviceBuffer, len: usize) -> anyhow::Result<Self> {
        let tensor = Self::alloc(gpu, len)?;
        tensor.quantize(gpu, w.ptr, len)?;
        Ok(tensor)
    }
}

/// What an FP8 GEMM is planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Problem {
    rows: usize,
    n: usize,
    k: usize,
    f32_out: bool,
}

impl Problem {
    fn new(rows: usize, n: usize, k: usize, f32_out: bool) -> anyhow::Result<Self> {
        anyhow::ensure!(
            k.is_multiple_of(16),
            "FP8 GEMMs need k a multiple of 16, not {k}"
        );
        Ok(Problem {
            rows,
            n,
            k,
            f32_out,
        })
    }

    /// The problem standing for its power-of-two class of row counts.
    fn class(self) -> Problem {
        Problem {
            rows: self.rows.next_power_of_two(),
            ..self
        }
    }

    fn layouts(self) -> anyhow::Result<[Layout; 3]> {
        let fp8 = sys::cudaDataType::CUDA_R_8F_E4M3;
        let out = if self.f32_out {
            sys::cudaDataType::CUDA_R_32F
        } else {
            sys::cudaDataType::CUDA_R_16BF
        };
        layouts(fp8, fp8, out, self.rows, self.n, self.k)
    }
}

/// How the GEMM applies the scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleMode {
    /// A scale per weight row (output channel) and one per activation row (token).
    PerRow,
    /// One scale for each whole matrix (the first element of each scale buffer).
    PerTensor,
}

/// Hopper's FP8 tensor cores sum a product's terms with fewer bits than f32; by default
/// cuBLASLt's kernels move the sums into f32 registers every few steps along k, which
/// costs instructions. Fast accumulation keeps the tensor cores' sums to the end (as the
/// FP8 kernels of other servers do): 2–5 % faster at the 8B shape's projections, relative
/// error against f64 still ≈ 3e-4 (`heddle-cuda fp8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    PromotedToF32,
    Fast,
}

/// Candidates timed when an algorithm is chosen by timing.
const TIMED_CANDIDATES: usize = 8;
const TIMING_REPEATS: usize = 5;

/// cuBLASLt FP8 GEMMs: y[rows, n] = (x_q[rows, k] · w_q[n, k]ᵀ) scaled by each row's and
/// column's scale (or each matrix's), accumulated in f32, written in bf16 or f32.
///
/// Each problem gets cuBLASLt's first choice, unless [`Self::time_choice`] timed the
/// candidates for its power-of-two class of row counts (at prefill sizes the heuristic's
/// first is up to 15 % slower than its best): then that choice, where cuBLASLt says it
/// runs the problem. Choices are timed once, before serving, so that no step waits for
/// them and graphs capture the same kernels a step without a graph runs.
pub struct Fp8Gemms {
    matmul: LtMatmul,
    mode: ScaleMode,
    /// The algorithm of each problem seen; the lock also keeps one call's scale pointers
    /// on the descriptor until its matmul is queued.
    algorithms: Mutex<HashMap<Problem, sys::cublasLtMatmulAlgo_t>>,
    /// Timed choices, by the problem with its rows rounded up to a power of two.
    timed: Mutex<HashMap<Problem, sys::cublasLtMatmulAlgo_t>>,
}

impl Fp8Gemms {
    /// `workspace`: device memory of `workspace_bytes` the GEMMs may use (the runner's,
    /// shared with cuBLAS on its one stream).
    pub fn new(
        mode: ScaleMode,
        accumulation: Accumulation,
        workspace: u64,
        workspace_bytes: usize,
    ) -> anyhow::Result<Self> {
        let matmul = LtMatmul::new(workspace, workspace_bytes)?;
        let scale_mode = match mode {
            ScaleMode::PerRow => {
                sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
            }
            ScaleMode::PerTensor => {
                sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F
            }
        } as i32;
        use sys::cublasLtMatmulDescAttributes_t as A;
        // SAFETY: the descriptor is new and unused; the scale modes are i32 and the fast
        // accumulation flag an i8, as the attributes want.
        unsafe {
            matmul.set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, scale_mode)?;
            matmul.set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, scale_mode)?;
            matmul.set(
                A::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                (accumulation == Accumulation::Fast) as i8,
            )?;
        }
        Ok(Fp8Gemms {
            matmul,
            mode,
            algorithms: Mutex::new(HashMap::new()),
            timed: Mutex::new(HashMap::new()),
        })
    }

    pub fn mode(&self) -> ScaleMode {
        self.mode
    }

    /// y[rows, n] = Σ_k x_q[r, k]·x_scales · w_q[n, k]·w_scales (row-major, f32
    /// accumulation; the scales per row or per matrix as the mode says), y in bf16 or f32
    /// (`f32_out`). `k` must be a multiple of 16.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        stream: &CudaStream,
        y: u64,
        f32_out: bool,
        x_q: u64,
        x_scales: u64,
        w_q: u64,
        w_scales: u64,
        rows: usize,
        n: usize,
        k: usize,
    ) -> anyhow::Result<()> {
        let problem = Problem::new(rows, n, k, f32_out)?;
        let layouts = problem.layouts()?;
        let mut algorithms = self.algorithms.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the lock is held; the pointers are live. cuBLASLt's heuristic reads them
        // (with per-row scales it refuses a descriptor without them).
        unsafe { self.set_scales(w_scales, x_scales)? };
        let algo = match algorithms.get(&problem) {
            Some(algo) => *algo,
            None => {
                let algo = self.choose(problem, &layouts).with_context(|| {
                    format!(
                        "cuBLASLt has no FP8 algorithm ({:?} scales) for {rows}x{n}x{k}",
                        self.mode
                    )
                })?;
                algorithms.insert(problem, algo);
                algo
            }
        };
        // SAFETY: the lock is held, so no other call changes the descriptor meanwhile; the
        // pointers address live buffers of the stated shapes; the workspace is the
        // runner's and outlives the call.
        unsafe {
            self.matmul.run(
                &algo,
                &layouts,
                w_q,
                x_q,
                y,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .with_context(|| format!("cuBLASLt FP8 GEMM {rows}x{n}x{k}"))
    }

    /// Times cuBLASLt's first candidates for `rows` rows of `x` times `w` [n, k] (bf16
    /// output into `y`) and keeps the fastest for every row count of its power-of-two
    /// class: a step's row counts use it from now on. Waits for the stream; overwrites
    /// `y`; the inputs' values do not matter.
    ///
    /// # Safety
    /// `x` holds at least `rows` × `k` codes, `w` is [n, k], `y` has room for `rows` × `n`
    /// bf16 values; the stream is not capturing.
    pub unsafe fn time_choice(
        &self,
        stream: &CudaStream,
        y: u64,
        x: &Fp8Tensor,
        w: &Fp8Tensor,
        (rows, n, k): (usize, usize, usize),
    ) -> anyhow::Result<()> {
        let problem = Problem::new(rows, n, k, false)?;
        let layouts = problem.layouts()?;
        let algorithms = self.algorithms.lock().unwrap_or_else(|e| e.into_inner());
        self.set_scales(w.scale.ptr, x.scale.ptr)?;
        let (w_q, x_q) = (w.codes.ptr, x.codes.ptr);
        let mut fastest: Option<(f64, sys::cublasLtMatmulAlgo_t)> = None;
        for algo in self.matmul.candidates(&layouts, false, TIMED_CANDIDATES)? {
            // A candidate that fails to run is passed over.
            if let Ok(us) = self
                .matmul
                .time(&algo, &layouts, w_q, x_q, y, stream, TIMING_REPEATS)
            {
                if fastest.is_none_or(|(best, _)| us < best) {
                    fastest = Some((us, algo));
                }
            }
        }
        let (us, algo) = fastest.context("no FP8 GEMM candidate ran")?;
        tracing::debug!(rows, n, k, us, "timed the FP8 GEMM's candidates");
        drop(algorithms);
        self.timed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(problem.class(), algo);
        // Row counts of the class seen before choose again.
        self.algorithms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|p, _| p.class() != problem.class());
        Ok(())
    }

    /// # Safety
    /// The caller holds `algorithms`' lock until its matmul is queued; the pointers are
    /// live.
    unsafe fn set_scales(&self, w_scales: u64, x_scales: u64) -> anyhow::Result<()> {
        use sys::cublasLtMatmulDescAttributes_t as A;
        self.matmul
            .set(A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, w_scales)?;
        self.matmul
            .set(A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, x_scales)
    }

    /// The algorithm for a problem not seen before: its class's timed choice where that
    /// runs it, else cuBLASLt's first.
    fn choose(
        &self,
        problem: Problem,
        layouts: &[Layout; 3],
    ) -> anyhow::Result<sys::cublasLtMatmulAlgo_t> {
        let timed = self.timed.lock().unwrap_or_else(|e| e.into_inner());
        match timed.get(&problem.class()) {
            Some(algo) if self.matmul.supports(algo, layouts) => Ok(*algo),
            _ => self.matmul.first_algorithm(layouts, false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_decodes_and_encodes_back_to_itself() {
        for code in 0u8..=255 {
            let value = e4m3_to_f32(code);
            if value.is_nan() {
                assert_eq!(code & 0x7f, 0x7f, "{code:#x}");
                assert_eq!(e4m3_from_f32(value) & 0x7f, 0x7f);
            } else if value == 0.0 {
                // +0 and -0 both encode with their sign.
                assert_eq!(e4m3_from_f32(value), code, "{code:#x}");
            } else {
                assert_eq!(e4m3_from_f32(value), code, "{code:#x} = {value}");
            }
        }
    }

    #[test]
    fn the_format_has_its_known_values() {
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
    }

    #[test]
    fn rounding_is_to_nearest_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code.
        assert_eq!(e4m3_from_f32(1.0625), 0x38);
        assert_eq!(e4m3_from_f32(1.0626), 0x39);
        // Between 1.125 and 1.25 (0x3a): the midpoint goes up, to the even code.
        assert_eq!(e4m3_from_f32(1.1875), 0x3a);
        // Above the largest finite value, and infinity: the largest finite value.
        assert_eq!(e4m3_from_f32(460.0), 0x7e);
        assert_eq!(e4m3_from_f32(1e9), 0x7e);
        assert_eq!(e4m3_from_f32(f32::INFINITY), 0x7e);
        assert_eq!(e4m3_from_f32(-f32::INFINITY), 0xfe);
        // Half the smallest subnormal rounds to zero (even); a bit more, up.
        assert_eq!(e4m3_from_f32(2f32.powi(-10)), 0x00);
        assert_eq!(e4m3_from_f32(2f32.powi(-10) * 1.01), 0x01);
        // The largest subnormal rounds up into the smallest normal.
        assert_eq!(e4m3_from_f32(2f32.powi(-6) * 0.99), 0x08);
    }

    #[test]
    fn a_quantized_row_uses_the_whole_range_and_rounds_back_closely() {
        let row: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) * 0.013).collect();
        let (codes, scale) = quantize_row(&row);
        let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_eq!(scale, max / E4M3_MAX);
        assert!(codes.contains(&0x7e) || codes.contains(&0xfe));
        for (&x, &c) in row.iter().zip(&codes) {
            // E4M3 keeps 3 mantissa bits: within 1/16 relative, or the subnormal step.
            let back = e4m3_to_f32(c) * scale;
            assert!(
                (back - x).abs() <= x.abs() / 16.0 + scale * 2f32.powi(-10),
                "{x} {back}"
            );
        }
        let (zeros, scale) = quantize_row(&[0.0; 8]);
        assert!(zeros.iter().all(|&c| c == 0) && scale.is_finite() && scale > 0.0);
    }
}
