//! Weight matrices and their matmul kernels.
//!
//! candle's CPU kernels for Q4_1 and Q8_0 are its generic scalar code on x86 (4.6 ms for one
//! 1536×576 Q4_1 matrix-vector product here, two orders of magnitude off), so heddle keeps
//! the GGUF blocks and multiplies them itself, the way llama.cpp does: each activation row is
//! quantized to ggml's Q8_0/Q8_1 form (32 values, one scale) and dotted in integers against
//! the weight blocks.
//!
//! Four weight forms cover the GGUF types people download, each loaded without changing a
//! weight ([`ggml_blocks`] decodes them): 4-bit blocks with a scale and a minimum (Q4_1,
//! Q4_0, Q4_K), 8-bit blocks with a scale per half and a minimum (Q5_0, Q5_1, Q5_K; see
//! [`q8_halves`]), Q6_K's own 6-bit blocks ([`q6_k`]) and Q8_0. Other quantizations are
//! dequantized to f32.
//!
//! Three kernel families, one chosen per process ([`Family`]): AVX-512 VNNI on weights
//! repacked 16 output columns at a time, AVX2 (on the same repacking for 4-bit and Q8_0
//! weights, [`grouped_avx2`]; on row-major blocks for the others), and portable Rust. Batch invariance is built into all three: every output element is computed by the
//! same sequence of operations on its own activation row and weight row, whatever the
//! number of rows, the tile it falls in or the thread that runs it. Nothing reduces across
//! rows, so a sequence's logits do not depend on what else is in the batch.

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::error::{ModelError, Result};

mod activations;
// The tiles index several arrays (accumulators, rows, columns) by the same r and c.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[macro_use]
mod avx2;
mod ggml_blocks;
mod portable;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[macro_use]
mod vnni;
#[cfg(target_arch = "x86_64")]
mod grouped_avx2;
mod q4_k;
mod q6_k;
mod q8_halves;
#[cfg(test)]
mod test_support;

pub use activations::QuantizedRows;
use ggml_blocks::{Decoder, Nibbles};

/// Elements per quantization block (ggml's QK4_1 = QK8_0 = QK8_1 = 32).
pub const QK: usize = 32;

/// Output columns per vector in the VNNI layouts: one f32 lane per column.
const LANES: usize = 16;

/// Row-major block-scale arrays are padded with zeros to a multiple of this, so the term
/// that sums per-block scales can run in whole vectors.
const SCALE_PAD: usize = 16;

/// Below this many multiply-adds (about 30 µs of one core at one row, where a product is
/// bound by memory) a matmul runs on the calling thread: handing work to the pool costs a
/// few microseconds, more when the other cores are busy, and every region waits for its
/// slowest thread. At 2^17 the embedded model's one-sequence decode step had ≈ 150
/// parallel regions and ran faster on one thread than on two; at 2^21 its one-row
/// products (0.3–1.8 M) stay on the calling thread, while a 1B model's (4–34 M) and every
/// batch of 16 still use the pool (docs/PERFORMANCE.md, session 7).
const PAR_MIN_MACS: usize = 1 << 21;

fn padded_blocks(nb: usize) -> usize {
    nb.div_ceil(SCALE_PAD) * SCALE_PAD
}

/// The kernels a CPU runs. Chosen once per process, so that every step uses the same
/// arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Portable,
    /// AVX2 + FMA (and F16C, which every AVX2 CPU has).
    Avx2,
    /// AVX-512 F/BW/VL + VNNI (and AVX2 + FMA for the f32 kernel).
    Vnni,
}

/// The kernel family of this process: the best the CPU supports, or a lesser one named by
/// `HEDDLE_CPU_KERNELS` (`avx2`, `portable`), to measure another family on the same
/// machine. Logged once.
fn family() -> Family {
    static FAMILY: OnceLock<Family> = OnceLock::new();
    *FAMILY.get_or_init(|| {
        let best = best_family();
        let chosen = match std::env::var("HEDDLE_CPU_KERNELS").as_deref() {
            Ok("portable") => Family::Portable,
            Ok("avx2") if best != Family::Portable => Family::Avx2,
            Ok("vnni") | Err(_) => best,
            Ok(other) => {
                tracing::warn!(
                    requested = other,
                    "HEDDLE_CPU_KERNELS is avx2, portable or vnni (if supported); using the best"
                );
                best
            }
        };
        tracing::info!(family = ?chosen, best = ?best, "CPU matmul kernels");
        chosen
    })
}

fn best_family() -> Family {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            let vnni = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
            return if vnni && has!("avx512vnni") {
                Family::Vnni
            } else {
                Family::Avx2
            };
        }
    }
    Family::Portable
}

/// How a weight matrix of `n` rows (outputs) by `k` columns (inputs) is stored.
#[derive(Debug)]
enum Storage {
    /// ggml Q4_1: per block of 32, a scale `d`, a minimum `m` and 4-bit values;
    /// w = d·q + m. `qs` holds 16 bytes per block, element j in the low nibble of byte j
    /// and element j + 16 in the high one (ggml's layout). Scales padded per row.
    Q4_1 {
        qs: Vec<u8>,
        d: Vec<f32>,
        m: Vec<f32>,
    },
    /// ggml Q8_0: per block of 32, a scale `d` and 8-bit values; w = d·q.
    Q8_0 { qs: Vec<i8>, d: Vec<f32> },
    /// Q4_1 for the VNNI and AVX2 kernels, in groups of 16 rows of W (see [`vnni`]).
    Q4_1x16 {
        qs: Vec<u8>,
        d: Vec<f32>,
        m: Vec<f32>,
    },
    /// Q8_0 for the VNNI and AVX2 kernels, values offset by 128 (see [`vnni`]).
    Q8_0x16 { qs: Vec<u8>, d: Vec<f32> },
    /// 8-bit values with a scale per half-block of 16 and a minimum per block:
    /// w = d[half]·q + m. Row-major; two scales per block, minimums padded per row.
    Q8Halves {
        qs: Vec<i8>,
        d: Vec<f32>,
        m: Vec<f32>,
    },
    /// Q4_K for the VNNI kernel: Q4_1x16's nibbles, each block's 6-bit scale and minimum
    /// factors, each super-block's scales (see [`q4_k`]).
    Q4Kx16(q4_k::Q4Kx16),
    /// [`Storage::Q8Halves`] for the VNNI kernel, in groups of 16 rows of W (see
    /// [`q8_halves`]).
    Q8Halvesx16 {
        qs: Vec<u8>,
        d: Vec<f32>,
        m: Vec<f32>,
    },
    /// Q6_K at 6 bits a weight, row-major or for the VNNI kernel (see [`q6_k`]).
    Q6K(q6_k::Q6K),
    /// Plain f32, row-major.
    F32(Vec<f32>),
}

/// The form a weight matrix is multiplied in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WeightFormat {
    /// 4-bit values, a scale and a minimum per 32 (from Q4_0, Q4_1, Q4_K).
    Nibbles,
    /// 8-bit values, a scale per 16 and a minimum per 32 (from Q5_0, Q5_1, Q5_K).
    Q8Halves,
    /// Q6_K's own 6-bit values and factors.
    Q6K,
    /// ggml Q8_0.
    Q8_0,
    /// f32: unquantized files, and quantizations without a native kernel (dequantized).
    F32,
}

/// A weight matrix used as `y = x · Wᵀ` (one output per row of W).
#[derive(Debug)]
pub struct Linear {
    n: usize,
    k: usize,
    storage: Storage,
}

/// Calls `put(c, b, gb, l)` for block `b` of every row `c` of an n × nb·32 matrix laid
/// out in groups of 16 rows: `gb` = g·nb + b indexes the group's block, `l` is the row's
/// lane in it.
fn for_each_grouped_block(n: usize, nb: usize, mut put: impl FnMut(usize, usize, usize, usize)) {
    for c in 0..n {
        let (g, l) = (c / LANES, c % LANES);
        for b in 0..nb {
            put(c, b, g * nb + b, l);
        }
    }
}

/// The value of element `e` (0..32) of a ggml Q4_1 block's 16 bytes of nibbles.
fn q4_1_nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    }
}

/// Where element `e` of lane `l`'s block `gb` is in a Q8_0x16 layout's values (see
/// [`vnni`]).
fn q8x16_at(gb: usize, l: usize, e: usize) -> usize {
    gb * 512 + (e / 4) * 64 + 4 * l + e % 4
}

/// Element `e` of lane `l`'s block `gb` in a Q4_1x16 layout's nibbles (see [`vnni`]).
fn q4_1x16_nibble(qs: &[u8], gb: usize, l: usize, e: usize) -> u8 {
    let (j, shift) = if e < 16 {
        (e / 4, 0)
    } else {
        ((e - 16) / 4, 4)
    };
    qs[gb * 256 + j * 64 + 4 * l + e % 4] >> shift & 0x0F
}

/// Stores a ggml Q4_1 block's 16 bytes of nibbles as lane `l` of block `gb` of the
/// Q4_1x16 layout (see [`vnni`]).
fn put_q4_1x16_nibbles(qs: &mut [u8], gb: usize, l: usize, src: &[u8; 16]) {
    for j in 0..4 {
        for t in 0..4 {
            let lo = q4_1_nibble(src, 4 * j + t);
            let hi = q4_1_nibble(src, 16 + 4 * j + t);
            qs[gb * 256 + j * 64 + 4 * l + t] = lo | hi << 4;
        }
    }
}

impl Linear {
    /// Wraps a row-major f32 matrix of `n` rows by `k` columns.
    pub fn from_f32(name: &str, n: usize, k: usize, data: Vec<f32>) -> Result<Self> {
        if data.len() != n * k {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                expected: vec![n, k],
                actual: vec![data.len()],
            });
        }
        Ok(Linear {
            n,
            k,
            storage: Storage::F32(data),
        })
    }

    /// Takes a GGUF tensor of shape [n, k]. Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K and
    /// Q8_0 stay quantized (repacked for the kernels, every weight unchanged); other types
    /// are dequantized to f32 (F32/F16/BF16 losslessly; other quantizations cost 4× memory
    /// and their own rounding, which we accept over refusing the file).
    pub fn from_qtensor(name: &str, t: &QTensor) -> Result<Self> {
        Self::from_qtensor_for(name, t, family())
    }

    fn from_qtensor_for(name: &str, t: &QTensor, family: Family) -> Result<Self> {
        let dims = t.shape().dims();
        let &[n, k] = dims else {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                expected: vec![0, 0],
                actual: dims.to_vec(),
            });
        };
        let dtype = t.dtype();
        let decoder = ggml_blocks::decoder(dtype).filter(|_| k % dtype.block_size() == 0);
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let storage = match (dtype, decoder) {
            (GgmlDType::Q8_0, _) if k % QK == 0 => Self::q8_0_storage(n, k, &t.data()?, family),
            (GgmlDType::Q4K, Some(_)) if family == Family::Vnni => {
                Storage::Q4Kx16(q4_k::Q4Kx16::new(n, k, &t.data()?, row_bytes))
            }
            (GgmlDType::Q6K, Some(_)) => {
                Storage::Q6K(q6_k::Q6K::new(n, k, &t.data()?, row_bytes, family))
            }
            (_, Some(Decoder::Nibbles(decode))) => {
                let bytes = t.data()?;
                let block = |c: usize, b: usize| decode(&bytes[c * row_bytes..][..row_bytes], b);
                Self::nibble_storage(n, k, block, family)
            }
            (_, Some(Decoder::Bytes(decode))) => {
                let bytes = t.data()?;
                let block = |c: usize, b: usize| decode(&bytes[c * row_bytes..][..row_bytes], b);
                q8_halves::storage(n, k, block, family)
            }
            _ => {
                if !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
                    tracing::warn!(
                        tensor = name,
                        ?dtype,
                        "no native kernel for this quantization; dequantizing to f32"
                    );
                }
                let data = t
                    .dequantize(&candle_core::Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                return Self::from_f32(name, n, k, data);
            }
        };
        Ok(Linear { n, k, storage })
    }

    /// Q4_1's storage from block `b` of row `c` of any 4-bit format, for `family`.
    fn nibble_storage(
        n: usize,
        k: usize,
        block: impl Fn(usize, usize) -> Nibbles,
        family: Family,
    ) -> Storage {
        let nb = k / QK;
        if family != Family::Portable {
            let groups = n.div_ceil(LANES);
            let mut qs = vec![0u8; groups * nb * 256];
            let mut d = vec![0f32; groups * nb * LANES];
            let mut m = vec![0f32; groups * nb * LANES];
            for_each_grouped_block(n, nb, |c, b, gb, l| {
                let src = block(c, b);
                d[gb * LANES + l] = src.d;
                m[gb * LANES + l] = src.m;
                put_q4_1x16_nibbles(&mut qs, gb, l, &src.qs);
            });
            return Storage::Q4_1x16 { qs, d, m };
        }
        let nbp = padded_blocks(nb);
        let mut qs = Vec::with_capacity(n * nb * 16);
        let mut d = vec![0f32; n * nbp];
        let mut m = vec![0f32; n * nbp];
        for c in 0..n {
            for b in 0..nb {
                let src = block(c, b);
                d[c * nbp + b] = src.d;
                m[c * nbp + b] = src.m;
                qs.extend_from_slice(&src.qs);
            }
        }
        Storage::Q4_1 { qs, d, m }
    }

    /// Q8_0 from ggml's 34-byte blocks (f16 d, 32 signed bytes).
    fn q8_0_storage(n: usize, k: usize, bytes: &[u8], family: Family) -> Storage {
        const BLOCK_BYTES: usize = 34;
        let nb = k / QK;
        let block = |c: usize, b: usize| &bytes[(c * nb + b) * BLOCK_BYTES..][..BLOCK_BYTES];
        let half = |bytes: &[u8]| f16::from_le_bytes([bytes[0], bytes[1]]).to_f32();
        if family != Family::Portable {
            let groups = n.div_ceil(LANES);
            let mut qs = vec![128u8; groups * nb * 512];
            let mut d = vec![0f32; groups * nb * LANES];
            for_each_grouped_block(n, nb, |c, b, gb, l| {
                let src = block(c, b);
                d[gb * LANES + l] = half(&src[0..2]);
                for (e, &v) in src[2..].iter().enumerate() {
                    qs[q8x16_at(gb, l, e)] = (v as i8 as i16 + 128) as u8;
                }
            });
            return Storage::Q8_0x16 { qs, d };
        }
        let mut qs = Vec::with_capacity(n * k);
        let mut d = Vec::with_capacity(n * nb);
        for c in 0..n {
            for b in 0..nb {
                let src = block(c, b);
                d.push(half(&src[0..2]));
                qs.extend(src[2..].iter().map(|&v| v as i8));
            }
        }
        Storage::Q8_0 { qs, d }
    }

    /// Outputs (rows of W).
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Inputs (columns of W).
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// The form its products run in.
    pub fn format(&self) -> WeightFormat {
        match self.storage {
            Storage::Q4_1 { .. } | Storage::Q4_1x16 { .. } | Storage::Q4Kx16(_) => {
                WeightFormat::Nibbles
            }
            Storage::Q8Halves { .. } | Storage::Q8Halvesx16 { .. } => WeightFormat::Q8Halves,
            Storage::Q8_0 { .. } | Storage::Q8_0x16 { .. } => WeightFormat::Q8_0,
            Storage::Q6K(_) => WeightFormat::Q6K,
            Storage::F32(_) => WeightFormat::F32,
        }
    }

    /// Bytes of memory its weights take, scales included: what a product streams.
    pub fn bytes(&self) -> usize {
        fn size<T>(v: &[T]) -> usize {
            std::mem::size_of_val(v)
        }
        match &self.storage {
            Storage::Q4_1 { qs, d, m }
            | Storage::Q4_1x16 { qs, d, m }
            | Storage::Q8Halvesx16 { qs, d, m } => size(qs) + size(d) + size(m),
            Storage::Q8Halves { qs, d, m } => size(qs) + size(d) + size(m),
            Storage::Q8_0 { qs, d } => size(qs) + size(d),
            Storage::Q4Kx16(w) => w.bytes(),
            Storage::Q8_0x16 { qs, d } => size(qs) + size(d),
            Storage::Q6K(w) => w.bytes(),
            Storage::F32(w) => size(w),
        }
    }

    /// Whether this matrix multiplies quantized activations.
    pub fn wants_quantized_input(&self) -> bool {
        !matches!(self.storage, Storage::F32(_))
    }

    /// The same matrix with every weight dequantized to f32: a product with it skips the
    /// 8-bit rounding of the activations, so it computes the model's exact function in
    /// f32 (4 bytes a weight: a reference mode, not a serving one).
    pub fn dequantized(&self) -> Linear {
        let mut data = vec![0f32; self.n * self.k];
        for (r, row) in data.chunks_exact_mut(self.k).enumerate() {
            self.row(r, row);
        }
        Linear {
            n: self.n,
            k: self.k,
            storage: Storage::F32(data),
        }
    }

    /// Row `r` of W in f32: the embedding lookup. Dequantizing one row at a time spares
    /// a 113 MB f32 copy of the embedding table and gives the same values.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let (k, nb) = (self.k, self.k / QK);
        let (g, l) = (r / LANES, r % LANES);
        for b in 0..nb {
            let o = &mut out[b * QK..(b + 1) * QK];
            match &self.storage {
                Storage::F32(w) => o.copy_from_slice(&w[r * k + b * QK..][..QK]),
                Storage::Q8_0 { qs, d } => {
                    let q = &qs[(r * nb + b) * QK..][..QK];
                    for (o, &v) in o.iter_mut().zip(q) {
                        *o = d[r * nb + b] * v as f32;
                    }
                }
                Storage::Q4_1 { qs, d, m } => {
                    let nbp = padded_blocks(nb);
                    let q = &qs[(r * nb + b) * 16..][..16];
                    for (e, o) in o.iter_mut().enumerate() {
                        *o = d[r * nbp + b] * q4_1_nibble(q, e) as f32 + m[r * nbp + b];
                    }
                }
                Storage::Q8_0x16 { qs, d } => {
                    let gb = g * nb + b;
                    for (e, o) in o.iter_mut().enumerate() {
                        let v = qs[q8x16_at(gb, l, e)] as i32 - 128;
                        *o = d[gb * LANES + l] * v as f32;
                    }
                }
                Storage::Q4_1x16 { qs, d, m } => {
                    let gb = g * nb + b;
                    for (e, o) in o.iter_mut().enumerate() {
                        let v = q4_1x16_nibble(qs, gb, l, e);
                        *o = d[gb * LANES + l] * v as f32 + m[gb * LANES + l];
                    }
                }
                Storage::Q8Halves { .. } | Storage::Q8Halvesx16 { .. } => {
                    q8_halves::block_values(&self.storage, nb, r, b, o)
                }
                Storage::Q4Kx16(w) => w.block_values(nb, r, b, o),
                Storage::Q6K(w) => w.block_values(nb, r, b, o),
            }
        }
        if let Storage::F32(w) = &self.storage {
            let done = nb * QK;
            out[done..k].copy_from_slice(&w[r * k + done..(r + 1) * k]);
        }
    }

    /// `out[r][c] = Σ_j x[r][j] · W[c][j]` for the `x.rows` rows of `x`.
    pub fn forward(&self, x: &Input, out: &mut [f32]) {
        forward_all(&mut [(self, out)], x)
    }

    /// Checks that `x` and an output of `out_len` floats fit this matrix, so that the
    /// kernels may walk raw pointers; returns the quantized activations if it needs them.
    fn check<'a>(&self, x: &Input<'a>, out_len: usize) -> Option<&'a QuantizedRows> {
        let (m, n, k) = (x.rows, self.n, self.k);
        let (nb, groups) = (k / QK, n.div_ceil(LANES));
        let nbp = padded_blocks(nb);
        assert_eq!(
            x.x.len(),
            m * k,
            "activation shape does not match W's {k} inputs"
        );
        assert_eq!(out_len, m * n, "output shape does not match {m}×{n}");
        match &self.storage {
            Storage::Q4_1 { qs, d, m } => {
                assert!(qs.len() == n * nb * 16 && d.len() == n * nbp && m.len() == n * nbp)
            }
            Storage::Q8_0 { qs, d } => assert!(qs.len() == n * k && d.len() == n * nb),
            Storage::Q4_1x16 { qs, d, m } => assert!(
                qs.len() == groups * nb * 256
                    && d.len() == groups * nb * LANES
                    && m.len() == groups * nb * LANES
            ),
            Storage::Q8_0x16 { qs, d } => {
                assert!(qs.len() == groups * nb * 512 && d.len() == groups * nb * LANES)
            }
            Storage::Q8Halves { qs, d, m } => {
                assert!(qs.len() == n * k && d.len() == n * nb * 2 && m.len() == n * nbp)
            }
            Storage::Q4Kx16(w) => assert!(w.fits(n, nb)),
            Storage::Q6K(w) => assert!(w.fits(n, nb)),
            Storage::Q8Halvesx16 { qs, d, m } => assert!(
                qs.len() == groups * nb * 512
                    && d.len() == groups * nb * 2 * LANES
                    && m.len() == groups * nb * LANES
            ),
            Storage::F32(w) => {
                assert_eq!(w.len(), n * k);
                return None;
            }
        }
        let q = x.q.expect("quantized weights need quantized activations");
        assert!(q.rows == m && q.nb == nb && q.qs.len() >= m * k);
        assert!(q.d.len() >= m * nbp && q.s.len() >= m * nbp && q.sums.len() >= m * nbp);
        assert!(q.lo_sums.len() >= m * nbp);
        Some(q)
    }

    /// Computes columns `cols` of every row into `out` (row stride n).
    ///
    /// # Safety
    /// [`Linear::check`] passed for `x` and `out`; `q` is what it returned; the CPU has
    /// `family`'s features; no other thread writes these columns; `cols` starts on a
    /// group of 16.
    unsafe fn run(
        &self,
        family: Family,
        x: &Input,
        q: Option<&QuantizedRows>,
        cols: Range<usize>,
        out: OutPtr,
    ) {
        let (m, n, k, nb) = (x.rows, self.n, self.k, self.k / QK);
        // SAFETY: the caller's contract covers every kernel's.
        unsafe {
            match (&self.storage, family) {
                (Storage::Q4_1 { qs, d, m: mins }, _) => {
                    let w = portable::Q4_1Ref { nb, qs, d, m: mins };
                    portable::run(&w, q.unwrap(), cols, n, out)
                }
                (Storage::Q8_0 { qs, d }, _) => {
                    let w = portable::Q8_0Ref { nb, qs, d };
                    portable::run(&w, q.unwrap(), cols, n, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Storage::Q4_1x16 { qs, d, m: mins }, f) => {
                    let w = vnni::Q4_1x16 { qs, d, m: mins };
                    match f {
                        Family::Avx2 => grouped_avx2::run(&w, nb, q.unwrap(), cols, n, out),
                        _ => vnni::run(&w, nb, q.unwrap(), cols, n, out),
                    }
                }
                #[cfg(target_arch = "x86_64")]
                (Storage::Q8_0x16 { qs, d }, f) => {
                    let w = vnni::Q8_0x16 { qs, d };
                    match f {
                        Family::Avx2 => grouped_avx2::run(&w, nb, q.unwrap(), cols, n, out),
                        _ => vnni::run(&w, nb, q.unwrap(), cols, n, out),
                    }
                }
                (Storage::Q8Halves { qs, d, m: mins }, f) => {
                    let w = q8_halves::RowMajor { nb, qs, d, m: mins };
                    match f {
                        #[cfg(target_arch = "x86_64")]
                        Family::Avx2 => avx2::run(&w, q.unwrap(), x.rows, cols, n, out),
                        _ => portable::run(&w, q.unwrap(), cols, n, out),
                    }
                }
                #[cfg(target_arch = "x86_64")]
                (Storage::Q4Kx16(w), _) => w.run(nb, q.unwrap(), cols, n, out),
                #[cfg(target_arch = "x86_64")]
                (Storage::Q8Halvesx16 { qs, d, m: mins }, _) => {
                    let w = q8_halves::vnni::Grouped { qs, d, m: mins };
                    vnni::run(&w, nb, q.unwrap(), cols, n, out)
                }
                (Storage::Q6K(w), f) => w.run(f, nb, q.unwrap(), cols, n, out),
                #[cfg(target_arch = "x86_64")]
                (Storage::F32(w), Family::Avx2 | Family::Vnni) => {
                    avx2::run(&avx2::F32Rows { w, k }, x.x, m, cols, n, out)
                }
                (Storage::F32(w), _) => portable::f32(w, k, x.x, m, cols, n, out),
                #[cfg(not(target_arch = "x86_64"))]
                _ => unreachable!("VNNI layouts exist only on x86-64"),
            }
        }
    }
}

/// Several matrices that read the same input (Q, K and V; gate and up), each into its
/// own output, in one parallel region: a fork and join costs microseconds, and a layer
/// of a small model has few microseconds of work per matrix.
pub fn forward_all(jobs: &mut [(&Linear, &mut [f32])], x: &Input) {
    forward_all_with(family(), jobs, x)
}

/// [`forward_all`] with the kernels of `family` (which the CPU must support).
fn forward_all_with(family: Family, jobs: &mut [(&Linear, &mut [f32])], x: &Input) {
    let checked: Vec<(&Linear, Option<&QuantizedRows>, OutPtr)> = jobs
        .iter_mut()
        .map(|(w, out)| (*w, w.check(x, out.len()), OutPtr(out.as_mut_ptr())))
        .collect();
    let macs: usize = checked.iter().map(|(w, ..)| x.rows * w.n * w.k).sum();
    let threads = rayon::current_num_threads();
    // Several chunks per thread balance the load when a thread is slowed by others;
    // chunk edges fall on 16-column groups, which no kernel splits.
    let chunks = if macs < PAR_MIN_MACS { 1 } else { threads * 4 };
    let total_cols: usize = checked.iter().map(|(w, ..)| w.n).sum();
    let chunk = total_cols.div_ceil(chunks).next_multiple_of(LANES);
    let items: Vec<(usize, Range<usize>)> = checked
        .iter()
        .enumerate()
        .flat_map(|(j, (w, ..))| {
            (0..w.n.div_ceil(chunk)).map(move |i| (j, i * chunk..w.n.min((i + 1) * chunk)))
        })
        .collect();
    let work = |(j, cols): &(usize, Range<usize>)| {
        let (w, q, out) = &checked[*j];
        // SAFETY: checked above; items cover disjoint columns of each output; the
        // family's features were detected.
        unsafe { w.run(family, x, *q, cols.clone(), *out) }
    };
    if items.len() == 1 || threads == 1 {
        items.iter().for_each(work);
    } else {
        items.par_iter().for_each(work);
    }
}

/// Activations entering a matmul: `rows` rows in f32, plus their Q8 form when some weight
/// is quantized (made once, shared by every matrix that reads the same input).
pub struct Input<'a> {
    pub x: &'a [f32],
    pub rows: usize,
    pub q: Option<&'a QuantizedRows>,
}

impl<'a> Input<'a> {
    pub fn new(x: &'a [f32], rows: usize, q: Option<&'a QuantizedRows>) -> Self {
        Input { x, rows, q }
    }
}

/// Raw pointer to a matmul output shared by the threads that fill disjoint columns of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: used only by `Linear::forward`, whose workers write disjoint elements.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// # Safety
    /// `i` is in bounds and no other thread writes element `i`.
    unsafe fn write(self, i: usize, v: f32) {
        unsafe { *self.0.add(i) = v }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{families, ggml_values, noise, product, qtensor, DECODED_DTYPES};
    use super::*;

    fn dequantized(lin: &Linear) -> Vec<f32> {
        match lin.dequantized().storage {
            Storage::F32(data) => data,
            _ => unreachable!("dequantized matrices are f32"),
        }
    }

    fn run(lin: &Linear, x: &[f32], rows: usize) -> Vec<f32> {
        product(family(), lin, x, rows)
    }

    fn reference(w: &[f32], x: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                out[r * n + c] = (0..k)
                    .map(|j| w[c * k + j] as f64 * x[r * k + j] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// Every type with a native kernel, and f32.
    fn dtypes() -> Vec<GgmlDType> {
        let mut dtypes = DECODED_DTYPES.to_vec();
        dtypes.extend([GgmlDType::Q8_0, GgmlDType::F32]);
        dtypes
    }

    /// A 37 × 256 matrix of `dtype` (from seed `seed`), `rows` rows of activations (from
    /// seed `seed + 1`), and their exact product with the dequantized matrix.
    fn exact_case(dtype: GgmlDType, rows: usize, seed: u64) -> (Linear, Vec<f32>, Vec<f32>) {
        let (n, k) = (37, 256);
        let lin = Linear::from_qtensor("w", &qtensor(dtype, n, k, seed)).unwrap();
        let x = noise(rows * k, seed + 1);
        let want = reference(&dequantized(&lin), &x, rows, n, k);
        (lin, x, want)
    }

    /// `k` rounded up to whole blocks of `dtype` (the K-quants' super-blocks hold 256).
    fn fit(dtype: GgmlDType, k: usize) -> usize {
        k.next_multiple_of(dtype.block_size())
    }

    #[test]
    fn native_types_load_without_dequantizing() {
        for dtype in dtypes() {
            let t = qtensor(dtype, 20, 256, 1);
            let lin = Linear::from_qtensor("w", &t).unwrap();
            assert_eq!(
                lin.wants_quantized_input(),
                dtype != GgmlDType::F32,
                "{dtype:?}"
            );
            // The repacked weights are ggml's, value for value.
            let ggml = ggml_values(&t);
            assert_eq!(dequantized(&lin), ggml, "{dtype:?}");
        }
        let other = Linear::from_qtensor("w", &qtensor(GgmlDType::Q3K, 20, 256, 1)).unwrap();
        assert!(
            !other.wants_quantized_input(),
            "Q3_K keeps the f32 fallback"
        );
    }

    #[test]
    fn quantized_matmuls_match_the_dequantized_product() {
        for dtype in dtypes() {
            let (lin, x, want) = exact_case(dtype, 6, 1);
            let got = run(&lin, &x, 6);
            // Rounding x to 8 bits errs by up to max|x|/254 per value (uniform, σ ≈ 0.0023
            // for x in [-1, 1)); times w (σ ≈ 0.58) and summed over k = 256 terms that is
            // σ ≈ 0.02 on each output. 0.15 is 7σ; a kernel bug (a wrong nibble, scale
            // or block) errs by the size of the outputs themselves, about 5.
            let mut total = 0f32;
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 0.15, "{dtype:?}: {g} vs {w}");
                total += (g - w).abs();
            }
            assert!(
                total / (got.len() as f32) < 0.03,
                "{dtype:?}: mean error too large"
            );
        }
    }

    #[test]
    fn a_dequantized_matrix_computes_the_exact_product() {
        for dtype in dtypes() {
            let (lin, x, want) = exact_case(dtype, 3, 5);
            let exact = lin.dequantized();
            assert!(!exact.wants_quantized_input());
            let mut got = vec![0f32; want.len()];
            exact.forward(&Input::new(&x, 3, None), &mut got);
            for (g, w) in got.iter().zip(&want) {
                // f32 sums of 256 products of size ~1: rounding alone, ~1e-6.
                assert!((g - w).abs() < 1e-4, "{dtype:?}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn every_row_is_independent_of_the_others() {
        for dtype in dtypes() {
            let (n, k) = (1000, fit(dtype, 576));
            let lin = Linear::from_qtensor("w", &qtensor(dtype, n, k, 3)).unwrap();
            let x = noise(11 * k, 4);
            let all = run(&lin, &x, 11);
            for r in [0, 3, 4, 10] {
                let alone = run(&lin, &x[r * k..(r + 1) * k], 1);
                assert_eq!(alone, all[r * n..(r + 1) * n], "{dtype:?} row {r}");
            }
            let middle = run(&lin, &x[2 * k..9 * k], 7);
            assert_eq!(middle, all[2 * n..9 * n], "{dtype:?} rows 2..9");
        }
    }

    #[test]
    fn matrices_run_together_as_they_run_alone() {
        // 16 rows: 2.6 M multiply-adds in all, above PAR_MIN_MACS, so the pool splits them.
        let (k, rows) = (192, 16);
        let x = noise(rows * k, 8);
        let mut q = QuantizedRows::default();
        q.quantize(&x, rows);
        let input = Input::new(&x, rows, Some(&q));
        let mats: Vec<Linear> = [
            (400, GgmlDType::Q4_1),
            (48, GgmlDType::Q4_0),
            (300, GgmlDType::Q8_0),
            (100, GgmlDType::Q5_1),
        ]
        .iter()
        .zip(10..)
        .map(|(&(n, dtype), seed)| Linear::from_qtensor("w", &qtensor(dtype, n, k, seed)).unwrap())
        .collect();
        let macs: usize = mats.iter().map(|m| rows * m.n * m.k).sum();
        assert!(macs >= PAR_MIN_MACS);
        let alone: Vec<Vec<f32>> = mats.iter().map(|m| run(m, &x, rows)).collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|m| vec![0f32; rows * m.n]).collect();
        let mut jobs: Vec<(&Linear, &mut [f32])> = mats
            .iter()
            .zip(outs.iter_mut())
            .map(|(m, o)| (m, o.as_mut_slice()))
            .collect();
        forward_all(&mut jobs, &input);
        assert_eq!(outs, alone);
    }

    /// Every family this CPU supports, built from the same tensors, agrees with the
    /// portable kernels (up to float rounding order) and dequantizes the same rows.
    #[test]
    fn kernel_families_agree() {
        // Odd shapes: a partial last group of 16 columns, an odd number of blocks.
        for (n, k, rows) in [(34, 192, 5), (67, 160, 9)] {
            for dtype in dtypes() {
                // K-quants: 3 super-blocks, 24 blocks.
                let k = if dtype.block_size() > QK { 768 } else { k };
                let t = qtensor(dtype, n, k, 5);
                let x = noise(rows * k, 6);
                let portable = Linear::from_qtensor_for("w", &t, Family::Portable).unwrap();
                let want = product(Family::Portable, &portable, &x, rows);
                for f in families() {
                    let lin = Linear::from_qtensor_for("w", &t, f).unwrap();
                    assert_eq!(dequantized(&lin), dequantized(&portable), "{f:?} {dtype:?}");
                    let got = product(f, &lin, &x, rows);
                    for (a, b) in got.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "{f:?} {dtype:?} k={k}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
