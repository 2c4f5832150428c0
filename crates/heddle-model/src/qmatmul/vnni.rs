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

use super::activations::Tile;
use super::{OutPtr, QuantizedRows, LANES};

/// Rows per tile: each row's accumulators stay in registers beside the group's 8
/// vectors of weights.
pub(super) const ROWS: usize = 8;

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

/// Weights in groups of 16 rows of W, one output column per lane, which [`run`]
/// multiplies a block of 32 at a time.
/// Block `b` of group `g` of a grouped matrix of `nb` blocks a row.
#[derive(Debug, Clone, Copy)]
pub(super) struct GroupBlock {
    pub nb: usize,
    pub g: usize,
    pub b: usize,
}

impl GroupBlock {
    #[inline(always)]
    pub(super) fn new(nb: usize, g: usize, b: usize) -> Self {
        GroupBlock { nb, g, b }
    }

    /// Its index among the grouped blocks: g·nb + b.
    #[inline(always)]
    pub(super) fn index(self) -> usize {
        self.g * self.nb + self.b
    }

    /// The same block [`PREFETCH_GROUPS_AHEAD`] groups further on: the one to prefetch.
    #[inline(always)]
    pub(super) fn ahead(self) -> Self {
        GroupBlock::new(self.nb, self.g + PREFETCH_GROUPS_AHEAD, self.b)
    }
}

pub(super) trait GroupedWeights {
    /// Asks for the block `at` (where it exists) to be brought into L1.
    fn prefetch(&self, at: GroupBlock);

    /// Adds the products of the block `at` with the same block of each of the tile's
    /// rows to that row's 16 accumulators.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and VNNI; the block and the tile's rows exist.
    unsafe fn accumulate<const R: usize>(&self, at: GroupBlock, tile: &mut Tile<__m512, R>);
}

/// Rows r0..r0 + R of the output, the 16 columns of group g.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<W: GroupedWeights, const R: usize>(
    w: &W,
    nb: usize,
    x: &QuantizedRows,
    r0: usize,
    g: usize,
    n: usize,
    out: OutPtr,
) {
    // SAFETY: the caller's contract: group g and rows r0..r0 + R exist.
    let mut tile = unsafe { Tile::<_, R>::new(x, r0, _mm512_setzero_ps()) };
    for b in 0..nb {
        let at = GroupBlock::new(nb, g, b);
        w.prefetch(at.ahead());
        // SAFETY: as above; b < nb.
        unsafe { w.accumulate(at, &mut tile) };
    }
    let lanes = LANES.min(n - g * LANES);
    for (r, &v) in tile.acc.iter().enumerate() {
        // SAFETY: the caller owns these columns.
        unsafe { store(out, (r0 + r) * n + g * LANES, lanes, v) }
    }
}

/// Computes columns `cols` of every row of `x`·Wᵀ into `out` (row stride n): groups
/// outside, so a group's weights stay in L1 while all tiles of rows pass over them.
///
/// # Safety
/// The CPU has AVX-512 F/BW/VL and VNNI; `w` holds its layout of an n × nb·32 matrix;
/// `cols` starts on a group; no other thread writes those columns.
pub(super) unsafe fn run<W: GroupedWeights>(
    w: &W,
    nb: usize,
    x: &QuantizedRows,
    cols: Range<usize>,
    n: usize,
    out: OutPtr,
) {
    for g in cols.start / LANES..cols.end.div_ceil(LANES) {
        let mut r = 0;
        while r < x.rows {
            let left = (x.rows - r).min(ROWS);
            // SAFETY: the caller's contract.
            unsafe {
                match left {
                    8 => tile::<W, 8>(w, nb, x, r, g, n, out),
                    7 => tile::<W, 7>(w, nb, x, r, g, n, out),
                    6 => tile::<W, 6>(w, nb, x, r, g, n, out),
                    5 => tile::<W, 5>(w, nb, x, r, g, n, out),
                    4 => tile::<W, 4>(w, nb, x, r, g, n, out),
                    3 => tile::<W, 3>(w, nb, x, r, g, n, out),
                    2 => tile::<W, 2>(w, nb, x, r, g, n, out),
                    _ => tile::<W, 1>(w, nb, x, r, g, n, out),
                }
            }
            r += left;
        }
    }
}

/// Block `gb`'s 256 bytes of nibbles (the Q4_1x16 layout) as 8 units of 64 bytes, one
/// per four elements: the low nibbles (elements 0..16), then the high ones.
#[inline(always)]
pub(super) unsafe fn nibble_units(qs: &[u8], gb: usize) -> [__m512i; 8] {
    let low = _mm512_set1_epi8(0x0F);
    let mut units = [_mm512_setzero_si512(); 8];
    for j in 0..4 {
        // SAFETY: the caller's block exists.
        let v = unsafe { _mm512_loadu_si512(qs.as_ptr().add(gb * 256 + j * 64) as *const __m512i) };
        units[j] = _mm512_and_si512(v, low);
        units[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    units
}

/// Block `gb`'s 512 bytes (the Q8_0x16 layout) as its 8 units.
#[inline(always)]
pub(super) unsafe fn byte_units(qs: &[u8], gb: usize) -> [__m512i; 8] {
    // SAFETY: the caller's block exists.
    std::array::from_fn(|i| unsafe {
        _mm512_loadu_si512(qs.as_ptr().add(gb * 512 + i * 64) as *const __m512i)
    })
}

/// acc[r] += (Σ units·x[r] − OFFSET·Σx[r]) · (dw · d[r]) for block `b` of each row: the
/// integer sum starts from −OFFSET times the row's block sum, undoing weights stored
/// OFFSET above their values.
#[inline(always)]
pub(super) unsafe fn add_block_products<const R: usize, const OFFSET: i32>(
    Tile { rows, acc }: &mut Tile<__m512, R>,
    units: &[__m512i; 8],
    b: usize,
    dw: __m512,
) {
    for r in 0..R {
        // SAFETY: the caller's rows and block exist.
        unsafe {
            let init = if OFFSET == 0 {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(-OFFSET * *rows.sums[r].add(b))
            };
            let sum = block_dot(units, rows.qs[r].add(b * 8), init);
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*rows.d[r].add(b)));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[r]);
        }
    }
}

/// [`add_block_products`] with a scale per half-block: each half's integer sum starts
/// from −OFFSET times the sum of its 16 activations.
#[inline(always)]
pub(super) unsafe fn add_half_products<const R: usize, const OFFSET: i32>(
    Tile { rows, acc }: &mut Tile<__m512, R>,
    units: &[__m512i; 8],
    b: usize,
    (d_lo, d_hi): (__m512, __m512),
) {
    for r in 0..R {
        // SAFETY: the caller's rows and block exist.
        unsafe {
            let (sum, lo) = (*rows.sums[r].add(b), *rows.lo_sums[r].add(b));
            let (a, h) = half_dots(
                units,
                rows.qs[r].add(b * 8),
                _mm512_set1_epi32(-OFFSET * lo),
                _mm512_set1_epi32(-OFFSET * (sum - lo)),
            );
            let dx = _mm512_set1_ps(*rows.d[r].add(b));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(d_lo, dx), acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), _mm512_mul_ps(d_hi, dx), acc[r]);
        }
    }
}

/// acc[r] += mw · s[r] for block `b` of each row: the minimums times the activations'
/// scaled block sums.
#[inline(always)]
pub(super) unsafe fn add_mins<const R: usize>(
    Tile { rows, acc }: &mut Tile<__m512, R>,
    b: usize,
    mw: __m512,
) {
    for r in 0..R {
        // SAFETY: the caller's rows and block exist.
        acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(unsafe { *rows.s[r].add(b) }), acc[r]);
    }
}

/// Q4_1x16: 4-bit weights with a scale and a minimum per block.
pub(super) struct Q4_1x16<'a> {
    pub qs: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
}

impl GroupedWeights for Q4_1x16<'_> {
    #[inline(always)]
    fn prefetch(&self, at: GroupBlock) {
        let gb = at.index();
        prefetch(self.qs, gb * 256, 256);
        prefetch(self.d, gb * LANES, LANES);
        prefetch(self.m, gb * LANES, LANES);
    }

    #[inline(always)]
    unsafe fn accumulate<const R: usize>(&self, at: GroupBlock, tile: &mut Tile<__m512, R>) {
        let (b, gb) = (at.b, at.index());
        // SAFETY: the caller's contract.
        unsafe {
            let units = nibble_units(self.qs, gb);
            let dw = _mm512_loadu_ps(self.d.as_ptr().add(gb * LANES));
            let mw = _mm512_loadu_ps(self.m.as_ptr().add(gb * LANES));
            add_block_products::<R, 0>(tile, &units, b, dw);
            add_mins(tile, b, mw);
        }
    }
}

/// Q8_0x16: 8-bit weights stored +128, with a scale per block.
pub(super) struct Q8_0x16<'a> {
    pub qs: &'a [u8],
    pub d: &'a [f32],
}

impl GroupedWeights for Q8_0x16<'_> {
    #[inline(always)]
    fn prefetch(&self, at: GroupBlock) {
        let gb = at.index();
        prefetch(self.qs, gb * 512, 512);
        prefetch(self.d, gb * LANES, LANES);
    }

    #[inline(always)]
    unsafe fn accumulate<const R: usize>(&self, at: GroupBlock, tile: &mut Tile<__m512, R>) {
        let (b, gb) = (at.b, at.index());
        // SAFETY: the caller's contract.
        unsafe {
            let units = byte_units(self.qs, gb);
            let dw = _mm512_loadu_ps(self.d.as_ptr().add(gb * LANES));
            add_block_products::<R, 128>(tile, &units, b, dw);
        }
    }
}
