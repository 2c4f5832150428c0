//! Q6_K at its own size: 6 bits a weight, multiplied without widening.
//!
//! A Q6_K weight is w = (d·sc)·q, q = u − 32 with u a 6-bit value, sc a signed 8-bit
//! factor per 16 weights and d an f16 scale per super-block of 256. [`super::q8_halves`]
//! holds the same weights at a byte each plus f32 scales (11 bits a weight); a decode step
//! of a Q4_K_M file, whose output head and some `ffn_down`/`attn_v` matrices are Q6_K,
//! is bound by reading them. Here each weight keeps its 4 low bits in a nibble array and
//! its 2 high bits in a second array, each block its two factors as bytes and each
//! super-block its scale as f32: 6.625 bits a weight against the file's 6.5625.
//!
//! The kernels rebuild u from the two arrays, multiply it by the 8-bit activations and
//! subtract 32·Σx per half-block in integers (the activations' exact block sums), so the
//! integer sums are Σq·x; then each half's f32 scale is d·sc, the very product ggml's
//! dequantization makes, and the arithmetic after that is `q8_halves`' step for step:
//! the results equal the widened form's bit for bit (the tests check it).
//!
//! Layouts, for row c of W (or lane l of group g of 16 rows, padded with zero rows) and
//! block b of 32:
//! - row-major (portable, AVX2), at i = c·nb + b: 16 bytes of nibbles as ggml's Q4_1
//!   (element j low, j + 16 high), 8 bytes of high bits (byte j holds element 8p + j's
//!   in bits 2p, 2p + 1), 2 factors; each row's super-block scales at c·nsb + s.
//! - grouped (VNNI), at gb = g·nb + b: 256 bytes of nibbles as Q4_1x16; 128 bytes of high
//!   bits in two 64-byte chunks, byte 4l + t of chunk h holding in bits 2s, 2s + 1 those of
//!   element 4(4h + s) + t of lane l (so that each of the kernel's eight 4-element units
//!   takes its bits from one chunk with one shift); 32 factors (16 lanes' first halves,
//!   then their second halves); the scales at (g·nsb + s)·16 + l.

use std::ops::Range;

use super::ggml_blocks::{q6_k, q6_k_factors};
use super::portable::Dot;
use super::{padded_blocks, put_q4_1x16_nibbles, Family, OutPtr, QuantizedRows, LANES, QK};

/// Blocks of 32 per super-block of 256.
const SUPER: usize = 8;

/// A Q6_K matrix in one of the two layouts above.
#[derive(Debug)]
pub(super) struct Q6K {
    /// The VNNI layout (else row-major).
    grouped: bool,
    nibbles: Vec<u8>,
    highs: Vec<u8>,
    factors: Vec<i8>,
    scales: Vec<f32>,
}

impl Q6K {
    /// The n × k Q6_K matrix whose rows are `row_bytes` long in `bytes`, for `family`.
    pub(super) fn new(n: usize, k: usize, bytes: &[u8], row_bytes: usize, family: Family) -> Q6K {
        let (nb, nsb) = (k / QK, k / QK / SUPER);
        let grouped = family == Family::Vnni;
        let rows = if grouped {
            n.div_ceil(LANES) * LANES
        } else {
            n
        };
        let mut w = Q6K {
            grouped,
            nibbles: vec![0; rows * nb * 16],
            highs: vec![0; rows * nb * 8],
            factors: vec![0; rows * nb * 2],
            scales: vec![0.0; rows * nsb],
        };
        for c in 0..n {
            let row = &bytes[c * row_bytes..][..row_bytes];
            for b in 0..nb {
                let u: [u8; 32] = std::array::from_fn(|e| (q6_k(row, b).qs[e] as i16 + 32) as u8);
                let (d, sc) = q6_k_factors(row, b);
                w.put(nb, c, b, &u, d, sc);
            }
        }
        w
    }

    /// Stores block `b` of row `c`: its 6-bit values, super-block scale and factors.
    fn put(&mut self, nb: usize, c: usize, b: usize, u: &[u8; 32], d: f32, sc: [i8; 2]) {
        let nsb = nb / SUPER;
        let nibbles: [u8; 16] = std::array::from_fn(|j| (u[j] & 0x0F) | (u[j + 16] << 4));
        if self.grouped {
            let (g, l) = (c / LANES, c % LANES);
            let gb = g * nb + b;
            put_q4_1x16_nibbles(&mut self.nibbles, gb, l, &nibbles);
            for (e, &v) in u.iter().enumerate() {
                let (unit, t) = (e / 4, e % 4);
                let (chunk, s) = (unit / 4, unit % 4);
                self.highs[gb * 128 + chunk * 64 + 4 * l + t] |= (v >> 4) << (2 * s);
            }
            self.factors[gb * 2 * LANES + l] = sc[0];
            self.factors[gb * 2 * LANES + LANES + l] = sc[1];
            self.scales[(g * nsb + b / SUPER) * LANES + l] = d;
        } else {
            let i = c * nb + b;
            self.nibbles[i * 16..][..16].copy_from_slice(&nibbles);
            for (e, &v) in u.iter().enumerate() {
                self.highs[i * 8 + e % 8] |= (v >> 4) << (2 * (e / 8));
            }
            self.factors[i * 2..][..2].copy_from_slice(&sc);
            self.scales[c * nsb + b / SUPER] = d;
        }
    }

    /// Bytes of memory its weights take.
    pub(super) fn bytes(&self) -> usize {
        self.nibbles.len() + self.highs.len() + self.factors.len() + 4 * self.scales.len()
    }

    /// Whether the buffers fit an n × nb·32 matrix, so the kernels may walk raw pointers.
    pub(super) fn fits(&self, n: usize, nb: usize) -> bool {
        let rows = if self.grouped {
            n.div_ceil(LANES) * LANES
        } else {
            n
        };
        nb.is_multiple_of(SUPER)
            && self.nibbles.len() == rows * nb * 16
            && self.highs.len() == rows * nb * 8
            && self.factors.len() == rows * nb * 2
            && self.scales.len() == rows * nb / SUPER
    }

    /// Block `b` of row `c`: its 6-bit values, super-block scale and factors.
    fn block(&self, nb: usize, c: usize, b: usize) -> ([u8; 32], f32, [i8; 2]) {
        let nsb = nb / SUPER;
        if self.grouped {
            let (g, l) = (c / LANES, c % LANES);
            let gb = g * nb + b;
            let u = std::array::from_fn(|e| {
                let (unit, t) = (e / 4, e % 4);
                let (j, shift) = (unit % 4, 4 * (unit / 4));
                let low = self.nibbles[gb * 256 + j * 64 + 4 * l + t] >> shift & 0x0F;
                let (chunk, s) = (unit / 4, unit % 4);
                let high = self.highs[gb * 128 + chunk * 64 + 4 * l + t] >> (2 * s) & 3;
                low | high << 4
            });
            let sc = [
                self.factors[gb * 2 * LANES + l],
                self.factors[gb * 2 * LANES + LANES + l],
            ];
            (u, self.scales[(g * nsb + b / SUPER) * LANES + l], sc)
        } else {
            let i = c * nb + b;
            let u = std::array::from_fn(|e| {
                let byte = self.nibbles[i * 16 + e % 16];
                let low = if e < 16 { byte & 0x0F } else { byte >> 4 };
                low | (self.highs[i * 8 + e % 8] >> (2 * (e / 8)) & 3) << 4
            });
            let sc = [self.factors[i * 2], self.factors[i * 2 + 1]];
            (u, self.scales[c * nsb + b / SUPER], sc)
        }
    }

    /// Block `b` of row `r` in f32, computed as ggml dequantizes it: (d·sc)·q.
    pub(super) fn block_values(&self, nb: usize, r: usize, b: usize, out: &mut [f32]) {
        let (u, d, sc) = self.block(nb, r, b);
        for (e, o) in out.iter_mut().enumerate() {
            *o = d * sc[e / 16] as f32 * (u[e] as i32 - 32) as f32;
        }
    }

    /// Computes columns `cols` of every row of `x`·Wᵀ into `out` (row stride n).
    ///
    /// # Safety
    /// [`Q6K::fits`] holds for n × x.nb; the CPU has `family`'s features, and the layout
    /// is that family's; no other thread writes these columns; for VNNI `cols` starts on
    /// a group of 16.
    pub(super) unsafe fn run(
        &self,
        family: Family,
        nb: usize,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            match family {
                #[cfg(target_arch = "x86_64")]
                Family::Vnni => super::vnni::run(self, nb, x, cols, n, out),
                #[cfg(target_arch = "x86_64")]
                Family::Avx2 => super::avx2::run(self, x, x.rows, cols, n, out),
                _ => super::portable::run(self, x, cols, n, out),
            }
        }
    }
}

/// Plain Rust: one output at a time, blocks in order, the arithmetic of `q8_halves`'
/// portable kernel.
impl Dot for Q6K {
    fn dot(&self, c: usize, x: &QuantizedRows, r: usize) -> f32 {
        let (w, nb) = (self, x.nb);
        let mut acc = 0f32;
        for b in 0..nb {
            let (u, d, sc) = w.block(nb, c, b);
            let xq = &x.qs[(r * nb + b) * QK..][..QK];
            let half = |h: usize| -> i32 {
                let span = h * 16..h * 16 + 16;
                u[span.clone()]
                    .iter()
                    .zip(&xq[span])
                    .map(|(&u, &x)| (u as i32 - 32) * x as i32)
                    .sum()
            };
            let dx = x.d[r * padded_blocks(nb) + b];
            let (d0, d1) = (d * sc[0] as f32, d * sc[1] as f32);
            acc += half(0) as f32 * (d0 * dx) + half(1) as f32 * (d1 * dx);
        }
        acc
    }
}

/// AVX2 + FMA, tiled and computed as `q8_halves::avx2` once the weights are signed
/// bytes: the 16 nibble bytes widen to 32 values as in Q4_1's kernel; the 8 high-bit
/// bytes are broadcast to four 64-bit lanes, lane p shifted right by 2p so that element
/// 8p + j's two bits sit at the bottom of byte j, then moved up to bits 4 and 5.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod avx2 {
    use super::*;
    use crate::qmatmul::avx2::{add_signed_products, hsum, row_blocks, row_starts, TileAt, Tiles};
    use std::arch::x86_64::*;

    impl Tiles<QuantizedRows> for Q6K {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile<const R: usize, const C: usize>(&self, x: &QuantizedRows, at: TileAt) {
            let (w, nb, TileAt { r0, c0, n, out }) = (self, x.nb, at);
            let nsb = nb / SUPER;
            let low = _mm256_set1_epi8(0x0F);
            let top = _mm256_set1_epi8(0x30);
            let offset = _mm256_set1_epi8(32);
            let quarters = _mm256_setr_epi64x(0, 2, 4, 6);
            // SAFETY (all pointer arithmetic below): rows r0..r0 + R and columns c0..c0 + C
            // exist, and b < nb stays inside each row's blocks.
            let (xq, xd) = unsafe { row_starts::<R>(x, r0) };
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            for b in 0..nb {
                let xv = unsafe { row_blocks(&xq, b) };
                for c in 0..C {
                    let i = (c0 + c) * nb + b;
                    let (raw, high, sc, d) = unsafe {
                        (
                            _mm_loadu_si128(w.nibbles.as_ptr().add(i * 16) as *const __m128i),
                            (w.highs.as_ptr().add(i * 8) as *const i64).read_unaligned(),
                            *(w.factors.as_ptr().add(i * 2) as *const [i8; 2]),
                            *w.scales.get_unchecked((c0 + c) * nsb + b / SUPER),
                        )
                    };
                    let nibbles =
                        _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
                    let highs = _mm256_srlv_epi64(_mm256_set1_epi64x(high), quarters);
                    let highs = _mm256_and_si256(_mm256_slli_epi64(highs, 4), top);
                    let wv = _mm256_sub_epi8(_mm256_or_si256(nibbles, highs), offset);
                    let dw = _mm256_set_m128(
                        _mm_set1_ps(d * sc[1] as f32),
                        _mm_set1_ps(d * sc[0] as f32),
                    );
                    unsafe { add_signed_products(&mut acc, c, (wv, dw), (&xv, &xd), b) };
                }
            }
            for r in 0..R {
                for c in 0..C {
                    // SAFETY: the caller owns columns c0..c0 + C of these rows.
                    unsafe { out.write((r0 + r) * n + c0 + c, hsum(acc[r][c])) }
                }
            }
        }
    }
}

/// AVX-512 VNNI on the grouped layout, as `q8_halves::vnni`: each lane an output column,
/// `vpdpbusd` on four broadcast activation bytes, each half's integer sum starting from
/// −32 times the sum of its 16 activations.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod vnni {
    use super::*;
    use crate::qmatmul::activations::Tile;
    use crate::qmatmul::vnni::{add_half_products, prefetch, GroupBlock, GroupedWeights};
    use std::arch::x86_64::*;

    /// The 16 lanes' 8-bit factors at `p`, as floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn factors16(p: *const i8) -> __m512 {
        // SAFETY: the caller's 16 bytes.
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(unsafe {
            _mm_loadu_si128(p as *const __m128i)
        }))
    }

    /// Unit `s` of a chunk's high bits (see the layout), moved to bits 4 and 5.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn high_bits(chunk: __m512i, s: usize) -> __m512i {
        let at_4 = match s {
            0 => _mm512_slli_epi16(chunk, 4),
            1 => _mm512_slli_epi16(chunk, 2),
            2 => chunk,
            _ => _mm512_srli_epi16(chunk, 2),
        };
        _mm512_and_si512(at_4, _mm512_set1_epi8(0x30))
    }

    impl GroupedWeights for Q6K {
        #[inline(always)]
        fn prefetch(&self, at: GroupBlock) {
            let gb = at.index();
            prefetch(&self.nibbles, gb * 256, 256);
            prefetch(&self.highs, gb * 128, 128);
            prefetch(&self.factors, gb * 2 * LANES, 2 * LANES);
            prefetch(
                &self.scales,
                (at.g * (at.nb / SUPER) + at.b / SUPER) * LANES,
                LANES,
            );
        }

        /// Rebuilds the block's 6-bit values from nibbles and high bits, then multiplies
        /// as `q8_halves::vnni` does, each half's scale d·sc.
        #[inline(always)]
        unsafe fn accumulate<const R: usize>(&self, at: GroupBlock, tile: &mut Tile<__m512, R>) {
            let low = _mm512_set1_epi8(0x0F);
            let gb = at.index();
            let load = |p: *const u8| unsafe { _mm512_loadu_si512(p as *const __m512i) };
            // SAFETY (all pointer arithmetic below): the caller's contract.
            let highs: [__m512i; 2] = std::array::from_fn(|h| {
                load(unsafe { self.highs.as_ptr().add(gb * 128 + h * 64) })
            });
            let mut units = [_mm512_setzero_si512(); 8];
            for j in 0..4 {
                let v = load(unsafe { self.nibbles.as_ptr().add(gb * 256 + j * 64) });
                let lo = _mm512_and_si512(v, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                units[j] = _mm512_or_si512(lo, high_bits(highs[0], j));
                units[j + 4] = _mm512_or_si512(hi, high_bits(highs[1], j));
            }
            let halves = unsafe {
                let at = (at.g * (at.nb / SUPER) + at.b / SUPER) * LANES;
                let d = _mm512_loadu_ps(self.scales.as_ptr().add(at));
                let f = self.factors.as_ptr().add(gb * 2 * LANES);
                (
                    _mm512_mul_ps(d, factors16(f)),
                    _mm512_mul_ps(d, factors16(f.add(LANES))),
                )
            };
            // SAFETY: the caller's contract.
            unsafe { add_half_products::<R, 32>(tile, &units, at.b, halves) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatmul::test_support::{families, ggml_values, noise, product, qtensor};
    use crate::qmatmul::{Linear, Storage};
    use candle_core::quantized::GgmlDType;

    /// In every family this CPU runs, the 6-bit form holds ggml's weights and computes
    /// exactly what the widened 8-bit form computes from the same blocks, in 6.625 bits a
    /// weight instead of 11.
    #[test]
    fn six_bit_q6_k_equals_the_widened_form_bit_for_bit() {
        // A partial last group of 16 rows; 3 super-blocks; a tile of 8 rows and one of 3.
        let (n, k, rows) = (37, 768, 11);
        let t = qtensor(GgmlDType::Q6K, n, k, 1);
        let ggml = ggml_values(&t);
        let bytes = t.data().unwrap();
        let row_bytes = k / 256 * 210;
        let x = noise(rows * k, 2);
        for family in families() {
            let six = Linear::from_qtensor_for("w", &t, family).unwrap();
            assert!(matches!(six.storage, Storage::Q6K(_)), "{family:?}");
            let wide = Linear {
                n,
                k,
                storage: crate::qmatmul::q8_halves::storage(
                    n,
                    k,
                    |c, b| q6_k(&bytes[c * row_bytes..][..row_bytes], b),
                    family,
                ),
            };
            let padded = if family == Family::Vnni {
                n.next_multiple_of(LANES)
            } else {
                n
            };
            assert_eq!(six.bytes(), padded * k / 256 * 212, "{family:?}");
            let Storage::F32(values) = six.dequantized().storage else {
                unreachable!("dequantized matrices are f32")
            };
            assert_eq!(values, ggml, "{family:?}");
            assert_eq!(
                product(family, &six, &x, rows),
                product(family, &wide, &x, rows),
                "{family:?}"
            );
        }
    }
}
