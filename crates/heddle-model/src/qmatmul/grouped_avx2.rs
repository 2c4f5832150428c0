//! AVX2 kernels on the VNNI kernels' 16-column layouts (Q4_1x16 for 4-bit weights —
//! Q4_1, Q4_0, Q4_K — and Q8_0x16): each 32-byte half of a 64-byte unit holds four
//! consecutive weights of 8 output columns, so with four activation bytes broadcast to
//! every lane, `maddubs` multiplies 8 columns at once and no horizontal sum is needed.
//!
//! The row-major AVX2 kernels they replace spent, per block of 32 weights, one row and
//! one column, a `maddubs`, a `madd`, a conversion, a scale product and a fused
//! multiply-add on 32 multiply-adds, with nothing shared between rows but the unpacked
//! weights, and ran at about 50 G multiply-adds a second per core at any batch size.
//! Here the conversion and scales are applied once per block and 8 columns. For 4-bit
//! weights the integer products of a whole block are summed in 16-bit lanes — a nibble
//! (≤ 15) times an activation (|x| ≤ 127), two per `maddubs` lane and eight units, stay
//! under 2^15 — so a row costs 8 `maddubs` and 8 additions per 256 multiply-adds plus a
//! fixed few. 8-bit weights need `maddubs`' sign trick (|w| against x carrying w's sign)
//! and a `madd` to 32 bits per unit, since two of their products already fill 16 bits.
//!
//! Each output's arithmetic is the same whatever the number of rows or the tile it falls
//! in, so batch invariance holds as in the other kernels.

use std::arch::x86_64::*;
use std::ops::Range;

use super::activations::Tile;
use super::vnni::{GroupBlock, GroupedWeights, Q4_1x16, Q8_0x16};
use super::{OutPtr, QuantizedRows, LANES};

/// Rows per tile: their 16-bit and f32 accumulators, the block's two unpacked units and
/// the nibble mask take 15 of the 16 vector registers. Each row shares the unpacking of
/// the block's nibbles (3 of the ≈ 23 vector operations a row spent per block and 8
/// columns at 4 rows, 2 at 6): 4 → 6 rows took Q4_1 at 16 and 128 rows from 134–138 to
/// 138–142 G multiply-adds/s per core (docs/PERFORMANCE.md).
const ROWS: usize = 6;

/// Columns per half of a group: one f32 lane each in a 256-bit vector.
const HALF: usize = LANES / 2;

/// A tile of rows and their accumulators for half a group: 8 columns.
type HalfTile<const R: usize> = Tile<__m256, R>;

/// Grouped weights the AVX2 tiles multiply half a group (8 columns) at a time; they
/// prefetch as the VNNI kernels do.
pub(super) trait HalfGroups: GroupedWeights {
    /// Adds the products of half `h` of the block `at` with the same block of each of
    /// the tile's rows to that row's 8 accumulators.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the block and the tile's rows exist.
    unsafe fn add_half<const R: usize>(&self, at: GroupBlock, h: usize, tile: &mut HalfTile<R>);
}

/// Rows r0..r0 + R of the output, columns 8·h.. of group g.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<W: HalfGroups, const R: usize>(
    w: &W,
    nb: usize,
    x: &QuantizedRows,
    r0: usize,
    g: usize,
    h: usize,
    n: usize,
    out: OutPtr,
) {
    // SAFETY: the caller's contract: group g and rows r0..r0 + R exist.
    let mut tile = unsafe { Tile::<_, R>::new(x, r0, _mm256_setzero_ps()) };
    for b in 0..nb {
        let at = GroupBlock::new(nb, g, b);
        if h == 0 {
            w.prefetch(at.ahead());
        }
        // SAFETY: as above; b < nb.
        unsafe { w.add_half(at, h, &mut tile) };
    }
    // SAFETY: the caller owns these columns of the rows.
    unsafe { store(&tile.acc, r0, g, h, n, out) }
}

/// Stores `acc[r]` as columns 8·h.. of group g of row r0 + r (fewer in a partial group).
///
/// # Safety
/// The caller owns those columns of those rows.
#[target_feature(enable = "avx2,fma")]
unsafe fn store<const R: usize>(
    acc: &[__m256; R],
    r0: usize,
    g: usize,
    h: usize,
    n: usize,
    out: OutPtr,
) {
    let first = g * LANES + h * HALF;
    let lanes = HALF.min(n - first);
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(lanes as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    for (r, &v) in acc.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { _mm256_maskstore_ps(out.0.add((r0 + r) * n + first), mask, v) }
    }
}

impl HalfGroups for Q4_1x16<'_> {
    /// The integer products of the whole block summed in 16-bit lanes (see above).
    #[inline(always)]
    unsafe fn add_half<const R: usize>(&self, at: GroupBlock, h: usize, tile: &mut HalfTile<R>) {
        let Tile { rows, acc } = tile;
        let (b, gb) = (at.b, at.index());
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        // SAFETY (all pointer arithmetic below): the caller's contract.
        let mut sums = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            let chunk = unsafe {
                _mm256_loadu_si256(
                    self.qs.as_ptr().add(gb * 256 + j * 64 + h * 32) as *const __m256i
                )
            };
            // Elements 4j.. of the block, and 16 + 4j..
            let lo = _mm256_and_si256(chunk, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(chunk, 4), low);
            for (r, sum) in sums.iter_mut().enumerate() {
                let (xa, xb) = unsafe {
                    let p = rows.qs[r].add(b * 8);
                    (p.add(j).read_unaligned(), p.add(j + 4).read_unaligned())
                };
                let pa = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(xa));
                let pb = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(xb));
                *sum = _mm256_add_epi16(*sum, _mm256_add_epi16(pa, pb));
            }
        }
        let (dw, mw) = unsafe {
            let at = gb * LANES + h * HALF;
            (
                _mm256_loadu_ps(self.d.as_ptr().add(at)),
                _mm256_loadu_ps(self.m.as_ptr().add(at)),
            )
        };
        for r in 0..R {
            let sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[r], ones));
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(unsafe { *rows.d[r].add(b) }));
            acc[r] = _mm256_fmadd_ps(sum, scale, acc[r]);
            acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(unsafe { *rows.s[r].add(b) }), acc[r]);
        }
    }
}

impl HalfGroups for Q8_0x16<'_> {
    /// The values + 128 back to signed bytes, then `maddubs`' sign trick and a `madd`
    /// to 32 bits per unit.
    #[inline(always)]
    unsafe fn add_half<const R: usize>(&self, at: GroupBlock, h: usize, tile: &mut HalfTile<R>) {
        let Tile { rows, acc } = tile;
        let (b, gb) = (at.b, at.index());
        let bias = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        // SAFETY (all pointer arithmetic below): the caller's contract.
        let mut sums = [_mm256_setzero_si256(); R];
        for i in 0..8 {
            let unit = unsafe {
                _mm256_loadu_si256(
                    self.qs.as_ptr().add(gb * 512 + i * 64 + h * 32) as *const __m256i
                )
            };
            // Back to the signed values, then maddubs' unsigned |w| and w's sign on x.
            let w = _mm256_xor_si256(unit, bias);
            let magnitude = _mm256_abs_epi8(w);
            for (r, sum) in sums.iter_mut().enumerate() {
                let xv = _mm256_set1_epi32(unsafe { rows.qs[r].add(b * 8 + i).read_unaligned() });
                let pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(xv, w));
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
            }
        }
        let dw = unsafe { _mm256_loadu_ps(self.d.as_ptr().add(gb * LANES + h * HALF)) };
        for r in 0..R {
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(unsafe { *rows.d[r].add(b) }));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, acc[r]);
        }
    }
}

/// Computes columns `cols` of every row of `x`·Wᵀ into `out` (row stride n): every
/// half-group of `cols` that holds a real column, and every tile of up to [`ROWS`] rows.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` holds its layout of an n × nb·32 matrix; `cols` starts
/// on a group of 16; no other thread writes those columns.
pub(super) unsafe fn run<W: HalfGroups>(
    w: &W,
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
                        6 => tile::<W, 6>(w, nb, x, r, g, h, n, out),
                        5 => tile::<W, 5>(w, nb, x, r, g, h, n, out),
                        4 => tile::<W, 4>(w, nb, x, r, g, h, n, out),
                        3 => tile::<W, 3>(w, nb, x, r, g, h, n, out),
                        2 => tile::<W, 2>(w, nb, x, r, g, h, n, out),
                        _ => tile::<W, 1>(w, nb, x, r, g, h, n, out),
                    }
                }
                r += left;
            }
        }
    }
}
