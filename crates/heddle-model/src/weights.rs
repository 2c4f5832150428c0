//! Weight matrices and their matmul kernels.
//!
//! candle's CPU kernels for Q4_1 and Q8_0 are its generic scalar code on x86 (4.6 ms for one
//! 1536×576 Q4_1 matrix-vector product here, two orders of magnitude off), so heddle keeps
//! the GGUF blocks and multiplies them itself, the way llama.cpp does: each activation row is
//! quantized to ggml's Q8_0/Q8_1 form (32 values, one scale) and dotted in integers against
//! the weight blocks.
//!
//! Batch invariance is built in: every output element is computed by the same sequence of
//! operations on its own activation row and weight row, whatever the number of rows, the
//! tile it falls in or the thread that runs it. Nothing reduces across rows, so a sequence's
//! logits do not depend on what else is in the batch. The kernel family (AVX2 or portable)
//! is chosen once per process.

use std::ops::Range;
use std::sync::OnceLock;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// Elements per quantization block (ggml's QK4_1 = QK8_0 = QK8_1 = 32).
pub const QK: usize = 32;

/// Block-scale arrays are padded with zeros to a multiple of this, so the term that sums
/// per-block scales can run in whole vectors.
const SCALE_PAD: usize = 16;

/// Below this many multiply-adds a matmul runs on the calling thread: handing work to the
/// pool costs a few microseconds, as much as the product itself.
const PAR_MIN_MACS: usize = 1 << 17;

fn padded_blocks(nb: usize) -> usize {
    nb.div_ceil(SCALE_PAD) * SCALE_PAD
}

/// How a weight matrix of `n` rows (outputs) by `k` columns (inputs) is stored.
#[derive(Debug)]
enum Storage {
    /// ggml Q4_1: per block of 32, a scale `d`, a minimum `m` and 4-bit values;
    /// w = d·q + m. `qs` holds 16 bytes per block, element j in the low nibble of byte j
    /// and element j + 16 in the high one (ggml's layout).
    Q4_1 {
        qs: Vec<u8>,
        d: Vec<f32>,
        m: Vec<f32>,
    },
    /// ggml Q8_0: per block of 32, a scale `d` and 8-bit values; w = d·q. `corr` holds
    /// 128·d·Σq per block (rows padded like Q4_1's scales) when the kernel wants it.
    Q8_0 {
        qs: Vec<i8>,
        d: Vec<f32>,
        corr: Vec<f32>,
    },
    /// Plain f32, row-major.
    F32(Vec<f32>),
}

/// A weight matrix used as `y = x · Wᵀ` (one output per row of W).
#[derive(Debug)]
pub struct Linear {
    n: usize,
    k: usize,
    storage: Storage,
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

    /// Takes a GGUF tensor of shape [n, k]. Q4_1 and Q8_0 stay quantized; other types are
    /// dequantized to f32 (F32/F16/BF16 losslessly; other quantizations cost 4× memory and
    /// their own rounding, which we accept over refusing the file).
    pub fn from_qtensor(name: &str, t: &QTensor) -> Result<Self> {
        let dims = t.shape().dims();
        let &[n, k] = dims else {
            return Err(ModelError::BadShape {
                name: name.to_string(),
                expected: vec![0, 0],
                actual: dims.to_vec(),
            });
        };
        match t.dtype() {
            GgmlDType::Q4_1 if k % QK == 0 => Ok(Self::q4_1_from_bytes(n, k, &t.data()?)),
            GgmlDType::Q8_0 if k % QK == 0 => Ok(Self::q8_0_from_bytes(n, k, &t.data()?)),
            dtype => {
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
                Self::from_f32(name, n, k, data)
            }
        }
    }

    fn q4_1_from_bytes(n: usize, k: usize, bytes: &[u8]) -> Self {
        const BLOCK_BYTES: usize = 20;
        let nb = k / QK;
        let nbp = padded_blocks(nb);
        let mut qs = Vec::with_capacity(n * nb * 16);
        let mut d = vec![0f32; n * nbp];
        let mut m = vec![0f32; n * nbp];
        for (i, block) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let (row, b) = (i / nb, i % nb);
            d[row * nbp + b] = f16::from_le_bytes([block[0], block[1]]).to_f32();
            m[row * nbp + b] = f16::from_le_bytes([block[2], block[3]]).to_f32();
            qs.extend_from_slice(&block[4..]);
        }
        Linear {
            n,
            k,
            storage: Storage::Q4_1 { qs, d, m },
        }
    }

    fn q8_0_from_bytes(n: usize, k: usize, bytes: &[u8]) -> Self {
        const BLOCK_BYTES: usize = 34;
        let nb = k / QK;
        let nbp = padded_blocks(nb);
        let with_corr = kernels().q8_0_corrections;
        let mut qs = Vec::with_capacity(n * k);
        let mut d = Vec::with_capacity(n * nb);
        let mut corr = if with_corr {
            vec![0f32; n * nbp]
        } else {
            Vec::new()
        };
        for (i, block) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let scale = f16::from_le_bytes([block[0], block[1]]).to_f32();
            d.push(scale);
            qs.extend(block[2..].iter().map(|&b| b as i8));
            if with_corr {
                let sum: i32 = block[2..].iter().map(|&b| b as i8 as i32).sum();
                corr[(i / nb) * nbp + i % nb] = 128.0 * scale * sum as f32;
            }
        }
        Linear {
            n,
            k,
            storage: Storage::Q8_0 { qs, d, corr },
        }
    }

    /// Outputs (rows of W).
    pub fn out_features(&self) -> usize {
        self.n
    }

    /// Inputs (columns of W).
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Whether this matrix multiplies quantized activations.
    pub fn wants_quantized_input(&self) -> bool {
        !matches!(self.storage, Storage::F32(_))
    }

    /// Row `r` of W in f32: the embedding lookup. Dequantizing one row at a time spares
    /// a 113 MB f32 copy of the embedding table and gives the same values.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let k = self.k;
        match &self.storage {
            Storage::F32(w) => out.copy_from_slice(&w[r * k..(r + 1) * k]),
            Storage::Q8_0 { qs, d, .. } => {
                let nb = k / QK;
                for b in 0..nb {
                    let scale = d[r * nb + b];
                    let q = &qs[(r * nb + b) * QK..][..QK];
                    for (o, &v) in out[b * QK..(b + 1) * QK].iter_mut().zip(q) {
                        *o = scale * v as f32;
                    }
                }
            }
            Storage::Q4_1 { qs, d, m } => {
                let nb = k / QK;
                let nbp = padded_blocks(nb);
                for b in 0..nb {
                    let (scale, min) = (d[r * nbp + b], m[r * nbp + b]);
                    let q = &qs[(r * nb + b) * 16..][..16];
                    let o = &mut out[b * QK..(b + 1) * QK];
                    for (j, &byte) in q.iter().enumerate() {
                        o[j] = scale * (byte & 0x0F) as f32 + min;
                        o[j + 16] = scale * (byte >> 4) as f32 + min;
                    }
                }
            }
        }
    }

    /// `out[r][c] = Σ_j x[r][j] · W[c][j]` for the `x.rows` rows of `x`.
    pub fn forward(&self, x: &Input, out: &mut [f32]) {
        let (m, n, k) = (x.rows, self.n, self.k);
        assert_eq!(
            x.x.len(),
            m * k,
            "activation shape does not match W's {k} inputs"
        );
        assert_eq!(out.len(), m * n, "output shape does not match {m}×{n}");
        // The kernels walk raw pointers: check once that every buffer has the size the
        // shapes promise.
        let q = if self.wants_quantized_input() {
            let q = x.q.expect("quantized weights need quantized activations");
            let nbp = padded_blocks(k / QK);
            assert!(q.rows == m && q.nb * QK == k);
            assert!(q.qs.len() >= m * k && q.d.len() >= m * nbp && q.s.len() >= m * nbp);
            Some(q)
        } else {
            None
        };
        let nb = k / QK;
        let nbp = padded_blocks(nb);
        match &self.storage {
            Storage::Q4_1 { qs, d, m } => {
                assert!(qs.len() == n * nb * 16 && d.len() == n * nbp && m.len() == n * nbp)
            }
            Storage::Q8_0 { qs, d, corr } => assert!(
                qs.len() == n * k
                    && d.len() == n * nb
                    && (corr.len() == n * nbp || !kernels().q8_0_corrections)
            ),
            Storage::F32(w) => assert_eq!(w.len(), n * k),
        }
        let out = OutPtr(out.as_mut_ptr());
        let kernels = kernels();
        let work = |cols: Range<usize>| {
            // SAFETY: `cols` ranges of different calls are disjoint and each call writes
            // only out[r][c] for c in `cols`, so no element is written twice or raced.
            unsafe {
                match &self.storage {
                    Storage::Q4_1 { qs, d, m: mins } => {
                        let w = Q4_1Ref {
                            nb: k / QK,
                            qs,
                            d,
                            m: mins,
                        };
                        (kernels.q4_1)(&w, q.unwrap(), cols, n, out)
                    }
                    Storage::Q8_0 { qs, d, corr } => {
                        let w = Q8_0Ref {
                            nb: k / QK,
                            qs,
                            d,
                            corr,
                        };
                        (kernels.q8_0)(&w, q.unwrap(), cols, n, out)
                    }
                    Storage::F32(w) => (kernels.f32)(w, k, x.x, m, cols, n, out),
                }
            }
        };
        if m * n * k < PAR_MIN_MACS || rayon::current_num_threads() == 1 {
            work(0..n);
            return;
        }
        // Several chunks per thread balance the load when a thread is slowed by others;
        // chunk edges fall on even columns so the two-column tiles are never split.
        let chunks = rayon::current_num_threads() * 4;
        let chunk = n.div_ceil(chunks).next_multiple_of(2).max(16);
        (0..n.div_ceil(chunk))
            .into_par_iter()
            .for_each(|i| work(i * chunk..n.min((i + 1) * chunk)));
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
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
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
        self.d.clear();
        self.d.resize(rows * nbp, 0.0);
        self.s.clear();
        self.s.resize(rows * nbp, 0.0);
        for r in 0..rows {
            for b in 0..nb {
                let src = &x[r * k + b * QK..][..QK];
                let dst = &mut self.qs[r * k + b * QK..][..QK];
                let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let mut sum = 0i32;
                for (q, &v) in dst.iter_mut().zip(src) {
                    *q = round_ties_even(v * id) as i8;
                    sum += *q as i32;
                }
                self.d[r * nbp + b] = f16::from_f32(d).to_f32();
                self.s[r * nbp + b] = f16::from_f32(d * sum as f32).to_f32();
            }
        }
    }
}

/// Rounds to the nearest integer, ties to even, for |v| < 2^22: adding 1.5·2^23 leaves no
/// fraction bits, so the FPU's default rounding does the work. `f32::round_ties_even`
/// compiles to a libm call on baseline x86-64, which cost 11% of a decode step.
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
}

struct Q4_1Ref<'a> {
    nb: usize,
    qs: &'a [u8],
    d: &'a [f32],
    m: &'a [f32],
}

struct Q8_0Ref<'a> {
    nb: usize,
    qs: &'a [i8],
    d: &'a [f32],
    corr: &'a [f32],
}

/// A kernel computes the columns `cols` of every row; `n` is the output row stride.
type Q4_1Kernel = unsafe fn(&Q4_1Ref<'_>, &QuantizedRows, Range<usize>, usize, OutPtr);
type Q8_0Kernel = unsafe fn(&Q8_0Ref<'_>, &QuantizedRows, Range<usize>, usize, OutPtr);
/// Arguments: weights, k, activations, rows, columns, n, output.
type F32Kernel = unsafe fn(&[f32], usize, &[f32], usize, Range<usize>, usize, OutPtr);

struct Kernels {
    q4_1: Q4_1Kernel,
    q8_0: Q8_0Kernel,
    f32: F32Kernel,
    /// The Q8_0 kernel wants each weight block's correction term (see `avx512`).
    q8_0_corrections: bool,
}

/// The kernel family for this CPU, chosen once so every step uses the same arithmetic.
fn kernels() -> &'static Kernels {
    static KERNELS: OnceLock<Kernels> = OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma");
            if avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
            {
                return Kernels {
                    q4_1: avx512::q4_1,
                    q8_0: avx512::q8_0,
                    f32: avx2::f32,
                    q8_0_corrections: true,
                };
            }
            if avx2 {
                return Kernels {
                    q4_1: avx2::q4_1,
                    q8_0: avx2::q8_0,
                    f32: avx2::f32,
                    q8_0_corrections: false,
                };
            }
        }
        Kernels {
            q4_1: portable::q4_1,
            q8_0: portable::q8_0,
            f32: portable::f32,
            q8_0_corrections: false,
        }
    })
}

/// Columns per panel: a panel of weights (64 rows of W, at most a few hundred KB) stays
/// in L2 while every tile of activation rows passes over it, instead of the whole column
/// range streaming from memory once per row tile.
#[cfg(target_arch = "x86_64")]
const PANEL: usize = 64;

/// Walks a column range in panels, and each panel in tiles: 4 rows at a time then the
/// remaining 1–3, 2 columns at a time then a last odd one.
#[cfg(target_arch = "x86_64")]
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

    pub(super) unsafe fn q4_1(
        w: &Q4_1Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        for r in 0..x.rows {
            for c in cols.clone() {
                unsafe { out.write(r * n + c, q4_1_dot(w, c, x, r)) }
            }
        }
    }

    pub(super) unsafe fn q8_0(
        w: &Q8_0Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        for r in 0..x.rows {
            for c in cols.clone() {
                unsafe { out.write(r * n + c, q8_0_dot(w, c, x, r)) }
            }
        }
    }

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

/// AVX2 + FMA kernels after ggml's: 4-bit or 8-bit weights against 8-bit activations with
/// `maddubs`, a block's integer sum scaled into an 8-lane f32 accumulator per output.
/// Tiles of up to 4 rows × 2 columns share the loads of weights and activations; each
/// output keeps its own accumulator, so tiling changes no result.
///
/// The tiles walk raw pointers: `Linear::forward` has checked that every row and column
/// they touch lies inside its buffers.
#[cfg(target_arch = "x86_64")]
// The tiles index several arrays (accumulators, rows, columns) by the same r and c.
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
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
    unsafe fn q4_1_tile<const R: usize, const C: usize>(
        w: &Q4_1Ref,
        x: &QuantizedRows,
        r0: usize,
        c0: usize,
        n: usize,
        out: OutPtr,
    ) {
        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(0x0F);
        // SAFETY (all pointer arithmetic below): rows r0..r0 + R and columns c0..c0 + C
        // exist, and b < nb stays inside each row's blocks.
        let xq: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((r0 + r) * nb * QK) });
        let xd: [*const f32; R] =
            std::array::from_fn(|r| unsafe { x.d.as_ptr().add((r0 + r) * nbp) });
        let wq: [*const u8; C] =
            std::array::from_fn(|c| unsafe { w.qs.as_ptr().add((c0 + c) * nb * 16) });
        let wd: [*const f32; C] =
            std::array::from_fn(|c| unsafe { w.d.as_ptr().add((c0 + c) * nbp) });
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let mut xv = [_mm256_setzero_si256(); R];
            for r in 0..R {
                xv[r] = unsafe { _mm256_loadu_si256(xq[r].add(b * QK) as *const __m256i) };
            }
            for c in 0..C {
                let raw = unsafe { _mm_loadu_si128(wq[c].add(b * 16) as *const __m128i) };
                // Low nibbles are elements 0..16, high nibbles 16..32.
                let wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
                let dw = unsafe { *wd[c].add(b) };
                for r in 0..R {
                    let sum = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv[r]), ones);
                    let scale = _mm256_set1_ps(dw * unsafe { *xd[r].add(b) });
                    acc[r][c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc[r][c]);
                }
            }
        }
        for r in 0..R {
            let row = r0 + r;
            for c in 0..C {
                let col = c0 + c;
                let mins = unsafe {
                    scale_dot(
                        w.m.as_ptr().add(col * nbp),
                        x.s.as_ptr().add(row * nbp),
                        nbp,
                    )
                };
                // SAFETY: the caller owns columns c0..c0 + C of these rows.
                unsafe { out.write(row * n + col, hsum(acc[r][c]) + mins) }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn q8_0_tile<const R: usize, const C: usize>(
        w: &Q8_0Ref,
        x: &QuantizedRows,
        r0: usize,
        c0: usize,
        n: usize,
        out: OutPtr,
    ) {
        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let ones = _mm256_set1_epi16(1);
        // SAFETY (all pointer arithmetic below): as in `q4_1_tile`.
        let xq: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((r0 + r) * nb * QK) });
        let xd: [*const f32; R] =
            std::array::from_fn(|r| unsafe { x.d.as_ptr().add((r0 + r) * nbp) });
        let wq: [*const i8; C] =
            std::array::from_fn(|c| unsafe { w.qs.as_ptr().add((c0 + c) * nb * QK) });
        let wd: [*const f32; C] =
            std::array::from_fn(|c| unsafe { w.d.as_ptr().add((c0 + c) * nb) });
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        for b in 0..nb {
            let mut xv = [_mm256_setzero_si256(); R];
            for r in 0..R {
                xv[r] = unsafe { _mm256_loadu_si256(xq[r].add(b * QK) as *const __m256i) };
            }
            for c in 0..C {
                let wv = unsafe { _mm256_loadu_si256(wq[c].add(b * QK) as *const __m256i) };
                // maddubs multiplies unsigned by signed: move w's sign onto x.
                let wabs = _mm256_sign_epi8(wv, wv);
                let dw = unsafe { *wd[c].add(b) };
                for r in 0..R {
                    let xs = _mm256_sign_epi8(xv[r], wv);
                    let sum = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones);
                    let scale = _mm256_set1_ps(dw * unsafe { *xd[r].add(b) });
                    acc[r][c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc[r][c]);
                }
            }
        }
        for r in 0..R {
            for c in 0..C {
                // SAFETY: the caller owns columns c0..c0 + C of these rows.
                unsafe { out.write((r0 + r) * n + c0 + c, hsum(acc[r][c])) }
            }
        }
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
    pub(super) unsafe fn q4_1(
        w: &Q4_1Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe { tiled!(q4_1_tile, x.rows, cols, |r, c| w, x, r, c, n, out) }
    }

    /// # Safety
    /// The CPU has AVX2 and FMA, and no other thread writes columns `cols` of `out`.
    pub(super) unsafe fn q8_0(
        w: &Q8_0Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe { tiled!(q8_0_tile, x.rows, cols, |r, c| w, x, r, c, n, out) }
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

/// AVX-512 VNNI kernels: `vpdpbusd` multiplies 64 unsigned by signed bytes and adds them
/// in groups of four into 16 i32 lanes in one instruction, so one step covers a pair of
/// blocks (lanes 0–7 the first, 8–15 the second), scaled by [d₀ × 8, d₁ × 8].
///
/// Q4_1's 4-bit values are already unsigned. Q8_0 has signed weights and activations, so
/// the activations are offset by 128 (x ^ 0x80) into unsigned bytes and the surplus
/// 128·Σw, kept per weight block as `corr` = 128·d·Σq, is subtracted at the end, like
/// Q4_1's minimum term. Both paths are exact in integers, as ggml's are.
///
/// Matrices with an odd number of blocks per row use the AVX2 kernels (whole pairs only).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// [p[0] × 8, p[1] × 8]: the scales of a block pair.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pair_scales(p: *const f32) -> __m512 {
        // SAFETY: the caller's block pair has two scales at `p`.
        let two = unsafe { _mm_castsi128_ps(_mm_loadl_epi64(p as *const __m128i)) };
        let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(two))
    }

    /// Σ a[i]·b[i] over `len` floats (a multiple of 16).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn scale_dot(a: *const f32, b: *const f32, len: usize) -> f32 {
        let mut acc = _mm512_setzero_ps();
        for i in (0..len).step_by(16) {
            // SAFETY: the caller's arrays hold `len` floats.
            let (va, vb) = unsafe { (_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i))) };
            acc = _mm512_fmadd_ps(va, vb, acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4_1_tile<const R: usize, const C: usize>(
        w: &Q4_1Ref,
        x: &QuantizedRows,
        r0: usize,
        c0: usize,
        n: usize,
        out: OutPtr,
    ) {
        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let low = _mm256_set1_epi8(0x0F);
        // SAFETY (all pointer arithmetic below): rows r0..r0 + R and columns c0..c0 + C
        // exist, and b + 1 < nb stays inside each row's blocks.
        let xq: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((r0 + r) * nb * QK) });
        let xd: [*const f32; R] =
            std::array::from_fn(|r| unsafe { x.d.as_ptr().add((r0 + r) * nbp) });
        let wq: [*const u8; C] =
            std::array::from_fn(|c| unsafe { w.qs.as_ptr().add((c0 + c) * nb * 16) });
        let wd: [*const f32; C] =
            std::array::from_fn(|c| unsafe { w.d.as_ptr().add((c0 + c) * nbp) });
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for b in (0..nb).step_by(2) {
            let mut xv = [_mm512_setzero_si512(); R];
            let mut xs = [_mm512_setzero_ps(); R];
            for r in 0..R {
                xv[r] = unsafe { _mm512_loadu_si512(xq[r].add(b * QK) as *const __m512i) };
                xs[r] = unsafe { pair_scales(xd[r].add(b)) };
            }
            for c in 0..C {
                let raw = unsafe { _mm256_loadu_si256(wq[c].add(b * 16) as *const __m256i) };
                let lo = _mm256_and_si256(raw, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
                // 128-bit lanes [b0 low, b1 low, b0 high, b1 high] reordered to the
                // activations' [b0 0..16, b0 16..32, b1 0..16, b1 16..32].
                let wv = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                let wv = _mm512_shuffle_i64x2::<0b11_01_10_00>(wv, wv);
                let ws = unsafe { pair_scales(wd[c].add(b)) };
                for r in 0..R {
                    let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[r]);
                    let scale = _mm512_mul_ps(ws, xs[r]);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            let row = r0 + r;
            for c in 0..C {
                let col = c0 + c;
                let mins = unsafe {
                    scale_dot(
                        w.m.as_ptr().add(col * nbp),
                        x.s.as_ptr().add(row * nbp),
                        nbp,
                    )
                };
                // SAFETY: the caller owns columns c0..c0 + C of these rows.
                unsafe { out.write(row * n + col, _mm512_reduce_add_ps(acc[r][c]) + mins) }
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q8_0_tile<const R: usize, const C: usize>(
        w: &Q8_0Ref,
        x: &QuantizedRows,
        r0: usize,
        c0: usize,
        n: usize,
        out: OutPtr,
    ) {
        let nb = w.nb;
        let nbp = padded_blocks(nb);
        let offset = _mm512_set1_epi8(0x80u8 as i8);
        // SAFETY (all pointer arithmetic below): as in `q4_1_tile`.
        let xq: [*const i8; R] =
            std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((r0 + r) * nb * QK) });
        let xd: [*const f32; R] =
            std::array::from_fn(|r| unsafe { x.d.as_ptr().add((r0 + r) * nbp) });
        let wq: [*const i8; C] =
            std::array::from_fn(|c| unsafe { w.qs.as_ptr().add((c0 + c) * nb * QK) });
        let wd: [*const f32; C] =
            std::array::from_fn(|c| unsafe { w.d.as_ptr().add((c0 + c) * nb) });
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for b in (0..nb).step_by(2) {
            let mut xv = [_mm512_setzero_si512(); R];
            let mut xs = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let v = unsafe { _mm512_loadu_si512(xq[r].add(b * QK) as *const __m512i) };
                xv[r] = _mm512_xor_si512(v, offset);
                xs[r] = unsafe { pair_scales(xd[r].add(b)) };
            }
            for c in 0..C {
                let wv = unsafe { _mm512_loadu_si512(wq[c].add(b * QK) as *const __m512i) };
                let ws = unsafe { pair_scales(wd[c].add(b)) };
                for r in 0..R {
                    let sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xv[r], wv);
                    let scale = _mm512_mul_ps(ws, xs[r]);
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r][c]);
                }
            }
        }
        for r in 0..R {
            let row = r0 + r;
            for c in 0..C {
                let col = c0 + c;
                let corr = unsafe {
                    scale_dot(
                        w.corr.as_ptr().add(col * nbp),
                        x.d.as_ptr().add(row * nbp),
                        nbp,
                    )
                };
                // SAFETY: the caller owns columns c0..c0 + C of these rows.
                unsafe { out.write(row * n + col, _mm512_reduce_add_ps(acc[r][c]) - corr) }
            }
        }
    }

    /// # Safety
    /// The CPU has AVX-512 (F, BW, VL, VNNI), AVX2 and FMA, and no other thread writes
    /// columns `cols` of `out`.
    pub(super) unsafe fn q4_1(
        w: &Q4_1Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe {
            if w.nb % 2 == 1 {
                avx2::q4_1(w, x, cols, n, out)
            } else {
                tiled!(q4_1_tile, x.rows, cols, |r, c| w, x, r, c, n, out)
            }
        }
    }

    /// # Safety
    /// As for [`q4_1`]; and `w.corr` holds the correction terms.
    pub(super) unsafe fn q8_0(
        w: &Q8_0Ref,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe {
            if w.nb % 2 == 1 {
                avx2::q8_0(w, x, cols, n, out)
            } else {
                tiled!(q8_0_tile, x.rows, cols, |r, c| w, x, r, c, n, out)
            }
        }
    }
}

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

    fn quantize_weights(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Linear, Vec<f32>) {
        let w = noise(n * k, seed);
        let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let lin = Linear::from_qtensor("w", &q).unwrap();
        let mut deq = vec![0f32; n * k];
        for r in 0..n {
            lin.row(r, &mut deq[r * k..(r + 1) * k]);
        }
        (lin, deq)
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

    #[test]
    fn quantized_matmuls_match_the_dequantized_product() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
            let (n, k, rows) = (37, 256, 6);
            let (lin, deq) = quantize_weights(dtype, n, k, 1);
            let x = noise(rows * k, 2);
            let got = run(&lin, &x, rows);
            let want = reference(&deq, &x, rows, n, k);
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
    fn every_row_is_independent_of_the_others() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
            let (n, k) = (1000, 576);
            let (lin, _) = quantize_weights(dtype, n, k, 3);
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

    /// Runs one kernel family over all columns.
    fn run_family(
        family: (Q4_1Kernel, Q8_0Kernel, F32Kernel),
        lin: &Linear,
        x: &[f32],
        rows: usize,
    ) -> Vec<f32> {
        let (n, k) = (lin.n, lin.k);
        let mut q = QuantizedRows::default();
        q.quantize(x, rows);
        let mut out = vec![0f32; rows * n];
        let ptr = OutPtr(out.as_mut_ptr());
        // SAFETY: the callers check the CPU features; one thread writes all columns.
        unsafe {
            match &lin.storage {
                Storage::Q4_1 { qs, d, m } => {
                    let w = Q4_1Ref {
                        nb: k / QK,
                        qs,
                        d,
                        m,
                    };
                    (family.0)(&w, &q, 0..n, n, ptr)
                }
                Storage::Q8_0 { qs, d, corr } => {
                    let w = Q8_0Ref {
                        nb: k / QK,
                        qs,
                        d,
                        corr,
                    };
                    (family.1)(&w, &q, 0..n, n, ptr)
                }
                Storage::F32(w) => (family.2)(w, k, x, rows, 0..n, n, ptr),
            }
        }
        out
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_kernels_agree_with_the_portable_ones() {
        use std::arch::is_x86_feature_detected as has;
        let portable: (Q4_1Kernel, Q8_0Kernel, F32Kernel) =
            (portable::q4_1, portable::q8_0, portable::f32);
        let mut families = vec![];
        if has!("avx2") && has!("fma") {
            families.push((
                "avx2",
                (
                    avx2::q4_1 as Q4_1Kernel,
                    avx2::q8_0 as Q8_0Kernel,
                    avx2::f32 as F32Kernel,
                ),
            ));
            if kernels().q8_0_corrections {
                families.push(("avx512", (avx512::q4_1, avx512::q8_0, avx2::f32)));
            }
        }
        // Even (6) and odd (5) numbers of blocks per row: the AVX-512 kernels take
        // blocks in pairs and hand odd rows to AVX2.
        for (n, k, rows) in [(34, 192, 5), (67, 160, 9)] {
            for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
                let (lin, _) = quantize_weights(dtype, n, k, 5);
                let x = noise(rows * k, 6);
                let plain = run_family(portable, &lin, &x, rows);
                for (name, family) in &families {
                    let simd = run_family(*family, &lin, &x, rows);
                    for (a, b) in simd.iter().zip(&plain) {
                        assert!(
                            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
                            "{name} {dtype:?} k={k}: {a} vs {b}"
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

    #[test]
    fn activation_quantization_follows_ggml() {
        let mut x = vec![0f32; 64];
        x[0] = 1.27;
        x[1] = -0.64;
        x[2] = 0.005;
        let mut q = QuantizedRows::default();
        q.quantize(&x, 1);
        assert_eq!(&q.qs[..3], &[127, -64, 0]);
        assert!((q.d[0] - f16::from_f32(0.01).to_f32()).abs() < 1e-7);
        // An all-zero block gets scale 0 and zero values, not NaN.
        assert_eq!(q.d[1], 0.0);
        assert!(q.qs[32..].iter().all(|&v| v == 0));
    }
}
