//! Activations entering a quantized matmul: each row quantized to ggml's Q8_0/Q8_1 form
//! (32 values, one scale), once per input and shared by every matrix that reads it.

use half::f16;
use rayon::prelude::*;

use super::{family, padded_blocks, Family, QK};

/// Activation rows quantized like ggml's Q8_0/Q8_1 (the two share values and scales; Q8_1
/// adds `s`, the scale times the block sum, which the Q4_1 minimum multiplies). Each row
/// is quantized on its own: the form of one row never depends on another.
#[derive(Debug, Default)]
pub struct QuantizedRows {
    pub(super) rows: usize,
    pub(super) nb: usize,
    /// Values, row-major, blocks in order.
    pub(super) qs: Vec<i8>,
    /// Per block (rows padded to a multiple of 16 blocks): scale, scale × sum (f16-rounded),
    /// the exact integer sum of the values, and that of its first 16.
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) sums: Vec<i32>,
    pub(super) lo_sums: Vec<i32>,
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
        // Each row on its own: values, then its padded per-block numbers.
        let row = |x: &[f32],
                   qs: &mut [i8],
                   d: &mut [f32],
                   s: &mut [f32],
                   sums: &mut [i32],
                   lo: &mut [i32]| {
            let blocks = x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK));
            for (b, (src, dst)) in blocks.enumerate() {
                let block = match simd {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: AVX2 and F16C were detected.
                    true => unsafe { quantize_block_avx2(src, dst) },
                    _ => quantize_block(src, dst),
                };
                (d[b], s[b], sums[b], lo[b]) = (block.d, block.s, block.sum, block.lo_sum);
            }
        };
        // A prefill's rows on the pool; a decode batch's few on the calling thread.
        if rows >= PAR_MIN_ROWS && k > 0 && rayon::current_num_threads() > 1 {
            let parts = x.par_chunks(k).zip(self.qs.par_chunks_mut(k));
            let parts = parts
                .zip(self.d.par_chunks_mut(nbp))
                .zip(self.s.par_chunks_mut(nbp));
            let parts = parts
                .zip(self.sums.par_chunks_mut(nbp))
                .zip(self.lo_sums.par_chunks_mut(nbp));
            parts
                .with_min_len(16)
                .for_each(|(((((x, qs), d), s), sums), lo)| row(x, qs, d, s, sums, lo));
        } else {
            for r in 0..rows {
                let at = r * nbp..(r + 1) * nbp;
                row(
                    &x[r * k..][..k],
                    &mut self.qs[r * k..][..k],
                    &mut self.d[at.clone()],
                    &mut self.s[at.clone()],
                    &mut self.sums[at.clone()],
                    &mut self.lo_sums[at],
                );
            }
        }
    }
}

/// Rows from which quantization runs on the pool.
const PAR_MIN_ROWS: usize = 64;

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
    /// Inlined into the tiles: out of line it returned its 320 bytes through memory, and
    /// those stores queued behind the previous tile's output stores (docs/PERFORMANCE.md,
    /// "The qmatmul/ split").
    ///
    /// # Safety
    /// Rows r0..r0 + R exist in `x`.
    #[inline(always)]
    pub(super) unsafe fn new(x: &QuantizedRows, r0: usize) -> Self {
        let (nb, nbp) = (x.nb, padded_blocks(x.nb));
        // SAFETY: row starts inside the buffers.
        unsafe {
            RowPtrs {
                qs: std::array::from_fn(|r| x.qs.as_ptr().add((r0 + r) * nb * QK) as *const i32),
                d: std::array::from_fn(|r| x.d.as_ptr().add((r0 + r) * nbp)),
                s: std::array::from_fn(|r| x.s.as_ptr().add((r0 + r) * nbp)),
                sums: std::array::from_fn(|r| x.sums.as_ptr().add((r0 + r) * nbp)),
                lo_sums: std::array::from_fn(|r| x.lo_sums.as_ptr().add((r0 + r) * nbp)),
            }
        }
    }
}

/// A tile of activation rows and each row's accumulator, one vector `V` of outputs.
pub(super) struct Tile<V, const R: usize> {
    pub rows: RowPtrs<R>,
    pub acc: [V; R],
}

impl<V: Copy, const R: usize> Tile<V, R> {
    /// Rows r0..r0 + R of `x`, every accumulator `zero`.
    ///
    /// # Safety
    /// Those rows exist in `x`.
    #[inline(always)]
    pub(super) unsafe fn new(x: &QuantizedRows, r0: usize, zero: V) -> Self {
        Tile {
            // SAFETY: the caller's contract.
            rows: unsafe { RowPtrs::new(x, r0) },
            acc: [zero; R],
        }
    }
}

/// One quantized activation block's numbers besides its values.
#[derive(Debug, PartialEq)]
struct BlockSums {
    /// The scale, rounded to f16 as ggml stores it.
    pub(super) d: f32,
    /// The scale times the sum of the values, rounded to f16.
    pub(super) s: f32,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatmul::test_support::noise;

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

    #[test]
    fn rows_quantized_on_the_pool_equal_rows_quantized_alone() {
        let (rows, k) = (PAR_MIN_ROWS + 13, 96);
        let x = noise(rows * k, 4);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let mut all = QuantizedRows::default();
        pool.install(|| all.quantize(&x, rows));
        let nbp = padded_blocks(k / QK);
        let mut one = QuantizedRows::default();
        for r in 0..rows {
            one.quantize(&x[r * k..][..k], 1);
            assert_eq!(one.qs, all.qs[r * k..][..k], "row {r}");
            let at = r * nbp..(r + 1) * nbp;
            assert_eq!(one.d, all.d[at.clone()]);
            assert_eq!(one.s, all.s[at.clone()]);
            assert_eq!(one.sums, all.sums[at.clone()]);
            assert_eq!(one.lo_sums, all.lo_sums[at]);
        }
    }
}
