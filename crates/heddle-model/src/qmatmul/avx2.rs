//! AVX2 + FMA helpers and the f32 kernel, and the tiling that the row-major AVX2 kernels
//! ([`super::q8_halves`], [`super::q6_k`]) share: tiles of up to 4 rows × 2 columns share the loads of
//! weights and activations; each output keeps its own accumulator, so tiling changes no
//! result. Columns are walked in panels of 64, whose weights stay in L2 while every tile
//! of rows passes over them. (4-bit and Q8_0 weights have their own AVX2 kernels on the
//! 16-column layout, [`super::grouped_avx2`].)
//!
//! The tiles walk raw pointers: `Linear::forward` has checked that every row and column
//! they touch lies inside its buffers.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{padded_blocks, OutPtr, QuantizedRows, QK};

pub(super) const PANEL: usize = 64;

/// Where a tile's outputs go: rows r0.., columns c0.. of an output `n` columns wide.
#[derive(Clone, Copy)]
pub(super) struct TileAt {
    pub r0: usize,
    pub c0: usize,
    pub n: usize,
    pub out: OutPtr,
}

/// Row-major weights the AVX2 kernels multiply by activations `X` a tile of up to
/// 4 rows × 2 columns at a time.
pub(super) trait Tiles<X: ?Sized> {
    /// Rows r0..r0 + R, columns c0..c0 + C of the output.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; those rows and columns exist, and no other thread
    /// writes them.
    unsafe fn tile<const R: usize, const C: usize>(&self, x: &X, at: TileAt);
}

/// Computes columns `cols` of `rows` rows of `x`·Wᵀ into `out` (row stride n): the
/// columns in panels, each panel in tiles of 4 rows at a time then the remaining 1–3,
/// 2 columns at a time then a last odd one.
///
/// # Safety
/// The CPU has AVX2 and FMA; `w` and `x` fit n × k and rows × k; no other thread
/// writes columns `cols` of `out`.
pub(super) unsafe fn run<X: ?Sized, W: Tiles<X>>(
    w: &W,
    x: &X,
    rows: usize,
    cols: Range<usize>,
    n: usize,
    out: OutPtr,
) {
    let mut panel = cols.start;
    while panel < cols.end {
        let panel_end = cols.end.min(panel + PANEL);
        let mut r0 = 0;
        while r0 < rows {
            let left = (rows - r0).min(4);
            let mut c0 = panel;
            while c0 < panel_end {
                let two = panel_end - c0 >= 2;
                let at = TileAt { r0, c0, n, out };
                // SAFETY: the caller's contract.
                unsafe {
                    match (left, two) {
                        (4, true) => w.tile::<4, 2>(x, at),
                        (3, true) => w.tile::<3, 2>(x, at),
                        (2, true) => w.tile::<2, 2>(x, at),
                        (1, true) => w.tile::<1, 2>(x, at),
                        (4, false) => w.tile::<4, 1>(x, at),
                        (3, false) => w.tile::<3, 1>(x, at),
                        (2, false) => w.tile::<2, 1>(x, at),
                        _ => w.tile::<1, 1>(x, at),
                    }
                }
                c0 += if two { 2 } else { 1 };
            }
            r0 += left;
        }
        panel = panel_end;
    }
}

/// The values and scales of rows r0..r0 + R of `x`.
///
/// # Safety
/// Those rows exist.
pub(super) unsafe fn row_starts<const R: usize>(
    x: &QuantizedRows,
    r0: usize,
) -> ([*const i8; R], [*const f32; R]) {
    let (nb, nbp) = (x.nb, padded_blocks(x.nb));
    // SAFETY: row starts inside the buffers.
    unsafe {
        (
            std::array::from_fn(|r| x.qs.as_ptr().add((r0 + r) * nb * QK)),
            std::array::from_fn(|r| x.d.as_ptr().add((r0 + r) * nbp)),
        )
    }
}

/// Block `b` of each of the rows at `xq`.
///
/// # Safety
/// The CPU has AVX2; the rows hold block `b`.
#[inline(always)]
pub(super) unsafe fn row_blocks<const R: usize>(xq: &[*const i8; R], b: usize) -> [__m256i; R] {
    // SAFETY: the caller's contract.
    std::array::from_fn(|r| unsafe { _mm256_loadu_si256(xq[r].add(b * QK) as *const __m256i) })
}

/// acc[r][c] += Σ w·x[r] · (dw · d[r]) over a block, for each row of the tile: the
/// integer products in i32 lanes (lanes 0..4 the first half's, 4..8 the second's, as
/// `dw` holds the halves' scales). `maddubs` multiplies unsigned by signed bytes, so
/// w's sign moves onto x.
///
/// # Safety
/// `xd` points at each row's block scales, which hold block `b`.
#[inline(always)]
pub(super) unsafe fn add_signed_products<const R: usize, const C: usize>(
    acc: &mut [[__m256; C]; R],
    c: usize,
    (wv, dw): (__m256i, __m256),
    (xv, xd): (&[__m256i; R], &[*const f32; R]),
    b: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let wabs = _mm256_sign_epi8(wv, wv);
    for r in 0..R {
        let xs = _mm256_sign_epi8(xv[r], wv);
        let sum = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, xs), ones);
        // SAFETY: the caller's contract.
        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(unsafe { *xd[r].add(b) }));
        acc[r][c] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc[r][c]);
    }
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

/// Row-major f32 weights, `k` columns.
#[derive(Clone, Copy)]
pub(super) struct F32Rows<'a> {
    pub w: &'a [f32],
    pub k: usize,
}

impl Tiles<[f32]> for F32Rows<'_> {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const C: usize>(&self, x: &[f32], at: TileAt) {
        let (F32Rows { w, k }, TileAt { r0, c0, n, out }) = (*self, at);
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
}
