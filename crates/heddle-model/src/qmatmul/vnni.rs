//! AVX-512 VNNI kernels. `vpdpbusd` multiplies 64 unsigned bytes by 64 signed bytes and
//! adds each group of four products into one of 16 i32 lanes. With the weights of 16 rows
//! of W interleaved four bytes per lane and four activation bytes broadcast to all lanes,
//! each lane is one output column: a block of 32 takes 8 such steps, then one conversion
//! and one fused multiply-add by the 16 columns' scales times the row's scale. No
//! horizontal sums, and the scales are handled once per 16 outputs.
//!
//! Layouts, per group g of 16 rows of W (padded with zero rows) and block b, at g·nb + b:
//! - Q4_1x16: 256 bytes in four 64-byte chunks; byte 4l + t of chunk j holds element
//!   4j + t of lane l's block in its low nibble and element 16 + 4j + t in its high one.
//!   Then 16 scales d and 16 minimums m.
//! - Q8_0x16: 512 bytes in eight 64-byte units; byte 4l + t of unit i holds element
//!   4i + t of lane l's block plus 128 (unsigned for vpdpbusd), then 16 scales. The
//!   surplus 128·Σx of each block is subtracted in integers, from the activations' exact
//!   block sums, before the conversion.
//!
//! Each output's arithmetic is the same for any number of rows, so batch invariance holds.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{padded_blocks, OutPtr, QuantizedRows, LANES, QK};

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
                qs: std::array::from_fn(|r| x.qs.as_ptr().add((r0 + r) * nb * QK) as *const i32),
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
            let v =
                unsafe { _mm512_loadu_si512(qs.as_ptr().add(gb * 256 + j * 64) as *const __m512i) };
            units[j] = _mm512_and_si512(v, low);
            units[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        }
        let dw = unsafe { _mm512_loadu_ps(d.as_ptr().add(gb * LANES)) };
        let mw = unsafe { _mm512_loadu_ps(m.as_ptr().add(gb * LANES)) };
        for r in 0..R {
            let sum = unsafe { block_dot(&units, rows.qs[r].add(b * 8), _mm512_setzero_si512()) };
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
