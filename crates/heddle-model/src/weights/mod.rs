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

mod ggml_blocks;

use ggml_blocks::{Decoder, Nibbles};

/// Elements per quantization block (ggml's QK4_1 = QK8_0 = QK8_1 = 32).
pub const QK: usize = 32;

/// Output columns per vector in the VNNI layouts: one f32 lane per column.
const LANES: usize = 16;

/// Row-major block-scale arrays are padded with zeros to a multiple of this, so the term
/// that sums per-block scales can run in whole vectors.
const SCALE_PAD: usize = 16;

/// Below this many multiply-adds a matmul runs on the calling thread: handing work to the
/// pool costs a few microseconds, as much as the product itself.
const PAR_MIN_MACS: usize = 1 << 17;

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
    Q4Kx16 {
        qs: Vec<u8>,
        factors: Vec<u8>,
        scales: Vec<f32>,
    },
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

/// The value of element `e` (0..32) of a ggml Q4_1 block's 16 bytes of nibbles.
fn q4_1_nibble(qs: &[u8], e: usize) -> u8 {
    if e < 16 {
        qs[e] & 0x0F
    } else {
        qs[e - 16] >> 4
    }
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
                q4_k::vnni_storage(n, k, &t.data()?, row_bytes)
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
            for c in 0..n {
                let (g, l) = (c / LANES, c % LANES);
                for b in 0..nb {
                    let src = block(c, b);
                    let gb = g * nb + b;
                    d[gb * LANES + l] = src.d;
                    m[gb * LANES + l] = src.m;
                    put_q4_1x16_nibbles(&mut qs, gb, l, &src.qs);
                }
            }
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
            for c in 0..n {
                let (g, l) = (c / LANES, c % LANES);
                for b in 0..nb {
                    let src = block(c, b);
                    let gb = g * nb + b;
                    d[gb * LANES + l] = half(&src[0..2]);
                    for (e, &v) in src[2..].iter().enumerate() {
                        let (i, t) = (e / 4, e % 4);
                        qs[gb * 512 + i * 64 + 4 * l + t] = (v as i8 as i16 + 128) as u8;
                    }
                }
            }
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
            Storage::Q4_1 { .. } | Storage::Q4_1x16 { .. } | Storage::Q4Kx16 { .. } => {
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
            Storage::Q4Kx16 {
                qs,
                factors,
                scales,
            } => size(qs) + size(factors) + size(scales),
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
                        let v = qs[gb * 512 + (e / 4) * 64 + 4 * l + e % 4] as i32 - 128;
                        *o = d[gb * LANES + l] * v as f32;
                    }
                }
                Storage::Q4_1x16 { qs, d, m } => {
                    let gb = g * nb + b;
                    for (e, o) in o.iter_mut().enumerate() {
                        let (j, shift) = if e < 16 {
                            (e / 4, 0)
                        } else {
                            ((e - 16) / 4, 4)
                        };
                        let v = qs[gb * 256 + j * 64 + 4 * l + e % 4] >> shift & 0x0F;
                        *o = d[gb * LANES + l] * v as f32 + m[gb * LANES + l];
                    }
                }
                Storage::Q8Halves { .. } | Storage::Q8Halvesx16 { .. } => {
                    q8_halves::block_values(&self.storage, nb, r, b, o)
                }
                Storage::Q4Kx16 { .. } => q4_k::block_values(&self.storage, nb, r, b, o),
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
            Storage::Q4Kx16 { .. } => assert!(q4_k::check_sizes(&self.storage, n, nb)),
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
                    let w = Q4_1Ref { nb, qs, d, m: mins };
                    portable::q4_1(&w, q.unwrap(), cols, n, out)
                }
                (Storage::Q8_0 { qs, d }, _) => {
                    let w = Q8_0Ref { nb, qs, d };
                    portable::q8_0(&w, q.unwrap(), cols, n, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Storage::Q4_1x16 { qs, d, m: mins }, Family::Avx2) => {
                    grouped_avx2::q4_1x16(qs, d, mins, nb, q.unwrap(), cols, n, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Storage::Q4_1x16 { qs, d, m: mins }, _) => {
                    vnni::q4_1(qs, d, mins, nb, q.unwrap(), cols, n, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Storage::Q8_0x16 { qs, d }, Family::Avx2) => {
                    grouped_avx2::q8_0x16(qs, d, nb, q.unwrap(), cols, n, out)
                }
                #[cfg(target_arch = "x86_64")]
                (Storage::Q8_0x16 { qs, d }, _) => vnni::q8_0(qs, d, nb, q.unwrap(), cols, n, out),
                (Storage::Q8Halves { qs, d, m: mins }, f) => {
                    let w = q8_halves::RowMajor { nb, qs, d, m: mins };
                    match f {
                        #[cfg(target_arch = "x86_64")]
                        Family::Avx2 => q8_halves::avx2::run(&w, q.unwrap(), cols, n, out),
                        _ => q8_halves::portable::run(&w, q.unwrap(), cols, n, out),
                    }
                }
                #[cfg(target_arch = "x86_64")]
                (
                    Storage::Q4Kx16 {
                        qs,
                        factors,
                        scales,
                    },
                    _,
                ) => q4_k::vnni::run(qs, factors, scales, nb, q.unwrap(), cols, n, out),
                #[cfg(target_arch = "x86_64")]
                (Storage::Q8Halvesx16 { qs, d, m: mins }, _) => {
                    q8_halves::vnni::run(qs, d, mins, nb, q.unwrap(), cols, n, out)
                }
                (Storage::Q6K(w), f) => w.run(f, nb, q.unwrap(), cols, n, out),
                #[cfg(target_arch = "x86_64")]
                (Storage::F32(w), Family::Avx2 | Family::Vnni) => {
                    avx2::f32(w, k, x.x, m, cols, n, out)
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

/// Activation rows quantized like ggml's Q8_0/Q8_1 (the two share values and scales; Q8_1
/// adds `s`, the scale times the block sum, which the Q4_1 minimum multiplies). Each row
/// is quantized on its own: the form of one row never depends on another.
#[derive(Debug, Default)]
pub struct QuantizedRows {
    rows: usize,
    nb: usize,
    /// Values, row-major, blocks in order.
    qs: Vec<i8>,
    /// Per block (rows padded to a multiple of 16 blocks): scale, scale × sum (f16-rounded),
    /// the exact integer sum of the values, and that of its first 16.
    d: Vec<f32>,
    s: Vec<f32>,
    sums: Vec<i32>,
    lo_sums: Vec<i32>,
}

impl QuantizedRows {
    /// Quantizes `rows` rows of `x` (length a multiple of 32), reusing the buffers.
    ///
    /// Follows llama.cpp's x86 path: d = max|x|/127 and q = round-half-even(x/d); the
    /// stored d and s are rounded to f16, as ggml's blocks store them, so that the integer
    /// dot products see the same numbers as the reference.
    pub fn quantize(&mut self, x: &[f32], rows: usize) {
        let k = x.len() / rows.max(1);
        assert!(
            k.is_multiple_of(QK),
            "quantized rows need a multiple of {QK} values"
        );
        let nb = k / QK;
        let nbp = padded_blocks(nb);
        self.rows = rows;
        self.nb = nb;
        self.qs.resize(rows * k, 0);
        for v in [&mut self.d, &mut self.s] {
            v.clear();
            v.resize(rows * nbp, 0.0);
        }
        for v in [&mut self.sums, &mut self.lo_sums] {
            v.clear();
            v.resize(rows * nbp, 0);
        }
        let simd = family() != Family::Portable;
        let blocks = x.chunks_exact(QK).zip(self.qs.chunks_exact_mut(QK));
        for (i, (src, dst)) in blocks.enumerate() {
            let at = (i / nb) * nbp + i % nb;
            let block = match simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX2 and F16C were detected.
                true => unsafe { quantize_block_avx2(src, dst) },
                _ => quantize_block(src, dst),
            };
            self.d[at] = block.d;
            self.s[at] = block.s;
            self.sums[at] = block.sum;
            self.lo_sums[at] = block.lo_sum;
        }
    }
}

/// One quantized activation block's numbers besides its values.
#[derive(Debug, PartialEq)]
struct BlockSums {
    /// The scale, rounded to f16 as ggml stores it.
    d: f32,
    /// The scale times the sum of the values, rounded to f16.
    s: f32,
    /// The sum of the values, and of the first 16.
    sum: i32,
    lo_sum: i32,
}

/// Quantizes one block of 32.
fn quantize_block(src: &[f32], dst: &mut [i8]) -> BlockSums {
    let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in dst.iter_mut().zip(src) {
        *q = round_ties_even(v * id) as i8;
    }
    let sum_of = |q: &[i8]| q.iter().map(|&v| v as i32).sum::<i32>();
    let sum = sum_of(dst);
    BlockSums {
        d: f16::from_f32(d).to_f32(),
        s: f16::from_f32(d * sum as f32).to_f32(),
        sum,
        lo_sum: sum_of(&dst[..16]),
    }
}

/// [`quantize_block`] in AVX2 (the same numbers: max of |x|, round half to even), after
/// ggml's `quantize_row_q8_0`. The two f16 roundings take one F16C instruction each way
/// instead of `half`'s software conversion (the x86-64 baseline has no F16C): 1.3 of the
/// 7.6 ms that norms and quantization took in a 128-token prefill.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_avx2(src: &[f32], dst: &mut [i8]) -> BlockSums {
    use std::arch::x86_64::*;
    assert!(src.len() == QK && dst.len() == QK);
    // SAFETY: 32 floats in, 32 bytes out.
    let v: [__m256; 4] =
        std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.as_ptr().add(8 * i)) });
    let sign = _mm256_set1_ps(-0.0);
    let abs = |v: __m256| _mm256_andnot_ps(sign, v);
    let m = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let d = _mm_cvtss_f32(m) / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        _mm256_cvtps_epi32(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v[i], id)))
    });
    let hsum = |v: __m256i| {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    };
    let lo = _mm256_add_epi32(q[0], q[1]);
    let (lo_sum, sum) = (
        hsum(lo),
        hsum(_mm256_add_epi32(lo, _mm256_add_epi32(q[2], q[3]))),
    );
    // Pack to bytes; the 128-bit-lane interleaving of the packs is undone by a permute.
    let packed = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `dst` holds 32 bytes.
    unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, ordered) };
    // Both to f16 and back, rounding to nearest even as `half` does.
    let halves =
        _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_setr_ps(d, d * sum as f32, 0.0, 0.0));
    let rounded = _mm_cvtph_ps(halves);
    BlockSums {
        d: _mm_cvtss_f32(rounded),
        s: _mm_cvtss_f32(_mm_movehdup_ps(rounded)),
        sum,
        lo_sum,
    }
}

/// Rounds to the nearest integer, ties to even, for |v| < 2^22: adding 1.5·2^23 leaves no
/// fraction bits, so the FPU's default rounding does the work. `f32::round_ties_even`
/// compiles to a libm call on baseline x86-64, which cost 11% of a decode step.
#[inline(always)]
fn round_ties_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
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

    /// Writes `dot(c, r)` for every row `r < rows` and column `c` of `cols` of an output
    /// `n` columns wide: the portable kernels' loop.
    ///
    /// # Safety
    /// As for [`Self::write`], for every element written.
    unsafe fn write_each(
        self,
        rows: usize,
        cols: Range<usize>,
        n: usize,
        dot: impl Fn(usize, usize) -> f32,
    ) {
        for r in 0..rows {
            for c in cols.clone() {
                unsafe { self.write(r * n + c, dot(c, r)) }
            }
        }
    }
}

/// Row-major Q4_1 weights (scales padded per row).
struct Q4_1Ref<'a> {
    nb: usize,
    qs: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
}

/// Row-major Q8_0 weights.
struct Q8_0Ref<'a> {
    nb: usize,
    qs: &'a [i8],
    d: &'a [f32],
}

/// Plain Rust kernels for CPUs without AVX2: one element at a time, blocks in order.
mod portable {
    use super::*;

    fn q4_1_dot(w: &Q4_1Ref, c: usize, x: &QuantizedRows, r: usize) -> f32 {
        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let mut acc = 0f32;
        let mut mins = 0f32;
        for b in 0..nb {
            let wq = &w.qs[(c * nb + b) * 16..][..16];
            let xq = &x.qs[(r * nb + b) * QK..][..QK];
            let mut sum = 0i32;
            for j in 0..16 {
                sum += (wq[j] & 0x0F) as i32 * xq[j] as i32;
                sum += (wq[j] >> 4) as i32 * xq[j + 16] as i32;
            }
            acc += sum as f32 * (w.d[c * nbp + b] * x.d[r * nbp + b]);
            mins += w.m[c * nbp + b] * x.s[r * nbp + b];
        }
        acc + mins
    }

    fn q8_0_dot(w: &Q8_0Ref, c: usize, x: &QuantizedRows, r: usize) -> f32 {
        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let mut acc = 0f32;
        for b in 0..nb {
            let wq = &w.qs[(c * nb + b) * QK..][..QK];
            let xq = &x.qs[(r * nb + b) * QK..][..QK];
            let sum: i32 = wq.iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
            acc += sum as f32 * (w.d[c * nb + b] * x.d[r * nbp + b]);
        }
        acc
    }

    /// # Safety
    /// No other thread writes columns `cols` of `out`, which holds `x.rows × n` floats.
    pub(super) unsafe fn q4_1(
        w: &Q4_1Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe { out.write_each(x.rows, cols, n, |c, r| q4_1_dot(w, c, x, r)) }
    }

    /// # Safety
    /// As for [`q4_1`].
    pub(super) unsafe fn q8_0(
        w: &Q8_0Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe { out.write_each(x.rows, cols, n, |c, r| q8_0_dot(w, c, x, r)) }
    }

    /// # Safety
    /// As for [`q4_1`].
    pub(super) unsafe fn f32(
        w: &[f32],
        k: usize,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            for c in cols.clone() {
                let wr = &w[c * k..(c + 1) * k];
                // Eight partial sums, a fixed order the compiler can vectorize.
                let mut acc = [0f32; 8];
                let mut wc = wr.chunks_exact(8);
                let mut xc = xr.chunks_exact(8);
                for (a, b) in (&mut wc).zip(&mut xc) {
                    for l in 0..8 {
                        acc[l] += a[l] * b[l];
                    }
                }
                let mut sum = acc.iter().sum::<f32>();
                for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
                    sum += a * b;
                }
                unsafe { out.write(r * n + c, sum) }
            }
        }
    }
}

/// AVX2 + FMA helpers and the f32 kernel, and the tiling that the row-major AVX2 kernels
/// ([`q8_halves`], [`q6_k`]) share: tiles of up to 4 rows × 2 columns share the loads of
/// weights and activations; each output keeps its own accumulator, so tiling changes no
/// result. Columns are walked in panels of 64, whose weights stay in L2 while every tile
/// of rows passes over them. (4-bit and Q8_0 weights have their own AVX2 kernels on the
/// 16-column layout, [`grouped_avx2`].)
///
/// The tiles walk raw pointers: `Linear::forward` has checked that every row and column
/// they touch lies inside its buffers.
#[cfg(target_arch = "x86_64")]
// The tiles index several arrays (accumulators, rows, columns) by the same r and c.
#[allow(clippy::needless_range_loop)]
#[macro_use]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    pub(super) const PANEL: usize = 64;

    /// Walks a column range in panels, and each panel in tiles: 4 rows at a time then
    /// the remaining 1–3, 2 columns at a time then a last odd one.
    macro_rules! tiled {
        ($tile:ident, $rows:expr, $cols:expr, |$r:ident, $c:ident| $($args:tt)*) => {{
            let rows = $rows;
            let cols: Range<usize> = $cols;
            let mut panel = cols.start;
            while panel < cols.end {
                let panel_end = cols.end.min(panel + PANEL);
                let mut $r = 0;
                while $r < rows {
                    let left = (rows - $r).min(4);
                    let mut $c = panel;
                    while $c < panel_end {
                        let two = panel_end - $c >= 2;
                        match (left, two) {
                            (4, true) => $tile::<4, 2>($($args)*),
                            (3, true) => $tile::<3, 2>($($args)*),
                            (2, true) => $tile::<2, 2>($($args)*),
                            (1, true) => $tile::<1, 2>($($args)*),
                            (4, false) => $tile::<4, 1>($($args)*),
                            (3, false) => $tile::<3, 1>($($args)*),
                            (2, false) => $tile::<2, 1>($($args)*),
                            _ => $tile::<1, 1>($($args)*),
                        }
                        $c += if two { 2 } else { 1 };
                    }
                    $r += left;
                }
                panel = panel_end;
            }
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Σ a[i]·b[i] over `len` floats (a multiple of 8).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn scale_dot(a: *const f32, b: *const f32, len: usize) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for i in (0..len).step_by(8) {
            // SAFETY: the caller's arrays hold `len` floats.
            let (va, vb) = unsafe { (_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i))) };
            acc = _mm256_fmadd_ps(va, vb, acc);
        }
        hsum(acc)
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn f32_tile<const R: usize, const C: usize>(
        w: &[f32],
        k: usize,
        x: &[f32],
        r0: usize,
        c0: usize,
        n: usize,
        out: OutPtr,
    ) {
        let k8 = k - k % 8;
        // SAFETY (all pointer arithmetic below): rows r0..r0 + R of x and c0..c0 + C of
        // w exist, and j < k.
        let xr: [*const f32; R] = std::array::from_fn(|r| unsafe { x.as_ptr().add((r0 + r) * k) });
        let wr: [*const f32; C] = std::array::from_fn(|c| unsafe { w.as_ptr().add((c0 + c) * k) });
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for j in (0..k8).step_by(8) {
            let mut xv = [_mm256_setzero_ps(); R];
            for r in 0..R {
                xv[r] = unsafe { _mm256_loadu_ps(xr[r].add(j)) };
            }
            for c in 0..C {
                let wv = unsafe { _mm256_loadu_ps(wr[c].add(j)) };
                for r in 0..R {
                    acc[r][c] = _mm256_fmadd_ps(wv, xv[r], acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                let mut sum = hsum(acc[r][c]);
                for j in k8..k {
                    sum += unsafe { *wr[c].add(j) * *xr[r].add(j) };
                }
                // SAFETY: the caller owns columns c0..c0 + C of these rows.
                unsafe { out.write((r0 + r) * n + c0 + c, sum) }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA, and no other thread writes columns `cols` of `out`.
    pub(super) unsafe fn f32(
        w: &[f32],
        k: usize,
        x: &[f32],
        m: usize,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe { tiled!(f32_tile, m, cols, |r, c| w, k, x, r, c, n, out) }
    }
}

/// AVX-512 VNNI kernels. `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and
/// adds each group of four products into one of 16 i32 lanes. With the weights of 16 rows
/// of W interleaved four bytes per lane and four activation bytes broadcast to all lanes,
/// each lane is one output column: a block of 32 takes 8 such steps, then one conversion
/// and one fused multiply-add by the 16 columns' scales times the row's scale. No
/// horizontal sums, and the scales are handled once per 16 outputs.
///
/// Layouts, per group g of 16 rows of W (padded with zero rows) and block b, at g·nb + b:
/// - Q4_1x16: 256 bytes in four 64-byte chunks; byte 4l + t of chunk j holds element
///   4j + t of lane l's block in its low nibble and element 16 + 4j + t in its high one.
///   Then 16 scales d and 16 minimums m.
/// - Q8_0x16: 512 bytes in eight 64-byte units; byte 4l + t of unit i holds element
///   4i + t of lane l's block plus 128 (unsigned for vpdpbusd), then 16 scales. The
///   surplus 128·Σx of each block is subtracted in integers, from the activations' exact
///   block sums, before the conversion.
///
/// Each output's arithmetic is the same for any number of rows, so batch invariance holds.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[macro_use]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Rows per tile: each row's accumulators stay in registers beside the group's 8
    /// vectors of weights.
    pub(super) const ROWS: usize = 8;

    /// Activation pointers of a tile of rows: values (as 4-byte units), scales, scaled
    /// sums and exact sums.
    pub(super) struct RowPtrs<const R: usize> {
        pub qs: [*const i32; R],
        pub d: [*const f32; R],
        pub s: [*const f32; R],
        pub sums: [*const i32; R],
        pub lo_sums: [*const i32; R],
    }

    impl<const R: usize> RowPtrs<R> {
        /// # Safety
        /// Rows r0..r0 + R exist in `x`.
        pub(super) unsafe fn new(x: &QuantizedRows, r0: usize) -> Self {
            let (nb, nbp) = (x.nb, padded_blocks(x.nb));
            // SAFETY: row starts inside the buffers.
            unsafe {
                RowPtrs {
                    qs: std::array::from_fn(|r| {
                        x.qs.as_ptr().add((r0 + r) * nb * QK) as *const i32
                    }),
                    d: std::array::from_fn(|r| x.d.as_ptr().add((r0 + r) * nbp)),
                    s: std::array::from_fn(|r| x.s.as_ptr().add((r0 + r) * nbp)),
                    sums: std::array::from_fn(|r| x.sums.as_ptr().add((r0 + r) * nbp)),
                    lo_sums: std::array::from_fn(|r| x.lo_sums.as_ptr().add((r0 + r) * nbp)),
                }
            }
        }
    }

    /// Σ over 8 units of dpbusd(units[i], four bytes of x), in two chains for
    /// instruction-level parallelism, starting from `init` (exact in integers).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn block_dot(units: &[__m512i; 8], x: *const i32, init: __m512i) -> __m512i {
        // SAFETY: the caller's contract.
        let (a, b) = unsafe { half_dots(units, x, init, _mm512_setzero_si512()) };
        _mm512_add_epi32(a, b)
    }

    /// The two halves of [`block_dot`]: units 0..4 (elements 0..16) from `init_lo`,
    /// units 4..8 (elements 16..32) from `init_hi`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn half_dots(
        units: &[__m512i; 8],
        x: *const i32,
        init_lo: __m512i,
        init_hi: __m512i,
    ) -> (__m512i, __m512i) {
        let (mut a, mut b) = (init_lo, init_hi);
        for i in 0..4 {
            // SAFETY: the block's 32 bytes are eight 4-byte units at `x`.
            let (xa, xb) = unsafe { (x.add(i).read_unaligned(), x.add(i + 4).read_unaligned()) };
            a = _mm512_dpbusd_epi32(a, units[i], _mm512_set1_epi32(xa));
            b = _mm512_dpbusd_epi32(b, units[i + 4], _mm512_set1_epi32(xb));
        }
        (a, b)
    }

    /// Stores a tile row's 16 outputs (fewer in a partial last group).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn store(out: OutPtr, at: usize, lanes: usize, v: __m512) {
        // SAFETY: the caller owns these `lanes` columns of the row.
        unsafe {
            if lanes == LANES {
                _mm512_storeu_ps(out.0.add(at), v)
            } else {
                _mm512_mask_storeu_ps(out.0.add(at), (1u16 << lanes) - 1, v)
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q4_1_tile<const R: usize>(
        qs: &[u8],
        d: &[f32],
        m: &[f32],
        nb: usize,
        x: &QuantizedRows,
        r0: usize,
        g: usize,
        n: usize,
        out: OutPtr,
    ) {
        let low = _mm512_set1_epi8(0x0F);
        // SAFETY (all pointer arithmetic below): group g and rows r0..r0 + R exist;
        // b < nb.
        let rows = unsafe { RowPtrs::<R>::new(x, r0) };
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let gb = g * nb + b;
            let ahead = gb + PREFETCH_GROUPS_AHEAD * nb;
            prefetch(qs, ahead * 256, 256);
            prefetch(d, ahead * LANES, LANES);
            prefetch(m, ahead * LANES, LANES);
            let mut units = [_mm512_setzero_si512(); 8];
            for j in 0..4 {
                let v = unsafe {
                    _mm512_loadu_si512(qs.as_ptr().add(gb * 256 + j * 64) as *const __m512i)
                };
                units[j] = _mm512_and_si512(v, low);
                units[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            let dw = unsafe { _mm512_loadu_ps(d.as_ptr().add(gb * LANES)) };
            let mw = unsafe { _mm512_loadu_ps(m.as_ptr().add(gb * LANES)) };
            for r in 0..R {
                let sum =
                    unsafe { block_dot(&units, rows.qs[r].add(b * 8), _mm512_setzero_si512()) };
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(unsafe { *rows.d[r].add(b) }));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
                acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(unsafe { *rows.s[r].add(b) }), acc[r]);
            }
        }
        let lanes = LANES.min(n - g * LANES);
        for r in 0..R {
            unsafe { store(out, (r0 + r) * n + g * LANES, lanes, acc[r]) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn q8_0_tile<const R: usize>(
        qs: &[u8],
        d: &[f32],
        nb: usize,
        x: &QuantizedRows,
        r0: usize,
        g: usize,
        n: usize,
        out: OutPtr,
    ) {
        // SAFETY (all pointer arithmetic below): group g and rows r0..r0 + R exist;
        // b < nb.
        let rows = unsafe { RowPtrs::<R>::new(x, r0) };
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let gb = g * nb + b;
            let ahead = gb + PREFETCH_GROUPS_AHEAD * nb;
            prefetch(qs, ahead * 512, 512);
            prefetch(d, ahead * LANES, LANES);
            let units: [__m512i; 8] = std::array::from_fn(|i| unsafe {
                _mm512_loadu_si512(qs.as_ptr().add(gb * 512 + i * 64) as *const __m512i)
            });
            let dw = unsafe { _mm512_loadu_ps(d.as_ptr().add(gb * LANES)) };
            for r in 0..R {
                // The weights carry +128: start from −128·Σx.
                let init = _mm512_set1_epi32(-128 * unsafe { *rows.sums[r].add(b) });
                let sum = unsafe { block_dot(&units, rows.qs[r].add(b * 8), init) };
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(unsafe { *rows.d[r].add(b) }));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
            }
        }
        let lanes = LANES.min(n - g * LANES);
        for r in 0..R {
            unsafe { store(out, (r0 + r) * n + g * LANES, lanes, acc[r]) }
        }
    }

    /// How far ahead of the block being multiplied the kernels prefetch weights: the same
    /// block of the group this many groups further on. Without it a tile waits for memory
    /// at every new group: at 16 rows a Q4_1 matrix streamed from memory ran at half the
    /// rate of one already in the caches (`kernel_rates` in tests/cpu_perf.rs), and with
    /// one block's prefetch spread over each block's work it runs at 85% of it.
    pub(super) const PREFETCH_GROUPS_AHEAD: usize = 2;

    /// Asks for elements `at..at + len` of `v` (where in bounds) to be brought into L1.
    #[inline(always)]
    pub(super) fn prefetch<T>(v: &[T], at: usize, len: usize) {
        let Some(span) = v.get(at..at + len) else {
            return;
        };
        let p = span.as_ptr() as *const i8;
        for offset in (0..std::mem::size_of_val(span)).step_by(64) {
            // SAFETY: a prefetch reads nothing and faults on no address; SSE is in the
            // x86-64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(offset)) };
        }
    }

    /// Runs `tile::<R>(r0, g)` over every group of `cols` and every tile of rows: groups
    /// outside, so a group's weights stay in L1 while all rows pass over them.
    macro_rules! groups_and_rows {
        ($tile:ident, $rows:expr, $cols:expr, |$r:ident, $g:ident| $($args:tt)*) => {{
            let rows = $rows;
            let cols: Range<usize> = $cols;
            for $g in cols.start / LANES..cols.end.div_ceil(LANES) {
                let mut $r = 0;
                while $r < rows {
                    let left = (rows - $r).min(ROWS);
                    match left {
                        8 => $tile::<8>($($args)*),
                        7 => $tile::<7>($($args)*),
                        6 => $tile::<6>($($args)*),
                        5 => $tile::<5>($($args)*),
                        4 => $tile::<4>($($args)*),
                        3 => $tile::<3>($($args)*),
                        2 => $tile::<2>($($args)*),
                        _ => $tile::<1>($($args)*),
                    }
                    $r += left;
                }
            }
        }};
    }

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and VNNI; the buffers hold the Q4_1x16 layout of an
    /// n × nb·32 matrix; `cols` starts on a group; no other thread writes those columns.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn q4_1(
        qs: &[u8],
        d: &[f32],
        m: &[f32],
        nb: usize,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe {
            groups_and_rows!(
                q4_1_tile,
                x.rows,
                cols,
                |r, g| qs,
                d,
                m,
                nb,
                x,
                r,
                g,
                n,
                out
            )
        }
    }

    /// # Safety
    /// As for [`q4_1`], with the Q8_0x16 layout.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn q8_0(
        qs: &[u8],
        d: &[f32],
        nb: usize,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe { groups_and_rows!(q8_0_tile, x.rows, cols, |r, g| qs, d, nb, x, r, g, n, out) }
    }
}

#[cfg(target_arch = "x86_64")]
mod grouped_avx2;
mod q4_k;
mod q6_k;
mod q8_halves;

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [-1, 1).
    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn qtensor(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> QTensor {
        let w = noise(n * k, seed);
        let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype).unwrap()
    }

    fn dequantized(lin: &Linear) -> Vec<f32> {
        match lin.dequantized().storage {
            Storage::F32(data) => data,
            _ => unreachable!("dequantized matrices are f32"),
        }
    }

    fn run(lin: &Linear, x: &[f32], rows: usize) -> Vec<f32> {
        let mut q = QuantizedRows::default();
        q.quantize(x, rows);
        let mut out = vec![0f32; rows * lin.out_features()];
        let input = Input {
            x,
            rows,
            q: Some(&q),
        };
        lin.forward(&input, &mut out);
        out
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
    const DTYPES: [GgmlDType; 9] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q4K,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::Q8_0,
        GgmlDType::F32,
    ];

    /// `k` rounded up to whole blocks of `dtype` (the K-quants' super-blocks hold 256).
    fn fit(dtype: GgmlDType, k: usize) -> usize {
        k.next_multiple_of(dtype.block_size())
    }

    #[test]
    fn native_types_load_without_dequantizing() {
        for dtype in DTYPES {
            let t = qtensor(dtype, 20, 256, 1);
            let lin = Linear::from_qtensor("w", &t).unwrap();
            assert_eq!(
                lin.wants_quantized_input(),
                dtype != GgmlDType::F32,
                "{dtype:?}"
            );
            // The repacked weights are ggml's, value for value.
            let ggml: Vec<f32> = t
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
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
        for dtype in DTYPES {
            let (n, k, rows) = (37, 256, 6);
            let lin = Linear::from_qtensor("w", &qtensor(dtype, n, k, 1)).unwrap();
            let x = noise(rows * k, 2);
            let got = run(&lin, &x, rows);
            let want = reference(&dequantized(&lin), &x, rows, n, k);
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
        for dtype in DTYPES {
            let (n, k, rows) = (37, 256, 3);
            let lin = Linear::from_qtensor("w", &qtensor(dtype, n, k, 5)).unwrap();
            let exact = lin.dequantized();
            assert!(!exact.wants_quantized_input());
            let x = noise(rows * k, 6);
            let mut got = vec![0f32; rows * n];
            let input = Input {
                x: &x,
                rows,
                q: None,
            };
            exact.forward(&input, &mut got);
            let want = reference(&dequantized(&lin), &x, rows, n, k);
            for (g, w) in got.iter().zip(&want) {
                // f32 sums of 256 products of size ~1: rounding alone, ~1e-6.
                assert!((g - w).abs() < 1e-4, "{dtype:?}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn every_row_is_independent_of_the_others() {
        for dtype in DTYPES {
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
        let (k, rows) = (192, 7);
        let x = noise(rows * k, 8);
        let mut q = QuantizedRows::default();
        q.quantize(&x, rows);
        let input = Input {
            x: &x,
            rows,
            q: Some(&q),
        };
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
        let mut families = vec![Family::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if best_family() != Family::Portable {
                families.push(Family::Avx2);
            }
            if best_family() == Family::Vnni {
                families.push(Family::Vnni);
            }
        }
        // Odd shapes: a partial last group of 16 columns, an odd number of blocks.
        for (n, k, rows) in [(34, 192, 5), (67, 160, 9)] {
            for dtype in DTYPES {
                // K-quants: 3 super-blocks, 24 blocks.
                let k = if dtype.block_size() > QK { 768 } else { k };
                let t = qtensor(dtype, n, k, 5);
                let x = noise(rows * k, 6);
                let mut q = QuantizedRows::default();
                q.quantize(&x, rows);
                let input = Input {
                    x: &x,
                    rows,
                    q: Some(&q),
                };
                let portable = Linear::from_qtensor_for("w", &t, Family::Portable).unwrap();
                let mut want = vec![0f32; rows * n];
                forward_all_with(Family::Portable, &mut [(&portable, &mut want)], &input);
                for &f in &families {
                    let lin = Linear::from_qtensor_for("w", &t, f).unwrap();
                    assert_eq!(dequantized(&lin), dequantized(&portable), "{f:?} {dtype:?}");
                    let mut got = vec![0f32; rows * n];
                    forward_all_with(f, &mut [(&lin, &mut got)], &input);
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

    #[test]
    fn rounding_matches_round_ties_even() {
        for i in -2540..=2540 {
            let v = i as f32 / 20.0;
            assert_eq!(round_ties_even(v), v.round_ties_even(), "{v}");
        }
        assert_eq!(round_ties_even(2.5), 2.0);
        assert_eq!(round_ties_even(-3.5), -4.0);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_quantization_equals_the_portable_one() {
        if family() == Family::Portable {
            return;
        }
        let mut x = noise(32 * 50, 9);
        x[40] = 0.0;
        x[64..96].fill(0.0);
        x[100] = 3.0 * 0.5 / 127.0; // a tie once scaled
        for (src, i) in x.chunks_exact(32).zip(0..) {
            let (mut a, mut b) = ([0i8; 32], [0i8; 32]);
            let want = quantize_block(src, &mut a);
            // SAFETY: AVX2 and F16C were detected.
            let got = unsafe { quantize_block_avx2(src, &mut b) };
            assert_eq!((got, b), (want, a), "block {i}");
        }
    }

    #[test]
    fn activation_quantization_follows_ggml() {
        let mut x = vec![0f32; 64];
        x[0] = 1.27;
        x[1] = -0.64;
        x[2] = 0.005;
        let mut q = QuantizedRows::default();
        q.quantize(&x, 1);
        assert_eq!(&q.qs[..3], &[127, -64, 0]);
        assert_eq!(q.sums[0], 63);
        assert!((q.d[0] - f16::from_f32(0.01).to_f32()).abs() < 1e-7);
        // An all-zero block gets scale 0 and zero values, not NaN.
        assert_eq!(q.d[1], 0.0);
        assert!(q.qs[32..].iter().all(|&v| v == 0));
    }
}
