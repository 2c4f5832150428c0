//! Q4_K for the VNNI kernel, at close to its size in the file.
//!
//! Q4_K decodes exactly into Q4_1's form ([`super::ggml_blocks::q4_k`]), but Q4_1x16
//! stores an f32 scale and an f32 minimum per 32 weights: 6 bits a weight against the
//! file's 4.5, and a batch-1 decode step is bound by reading the weights. Here each block
//! keeps its two 6-bit factors as bytes, and each super-block of 8 blocks its f32 scale and
//! minimum scale: 4.75 bits a weight. The kernel rebuilds a block's scale and minimum with
//! one f32 product each, the very products the decoder makes (d·sc, and −dmin·mn as
//! (−dmin)·mn), so its results equal Q4_1x16's bit for bit.
//!
//! Layout, per group g of 16 rows of W (padded with zero rows) and block b, at g·nb + b:
//! 256 bytes of nibbles as in Q4_1x16, and 32 bytes of factors (16 lanes' sc, then 16
//! lanes' mn); per super-block s, at g·nb/8 + s, 32 floats (16 lanes' d, then 16 lanes'
//! −dmin).

use std::ops::Range;

use super::ggml_blocks::{q4_k, q4_k_scales};
use super::{
    for_each_grouped_block, put_q4_1x16_nibbles, q4_1x16_nibble, OutPtr, QuantizedRows, LANES, QK,
};

/// Blocks of 32 per super-block of 256.
const SUPER: usize = 8;

/// A Q4_K matrix in the layout above.
#[derive(Debug)]
pub(super) struct Q4Kx16 {
    qs: Vec<u8>,
    factors: Vec<u8>,
    scales: Vec<f32>,
}

impl Q4Kx16 {
    /// The n × k Q4_K matrix whose rows are `row_bytes` long in `bytes`.
    pub(super) fn new(n: usize, k: usize, bytes: &[u8], row_bytes: usize) -> Self {
        let nb = k / QK;
        let nsb = nb / SUPER;
        let groups = n.div_ceil(LANES);
        let mut w = Q4Kx16 {
            qs: vec![0u8; groups * nb * 256],
            factors: vec![0u8; groups * nb * 2 * LANES],
            scales: vec![0f32; groups * nsb * 2 * LANES],
        };
        for_each_grouped_block(n, nb, |c, b, gb, l| {
            let row = &bytes[c * row_bytes..][..row_bytes];
            put_q4_1x16_nibbles(&mut w.qs, gb, l, &q4_k(row, b).qs);
            let s = q4_k_scales(row, b);
            w.factors[gb * 2 * LANES + l] = s.sc;
            w.factors[gb * 2 * LANES + LANES + l] = s.mn;
            let at = w.super_at(nb, c / LANES, b);
            w.scales[at + l] = s.d;
            w.scales[at + LANES + l] = -s.dmin;
        });
        w
    }

    /// Where the scales of block `b` of group `g`'s super-block start.
    fn super_at(&self, nb: usize, g: usize, b: usize) -> usize {
        (g * (nb / SUPER) + b / SUPER) * 2 * LANES
    }

    /// Bytes of memory its weights take.
    pub(super) fn bytes(&self) -> usize {
        self.qs.len() + self.factors.len() + std::mem::size_of_val(&self.scales[..])
    }

    /// Whether the buffers fit an n × nb·32 matrix, so the kernel may walk raw pointers.
    pub(super) fn fits(&self, n: usize, nb: usize) -> bool {
        let groups = n.div_ceil(LANES);
        nb.is_multiple_of(SUPER)
            && self.qs.len() == groups * nb * 256
            && self.factors.len() == groups * nb * 2 * LANES
            && self.scales.len() == groups * (nb / SUPER) * 2 * LANES
    }

    /// Block `b` of row `r` in f32, computed as ggml dequantizes it.
    pub(super) fn block_values(&self, nb: usize, r: usize, b: usize, out: &mut [f32]) {
        let (g, l) = (r / LANES, r % LANES);
        let gb = g * nb + b;
        let at = self.super_at(nb, g, b);
        let d = self.scales[at + l] * self.factors[gb * 2 * LANES + l] as f32;
        let m = self.scales[at + LANES + l] * self.factors[gb * 2 * LANES + LANES + l] as f32;
        for (e, o) in out.iter_mut().enumerate() {
            *o = d * q4_1x16_nibble(&self.qs, gb, l, e) as f32 + m;
        }
    }

    /// Computes columns `cols` of every row of `x`·Wᵀ into `out` (row stride n).
    ///
    /// # Safety
    /// [`Q4Kx16::fits`] holds for n × nb; the CPU has AVX-512 F/BW/VL and VNNI; `cols`
    /// starts on a group; no other thread writes those columns.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn run(
        &self,
        nb: usize,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        // SAFETY: the caller's contract.
        unsafe { super::vnni::run(self, nb, x, cols, n, out) }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use crate::qmatmul::activations::Tile;
    use crate::qmatmul::vnni::{
        add_block_products, add_mins, nibble_units, prefetch, GroupBlock, GroupedWeights,
    };
    use std::arch::x86_64::*;

    /// The 16 lanes' factors at `p`, as floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn factors16(p: *const u8) -> __m512 {
        // SAFETY: the caller's 16 bytes.
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(unsafe {
            _mm_loadu_si128(p as *const __m128i)
        }))
    }

    impl GroupedWeights for Q4Kx16 {
        #[inline(always)]
        fn prefetch(&self, at: GroupBlock) {
            let gb = at.index();
            prefetch(&self.qs, gb * 256, 256);
            prefetch(&self.factors, gb * 2 * LANES, 2 * LANES);
            prefetch(&self.scales, self.super_at(at.nb, at.g, at.b), 2 * LANES);
        }

        /// Q4_1x16's arithmetic, each block's scale and minimum rebuilt from its factors
        /// and its super-block's scales.
        #[inline(always)]
        unsafe fn accumulate<const R: usize>(&self, at: GroupBlock, tile: &mut Tile<__m512, R>) {
            let gb = at.index();
            let sb = self.super_at(at.nb, at.g, at.b);
            // SAFETY: the caller's contract.
            unsafe {
                let units = nibble_units(&self.qs, gb);
                let f = self.factors.as_ptr().add(gb * 2 * LANES);
                let scales = self.scales.as_ptr();
                let dw = _mm512_mul_ps(_mm512_loadu_ps(scales.add(sb)), factors16(f));
                let mw = _mm512_mul_ps(
                    _mm512_loadu_ps(scales.add(sb + LANES)),
                    factors16(f.add(LANES)),
                );
                add_block_products::<R, 0>(tile, &units, at.b, dw);
                add_mins(tile, at.b, mw);
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::qmatmul::test_support::{noise, product, qtensor};
    use crate::qmatmul::{best_family, Family, Linear, Storage};
    use candle_core::quantized::GgmlDType;

    /// On a VNNI CPU, the compact layout computes exactly what Q4_1x16 computes from the
    /// same decoded blocks, in 4.75 bits a weight instead of 6.
    #[test]
    fn compact_q4_k_equals_q4_1x16_bit_for_bit() {
        if best_family() != Family::Vnni {
            return;
        }
        let (n, k, rows) = (37, 768, 5);
        let t = qtensor(GgmlDType::Q4K, n, k, 1);
        let compact = Linear::from_qtensor_for("w", &t, Family::Vnni).unwrap();
        assert!(matches!(compact.storage, Storage::Q4Kx16(_)));
        let bytes = t.data().unwrap();
        let row_bytes = k / 256 * 144;
        let wide = Linear {
            n,
            k,
            storage: Linear::nibble_storage(
                n,
                k,
                |c, b| q4_k(&bytes[c * row_bytes..][..row_bytes], b),
                Family::Vnni,
            ),
        };
        assert!(matches!(wide.storage, Storage::Q4_1x16 { .. }));
        let groups = n.div_ceil(LANES);
        assert_eq!(
            compact.bytes(),
            groups * (k / QK) * (256 + 32) + groups * (k / 256) * 128
        );
        assert!(compact.bytes() * 6 < wide.bytes() * 5);

        let x = noise(rows * k, 2);
        assert_eq!(
            product(Family::Vnni, &compact, &x, rows),
            product(Family::Vnni, &wide, &x, rows)
        );
        let mut a = vec![0f32; k];
        let mut b = vec![0f32; k];
        for r in 0..n {
            compact.row(r, &mut a);
            wide.row(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
    }
}
