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

use super::ggml_blocks::{q4_k, q4_k_scales};
use super::{put_q4_1x16_nibbles, Storage, LANES, QK};

/// Blocks of 32 per super-block of 256.
const SUPER: usize = 8;

/// The storage of the n × k Q4_K matrix whose rows are `row_bytes` long in `bytes`.
pub(super) fn vnni_storage(n: usize, k: usize, bytes: &[u8], row_bytes: usize) -> Storage {
    let nb = k / QK;
    let nsb = nb / SUPER;
    let groups = n.div_ceil(LANES);
    let mut qs = vec![0u8; groups * nb * 256];
    let mut factors = vec![0u8; groups * nb * 2 * LANES];
    let mut scales = vec![0f32; groups * nsb * 2 * LANES];
    for c in 0..n {
        let (g, l) = (c / LANES, c % LANES);
        let row = &bytes[c * row_bytes..][..row_bytes];
        for b in 0..nb {
            let gb = g * nb + b;
            put_q4_1x16_nibbles(&mut qs, gb, l, &q4_k(row, b).qs);
            let s = q4_k_scales(row, b);
            factors[gb * 2 * LANES + l] = s.sc;
            factors[gb * 2 * LANES + LANES + l] = s.mn;
            let at = (g * nsb + b / SUPER) * 2 * LANES;
            scales[at + l] = s.d;
            scales[at + LANES + l] = -s.dmin;
        }
    }
    Storage::Q4Kx16 {
        qs,
        factors,
        scales,
    }
}

/// The sizes a Q4Kx16 storage of n × nb blocks has.
pub(super) fn check_sizes(storage: &Storage, n: usize, nb: usize) -> bool {
    let Storage::Q4Kx16 {
        qs,
        factors,
        scales,
    } = storage
    else {
        return false;
    };
    let groups = n.div_ceil(LANES);
    nb.is_multiple_of(SUPER)
        && qs.len() == groups * nb * 256
        && factors.len() == groups * nb * 2 * LANES
        && scales.len() == groups * (nb / SUPER) * 2 * LANES
}

/// Block `b` of row `r` in f32, computed as ggml dequantizes it.
pub(super) fn block_values(storage: &Storage, nb: usize, r: usize, b: usize, out: &mut [f32]) {
    let Storage::Q4Kx16 {
        qs,
        factors,
        scales,
    } = storage
    else {
        unreachable!("not a Q4Kx16 storage")
    };
    let (g, l) = (r / LANES, r % LANES);
    let gb = g * nb + b;
    let at = (g * (nb / SUPER) + b / SUPER) * 2 * LANES;
    let d = scales[at + l] * factors[gb * 2 * LANES + l] as f32;
    let m = scales[at + LANES + l] * factors[gb * 2 * LANES + LANES + l] as f32;
    for (e, o) in out.iter_mut().enumerate() {
        let (j, shift) = if e < 16 {
            (e / 4, 0)
        } else {
            ((e - 16) / 4, 4)
        };
        let q = qs[gb * 256 + j * 64 + 4 * l + e % 4] >> shift & 0x0F;
        *o = d * q as f32 + m;
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
pub(super) mod vnni {
    use super::*;
    use crate::qmatmul::vnni::{block_dot, prefetch, store, RowPtrs, PREFETCH_GROUPS_AHEAD, ROWS};
    use crate::qmatmul::{OutPtr, QuantizedRows};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// The 16 lanes' factors at `p`, as floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn factors16(p: *const u8) -> __m512 {
        // SAFETY: the caller's 16 bytes.
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(unsafe {
            _mm_loadu_si128(p as *const __m128i)
        }))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        qs: &[u8],
        factors: &[u8],
        scales: &[f32],
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
            prefetch(factors, ahead * 2 * LANES, 2 * LANES);
            let ahead_super = ((g + PREFETCH_GROUPS_AHEAD) * (nb / SUPER) + b / SUPER) * 2 * LANES;
            prefetch(scales, ahead_super, 2 * LANES);
            let mut units = [_mm512_setzero_si512(); 8];
            for j in 0..4 {
                let v = unsafe {
                    _mm512_loadu_si512(qs.as_ptr().add(gb * 256 + j * 64) as *const __m512i)
                };
                units[j] = _mm512_and_si512(v, low);
                units[j + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            let at = (g * (nb / SUPER) + b / SUPER) * 2 * LANES;
            let (dw, mw) = unsafe {
                let f = factors.as_ptr().add(gb * 2 * LANES);
                (
                    _mm512_mul_ps(_mm512_loadu_ps(scales.as_ptr().add(at)), factors16(f)),
                    _mm512_mul_ps(
                        _mm512_loadu_ps(scales.as_ptr().add(at + LANES)),
                        factors16(f.add(LANES)),
                    ),
                )
            };
            for r in 0..R {
                let sum =
                    unsafe { block_dot(&units, rows.qs[r].add(b * 8), _mm512_setzero_si512()) };
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

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and VNNI; the buffers hold the Q4Kx16 layout of an
    /// n × nb·32 matrix ([`check_sizes`]); `cols` starts on a group; no other thread
    /// writes those columns.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::qmatmul) unsafe fn run(
        qs: &[u8],
        factors: &[u8],
        scales: &[f32],
        nb: usize,
        x: &QuantizedRows,
        cols: Range<usize>,
        n: usize,
        out: OutPtr,
    ) {
        unsafe {
            groups_and_rows!(
                tile,
                x.rows,
                cols,
                |r, g| qs,
                factors,
                scales,
                nb,
                x,
                r,
                g,
                n,
                out
            )
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::qmatmul::{best_family, forward_all_with, Family, Input, Linear, QuantizedRows};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// On a VNNI CPU, the compact layout computes exactly what Q4_1x16 computes from the
    /// same decoded blocks, in 4.75 bits a weight instead of 6.
    #[test]
    fn compact_q4_k_equals_q4_1x16_bit_for_bit() {
        if best_family() != Family::Vnni {
            return;
        }
        let (n, k, rows) = (37, 768, 5);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let t = QTensor::quantize(
            &Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(),
            GgmlDType::Q4K,
        )
        .unwrap();
        let compact = Linear::from_qtensor_for("w", &t, Family::Vnni).unwrap();
        assert!(matches!(compact.storage, Storage::Q4Kx16 { .. }));
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

        let x: Vec<f32> = (0..rows * k)
            .map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0)
            .collect();
        let mut q = QuantizedRows::default();
        q.quantize(&x, rows);
        let input = Input {
            x: &x,
            rows,
            q: Some(&q),
        };
        let run = |lin: &Linear| {
            let mut out = vec![0f32; rows * n];
            forward_all_with(Family::Vnni, &mut [(lin, &mut out)], &input);
            out
        };
        assert_eq!(run(&compact), run(&wide));
        let mut a = vec![0f32; k];
        let mut b = vec![0f32; k];
        for r in 0..n {
            compact.row(r, &mut a);
            wide.row(r, &mut b);
            assert_eq!(a, b, "row {r}");
        }
    }
}
