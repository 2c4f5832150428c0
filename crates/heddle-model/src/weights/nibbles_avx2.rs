//! The AVX2 kernel for 4-bit weights (Q4_1, Q4_0, Q4_K), on the VNNI kernel's Q4_1x16
//! layout: each 32-byte half of a 64-byte unit holds four consecutive weights of 8
//! output columns, so with four activation bytes broadcast to every lane, `maddubs`
//! multiplies 8 columns at once and no horizontal sum is ever needed.
//!
//! The row-major AVX2 kernel it replaces spent, per block of 32 weights, one row and one
//! column, a `maddubs`, a `madd`, a conversion, a scale product and a fused multiply-add
//! on 32 multiply-adds, with nothing shared between rows but the unpacked nibbles, and
//! ran at about 50 G multiply-adds a second per core at any batch size. Here the integer
//! products of a whole block are summed in 16-bit lanes — a nibble (≤ 15) times an
//! activation (|x| ≤ 127), two per `maddubs` lane and eight units, stay under 2^15 —
//! and the conversion, scales and minimum are applied once per block and 8 columns, so a
//! row costs 8 `maddubs` and 8 additions per 256 multiply-adds plus a fixed few.
//!
//! Each output's arithmetic is the same whatever the number of rows or the tile it falls
//! in, so batch invariance holds as in the other kernels.

use std::arch::x86_64::*;
use std::ops::Range;

use super::vnni::{prefetch, PREFETCH_GROUPS_AHEAD};
use super::{padded_blocks, OutPtr, QuantizedRows, LANES, QK};

/// Rows per tile: their 16-bit and f32 accumulators, the block's two unpacked units and
/// the constants fill the 16 vector registers.
const ROWS: usize = 4;

/// Columns per half of a group: one f32 lane each in a 256-bit vector.
const HALF: usize = LANES / 2;

/// Rows r0..r0 + R of the output, columns 8·h.. of group g.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn tile<const R: usize>(
    qs: &[u8],
    d: &[f32],
    m: &[f32],
    nb: usize,
    x: &QuantizedRows,
    r0: usize,
    g: usize,
    h: usize,
    n: usize,
    out: OutPtr,
) {
    let nbp = padded_blocks(nb);
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // SAFETY (all pointer arithmetic below): group g and rows r0..r0 + R exist; b < nb.
    let xq: [*const i32; R] =
        std::array::from_fn(|r| unsafe { x.qs.as_ptr().add((r0 + r) * nb * QK) as *const i32 });
    let xd: [*const f32; R] = std::array::from_fn(|r| unsafe { x.d.as_ptr().add((r0 + r) * nbp) });
    let xs: [*const f32; R] = std::array::from_fn(|r| unsafe { x.s.as_ptr().add((r0 + r) * nbp) });
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let gb = g * nb + b;
        if h == 0 {
            let ahead = gb + PREFETCH_GROUPS_AHEAD * nb;
            prefetch(qs, ahead * 256, 256);
            prefetch(d, ahead * LANES, LANES);
            prefetch(m, ahead * LANES, LANES);
        }
        let mut sums = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            let chunk = unsafe {
                _mm256_loadu_si256(qs.as_ptr().add(gb * 256 + j * 64 + h * 32) as *const __m256i)
            };
            // Elements 4j.. of the block, and 16 + 4j..
            let lo = _mm256_and_si256(chunk, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(chunk, 4), low);
            for r in 0..R {
                let (xa, xb) = unsafe {
                    let p = xq[r].add(b * 8);
                    (p.add(j).read_unaligned(), p.add(j + 4).read_unaligned())
                };
                let pa = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xa));
                let pb = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xb));
                sums[r] = _mm256_add_epi16(sums[r], _mm256_add_epi16(pa, pb));
            }
        }
        let (dw, mw) = unsafe {
            let at = gb * LANES + h * HALF;
            (
                _mm256_loadu_ps(d.as_ptr().add(at)),
                _mm256_loadu_ps(m.as_ptr().add(at)),
            )
        };
        for r in 0..R {
            let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r], ones));
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(unsafe { *xd[r].add(b) }));
            acc[r] = _mm256_fmadd_ps(sum, scale, acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(unsafe { *xs[r].add(b) }), acc[r]);
        }
    }
    let first = g * LANES + h * HALF;
    let lanes = HALF.min(n - first);
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(lanes as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    for r in 0..R {
        // SAFETY: the caller owns these `lanes` columns of the row.
        unsafe { _mm256_maskstore_ps(out.0.add((r0 + r) * n + first), mask, acc[r]) }
    }
}

/// # Safety
/// The CPU has AVX2 and FMA; the buffers hold the Q4_1x16 layout of an n × nb·32 matrix;
/// `cols` starts on a group of 16; no other thread writes those columns.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn q4_1x16(
    qs: &[u8],
    d: &[f32],
    m: &[f32],
    nb: usize,
    x: &QuantizedRows,
    cols: Range<usize>,
    n: usize,
    out: OutPtr,
) {
    for g in cols.start / LANES..cols.end.div_ceil(LANES) {
        // A last group of 8 or fewer real columns has nothing in its second half.
        for h in 0..(n - g * LANES).div_ceil(HALF).min(2) {
            let mut r = 0;
            while r < x.rows {
                let left = (x.rows - r).min(ROWS);
                // SAFETY: the caller's contract.
                unsafe {
                    match left {
                        4 => tile::<4>(qs, d, m, nb, x, r, g, h, n, out),
                        3 => tile::<3>(qs, d, m, nb, x, r, g, h, n, out),
                        2 => tile::<2>(qs, d, m, nb, x, r, g, h, n, out),
                        _ => tile::<1>(qs, d, m, nb, x, r, g, h, n, out),
                    }
                }
                r += left;
            }
        }
    }
}
