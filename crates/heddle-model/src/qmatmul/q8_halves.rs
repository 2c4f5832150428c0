//! Kernels for 8-bit weights with a scale per half-block of 16 and a minimum per block of
//! 32, w = d[half]·q + m: the exact form of Q5_0, Q5_1 and Q5_K
//! ([`super::ggml_blocks::Bytes`]); also of Q6_K, which runs its own 6-bit kernel
//! ([`super::q6_k`]) and is checked against this form.
//!
//! Those formats store 5 or 6 bits a weight, split between a nibble array and a high-bit
//! array; heddle spends a whole byte on each weight instead (plus 12 bytes of scales per
//! 32), so that the inner loop is Q8_0's: one integer dot product per half-block, then a
//! fused multiply-add by the half's scale times the activation block's. The minimum
//! multiplies the activations' scaled block sum, as Q4_1's does. The cost is memory: 11
//! bits a weight against the file's 5.5–6, which only matters where a decode step is
//! bound by reading the weights.
//!
//! Values are at most 32 in magnitude (Q6_K's q − 32), so AVX2's `maddubs` pairs
//! (|w|·|x| ≤ 32·127, twice) never saturate.

use super::ggml_blocks::Bytes;
use super::portable::Dot;
use super::{
    for_each_grouped_block, padded_blocks, q8x16_at, Family, QuantizedRows, Storage, LANES, QK,
};

/// The storage of an n × k matrix whose block `b` of row `c` is `block(c, b)`, laid out
/// for `family`: row-major, or for VNNI in groups of 16 rows like Q8_0x16 (values + 128
/// in 64-byte units, then per block 16 scales of the first halves, 16 of the second
/// halves, and 16 minimums).
pub(super) fn storage(
    n: usize,
    k: usize,
    block: impl Fn(usize, usize) -> Bytes,
    family: Family,
) -> Storage {
    let nb = k / QK;
    if family == Family::Vnni {
        let groups = n.div_ceil(LANES);
        let mut qs = vec![128u8; groups * nb * 512];
        let mut d = vec![0f32; groups * nb * 2 * LANES];
        let mut m = vec![0f32; groups * nb * LANES];
        for_each_grouped_block(n, nb, |c, b, gb, l| {
            let src = block(c, b);
            d[gb * 2 * LANES + l] = src.d[0];
            d[gb * 2 * LANES + LANES + l] = src.d[1];
            m[gb * LANES + l] = src.m;
            for (e, &v) in src.qs.iter().enumerate() {
                qs[q8x16_at(gb, l, e)] = (v as i16 + 128) as u8;
            }
        });
        return Storage::Q8Halvesx16 { qs, d, m };
    }
    let nbp = padded_blocks(nb);
    let mut qs = Vec::with_capacity(n * k);
    let mut d = Vec::with_capacity(n * nb * 2);
    let mut m = vec![0f32; n * nbp];
    for c in 0..n {
        for b in 0..nb {
            let src = block(c, b);
            qs.extend_from_slice(&src.qs);
            d.extend_from_slice(&src.d);
            m[c * nbp + b] = src.m;
        }
    }
    Storage::Q8Halves { qs, d, m }
}

/// Block `b` of row `r` in f32, computed as ggml dequantizes it.
pub(super) fn block_values(storage: &Storage, nb: usize, r: usize, b: usize, out: &mut [f32]) {
    match storage {
        Storage::Q8Halves { qs, d, m } => {
            let at = r * nb + b;
            let min = m[r * padded_blocks(nb) + b];
            for (e, (o, &q)) in out.iter_mut().zip(&qs[at * QK..][..QK]).enumerate() {
                *o = d[at * 2 + e / 16] * q as f32 + min;
            }
        }
        Storage::Q8Halvesx16 { qs, d, m } => {
            let (gb, l) = ((r / LANES) * nb + b, r % LANES);
            for (e, o) in out.iter_mut().enumerate() {
                let q = qs[q8x16_at(gb, l, e)] as i32 - 128;
                *o = d[gb * 2 * LANES + (e / 16) * LANES + l] * q as f32 + m[gb * LANES + l];
            }
        }
        _ => unreachable!("not a Q8Halves storage"),
    }
}

/// Row-major weights: values, two scales per block, minimums padded per row.
pub(super) struct RowMajor<'a> {
    pub nb: usize,
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub m: &'a [f32],
}

/// Plain Rust: one output at a time, blocks in order.
impl Dot for RowMajor<'_> {
    fn dot(&self, c: usize, x: &QuantizedRows, r: usize) -> f32 {
        let w = self;
        let (nb, nbp) = (w.nb, padded_blocks(w.nb));
        let mut acc = 0f32;
        let mut mins = 0f32;
        for b in 0..nb {
            let wq = &w.qs[(c * nb + b) * QK..][..QK];
            let xq = &x.qs[(r * nb + b) * QK..][..QK];
            let half = |h: usize| -> i32 {
                let span = h * 16..h * 16 + 16;
                wq[span.clone()]
                    .iter()
                    .zip(&xq[span])
                    .map(|(&a, &b)| a as i32 * b as i32)
                    .sum()
            };
            let dx = x.d[r * nbp + b];
            let ds = &w.d[(c * nb + b) * 2..][..2];
            acc += half(0) as f32 * (ds[0] * dx) + half(1) as f32 * (ds[1] * dx);
            mins += w.m[c * nbp + b] * x.s[r * nbp + b];
        }
        acc + mins
    }
}

/// AVX2 + FMA, tiled like Q8_0's kernel (up to 4 rows × 2 columns per tile). After
/// `maddubs` and `madd`, i32 lanes 0..4 hold the first half's products and lanes 4..8
/// the second's, so one vector of the two scales applies both.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use crate::qmatmul::avx2::{
        add_signed_products, hsum, row_blocks, row_starts, scale_dot, TileAt, Tiles,
    };
    use std::arch::x86_64::*;

    impl Tiles<QuantizedRows> for RowMajor<'_> {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile<const R: usize, const C: usize>(&self, x: &QuantizedRows, at: TileAt) {
            let (w, TileAt { r0, c0, n, out }) = (self, at);
            let nb = w.nb;
            let nbp = padded_blocks(nb);
            // SAFETY (all pointer arithmetic below): rows r0..r0 + R and columns c0..c0 + C
            // exist, and b < nb stays inside each row's blocks.
            let (xq, xd) = unsafe { row_starts::<R>(x, r0) };
            let wq: [*const i8; C] =
                std::array::from_fn(|c| unsafe { w.qs.as_ptr().add((c0 + c) * nb * QK) });
            let wd: [*const f32; C] =
                std::array::from_fn(|c| unsafe { w.d.as_ptr().add((c0 + c) * nb * 2) });
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for b in 0..nb {
                let xv = unsafe { row_blocks(&xq, b) };
                for c in 0..C {
                    let wv = unsafe { _mm256_loadu_si256(wq[c].add(b * QK) as *const __m256i) };
                    let dw = unsafe {
                        _mm256_set_m128(
                            _mm_set1_ps(*wd[c].add(2 * b + 1)),
                            _mm_set1_ps(*wd[c].add(2 * b)),
                        )
                    };
                    unsafe { add_signed_products(&mut acc, c, (wv, dw), (&xv, &xd), b) };
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
    }
}

/// AVX-512 VNNI on the grouped layout, as Q8_0x16's kernel: each lane is an output
/// column, `vpdpbusd` on four broadcast activation bytes. The values carry +128, so each
/// half's integer sum starts from −128 times the sum of its 16 activations.
#[cfg(target_arch = "x86_64")]
pub(super) mod vnni {
    use super::*;
    use crate::qmatmul::activations::Tile;
    use crate::qmatmul::vnni::{
        add_half_products, add_mins, byte_units, prefetch, GroupBlock, GroupedWeights,
    };
    use std::arch::x86_64::*;

    /// A [`Storage::Q8Halvesx16`]'s buffers.
    pub(in crate::qmatmul) struct Grouped<'a> {
        pub qs: &'a [u8],
        pub d: &'a [f32],
        pub m: &'a [f32],
    }

    impl GroupedWeights for Grouped<'_> {
        #[inline(always)]
        fn prefetch(&self, at: GroupBlock) {
            let gb = at.index();
            prefetch(self.qs, gb * 512, 512);
            prefetch(self.d, gb * 2 * LANES, 2 * LANES);
            prefetch(self.m, gb * LANES, LANES);
        }

        #[inline(always)]
        unsafe fn accumulate<const R: usize>(&self, at: GroupBlock, tile: &mut Tile<__m512, R>) {
            let gb = at.index();
            // SAFETY: the caller's contract.
            unsafe {
                let units = byte_units(self.qs, gb);
                let d = self.d.as_ptr().add(gb * 2 * LANES);
                let halves = (_mm512_loadu_ps(d), _mm512_loadu_ps(d.add(LANES)));
                let mw = _mm512_loadu_ps(self.m.as_ptr().add(gb * LANES));
                add_half_products::<R, 128>(tile, &units, at.b, halves);
                add_mins(tile, at.b, mw);
            }
        }
    }
}
