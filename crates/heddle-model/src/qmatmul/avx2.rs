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

use super::OutPtr;

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
