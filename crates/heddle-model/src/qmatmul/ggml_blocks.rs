//! ggml's block formats, decoded into the two forms heddle's kernels multiply — blocks of
//! 32 weights, like the activation blocks they meet — without changing a single weight:
//!
//! - [`Nibbles`], Q4_1's form (w = d·q + m, q in 0..16), holds Q4_1, Q4_0 and Q4_K;
//! - [`Bytes`], w = d[e / 16]·q + m with q a signed byte, holds Q5_0, Q5_1, Q5_K and Q6_K
//!   (Q6_K scales every 16 weights, hence a scale per half-block).
//!
//! The K-quants group 8 (or 16) such blocks in a super-block of 256 whose f16 scale
//! multiplies a 6- or 8-bit scale per block. That product has at most 11 + 8 significant
//! bits, so it is exact in f32, and `d·q + m` below rounds exactly where ggml's
//! dequantization rounds: every weight decodes to ggml's value bit for bit (the tests
//! check it against candle's dequantization).

use candle_core::quantized::GgmlDType;
use half::f16;

/// A block of 32 weights w = d·q + m with 4-bit q; byte j holds element j in its low
/// nibble and element j + 16 in its high one (ggml's Q4_0/Q4_1 layout).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Nibbles {
    pub d: f32,
    pub m: f32,
    pub qs: [u8; 16],
}

/// A block of 32 weights w = d[e / 16]·q[e] + m with signed 8-bit q.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Bytes {
    pub d: [f32; 2],
    pub m: f32,
    pub qs: [i8; 32],
}

#[cfg(test)]
impl Nibbles {
    /// Weight `e` (0..32) in f32, as ggml dequantizes it.
    pub fn value(&self, e: usize) -> f32 {
        let q = if e < 16 {
            self.qs[e] & 0x0F
        } else {
            self.qs[e - 16] >> 4
        };
        self.d * q as f32 + self.m
    }
}

#[cfg(test)]
impl Bytes {
    /// Weight `e` (0..32) in f32, as ggml dequantizes it.
    pub fn value(&self, e: usize) -> f32 {
        self.d[e / 16] * self.qs[e] as f32 + self.m
    }
}

/// How to take block `b` (of 32 weights) out of one row's bytes in a ggml format.
#[derive(Clone, Copy)]
pub(super) enum Decoder {
    Nibbles(fn(&[u8], usize) -> Nibbles),
    Bytes(fn(&[u8], usize) -> Bytes),
}

/// The decoder of a ggml type that one of heddle's kernels multiplies natively
/// (Q8_0 is read by its own path; other types have none).
pub(super) fn decoder(dtype: GgmlDType) -> Option<Decoder> {
    Some(match dtype {
        GgmlDType::Q4_0 => Decoder::Nibbles(q4_0),
        GgmlDType::Q4_1 => Decoder::Nibbles(q4_1),
        GgmlDType::Q4K => Decoder::Nibbles(q4_k),
        GgmlDType::Q5_0 => Decoder::Bytes(q5_0),
        GgmlDType::Q5_1 => Decoder::Bytes(q5_1),
        GgmlDType::Q5K => Decoder::Bytes(q5_k),
        GgmlDType::Q6K => Decoder::Bytes(q6_k),
        _ => return None,
    })
}

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q4_0: f16 d, 16 bytes of nibbles; w = d·(q − 8). As Q4_1 with m = −8d: d·q and 8d
/// are exact, and so is their difference (d·(q − 8) fits in 15 bits).
fn q4_0(row: &[u8], b: usize) -> Nibbles {
    let block = &row[b * 18..][..18];
    let d = half(block, 0);
    Nibbles {
        d,
        m: -8.0 * d,
        qs: block[2..18].try_into().unwrap(),
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of nibbles; w = d·q + m.
fn q4_1(row: &[u8], b: usize) -> Nibbles {
    let block = &row[b * 20..][..20];
    Nibbles {
        d: half(block, 0),
        m: half(block, 2),
        qs: block[4..20].try_into().unwrap(),
    }
}

/// The 6-bit scale and minimum of block `j` (0..8) of a Q4_K/Q5_K super-block, packed
/// in 12 bytes: blocks 0..4 in the low 6 bits of bytes 0..4 and 4..8, blocks 4..8 split
/// between the nibbles of bytes 8..12 and the top 2 bits of bytes 0..8.
fn k_scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

/// The scales of block `b` of a Q4_K row, unmultiplied: the super-block's f16 scale and
/// minimum scale, and the block's 6-bit factors of each (w = d·sc·q − dmin·mn).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct KScales {
    pub d: f32,
    pub dmin: f32,
    pub sc: u8,
    pub mn: u8,
}

pub(super) fn q4_k_scales(row: &[u8], b: usize) -> KScales {
    let sb = &row[(b / 8) * 144..][..144];
    let (sc, mn) = k_scale_min(b % 8, &sb[4..16]);
    KScales {
        d: half(sb, 0),
        dmin: half(sb, 2),
        sc,
        mn,
    }
}

/// Q4_K: super-blocks of 256 (144 bytes: f16 d, f16 dmin, 12 bytes of packed 6-bit
/// scales and minimums, 128 bytes of nibbles); block j's weights are
/// d·sc_j·q − dmin·m_j. Blocks 2i and 2i + 1 share 32 bytes: low nibbles, then high.
pub(super) fn q4_k(row: &[u8], b: usize) -> Nibbles {
    let sb = &row[(b / 8) * 144..][..144];
    let j = b % 8;
    let scales = q4_k_scales(row, b);
    let shift = 4 * (j % 2);
    let src = &sb[16 + 32 * (j / 2)..][..32];
    let q = |e: usize| (src[e] >> shift) & 0x0F;
    Nibbles {
        d: scales.d * scales.sc as f32,
        m: -(scales.dmin * scales.mn as f32),
        qs: std::array::from_fn(|i| q(i) | (q(i + 16) << 4)),
    }
}

/// Q5_0 and Q5_1 share their 5-bit layout: 4 bytes of fifth bits (element e's is bit e)
/// after the scales, then 16 bytes of nibbles as in Q4_0.
fn five_bit_values(qh: &[u8], qs: &[u8], offset: i32) -> [i8; 32] {
    let high = u32::from_le_bytes(qh.try_into().unwrap());
    std::array::from_fn(|e| {
        let low = if e < 16 {
            qs[e] & 0x0F
        } else {
            qs[e - 16] >> 4
        };
        let fifth = ((high >> e) & 1) as u8;
        ((low | (fifth << 4)) as i32 - offset) as i8
    })
}

/// Q5_0: f16 d, 4 bytes of fifth bits, 16 bytes of nibbles; w = d·(q − 16).
fn q5_0(row: &[u8], b: usize) -> Bytes {
    let block = &row[b * 22..][..22];
    let d = half(block, 0);
    Bytes {
        d: [d, d],
        m: 0.0,
        qs: five_bit_values(&block[2..6], &block[6..22], 16),
    }
}

/// Q5_1: f16 d, f16 m, 4 bytes of fifth bits, 16 bytes of nibbles; w = d·q + m.
fn q5_1(row: &[u8], b: usize) -> Bytes {
    let block = &row[b * 24..][..24];
    let d = half(block, 0);
    Bytes {
        d: [d, d],
        m: half(block, 2),
        qs: five_bit_values(&block[4..8], &block[8..24], 0),
    }
}

/// Q5_K: super-blocks of 256 (176 bytes: f16 d, f16 dmin, 12 bytes of scales and
/// minimums as in Q4_K, 32 bytes of fifth bits, 128 bytes of nibbles as in Q4_K); the
/// fifth bit of element l of block j is bit j of byte l.
fn q5_k(row: &[u8], b: usize) -> Bytes {
    let sb = &row[(b / 8) * 176..][..176];
    let j = b % 8;
    let (sc, mn) = k_scale_min(j, &sb[4..16]);
    let qh = &sb[16..48];
    let nibbles = &sb[48 + 32 * (j / 2)..][..32];
    let shift = 4 * (j % 2);
    let d = half(sb, 0) * sc as f32;
    Bytes {
        d: [d, d],
        m: -(half(sb, 2) * mn as f32),
        qs: std::array::from_fn(|l| {
            let low = (nibbles[l] >> shift) & 0x0F;
            let fifth = (qh[l] >> j) & 1;
            (low | (fifth << 4)) as i8
        }),
    }
}

/// Q6_K: super-blocks of 256 (210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit
/// high parts, 16 signed 8-bit scales, f16 d); w = d·sc·(q − 32) with a scale per 16
/// weights. Each half of the super-block (128 weights) interleaves four blocks of 32:
/// block i takes low nibbles from bytes 32·(i mod 2).. (the high nibbles for i ≥ 2) and
/// bits 2i, 2i + 1 of the same 32 high-part bytes.
pub(super) fn q6_k(row: &[u8], b: usize) -> Bytes {
    let sb = &row[(b / 8) * 210..][..210];
    let (half_sb, i) = ((b % 8) / 4, b % 4);
    let low = &sb[64 * half_sb + 32 * (i % 2)..][..32];
    let high = &sb[128 + 32 * half_sb..][..32];
    let low_shift = 4 * (i / 2);
    let (d, sc) = q6_k_factors(row, b);
    Bytes {
        d: [d * sc[0] as f32, d * sc[1] as f32],
        m: 0.0,
        qs: std::array::from_fn(|l| {
            let q = ((low[l] >> low_shift) & 0x0F) | (((high[l] >> (2 * i)) & 3) << 4);
            (q as i32 - 32) as i8
        }),
    }
}

/// Block `b` of a Q6_K row's factors: the super-block's f16 scale, and the signed 8-bit
/// scales of the block's two halves of 16; [`q6_k`]'s d[h] is their product.
pub(super) fn q6_k_factors(row: &[u8], b: usize) -> (f32, [i8; 2]) {
    let sb = &row[(b / 8) * 210..][..210];
    let (half_sb, i) = ((b % 8) / 4, b % 4);
    let scale = |h: usize| sb[192 + 8 * half_sb + 2 * i + h] as i8;
    (half(sb, 208), [scale(0), scale(1)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmatmul::test_support::{ggml_values, DECODED_DTYPES};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every decoded weight equals candle's dequantization of the same ggml bytes, bit
    /// for bit, for values spread over rows of very different magnitudes.
    #[test]
    fn decoded_blocks_equal_ggml_dequantization() {
        let (rows, k) = (6usize, 512usize);
        let values: Vec<f32> = (0..rows * k)
            .map(|i| {
                let u = ((i as u64 * 2654435761) % 10007) as f32 / 10007.0 - 0.45;
                u * (0.01 + (i / k) as f32 * 0.7) + if i % 97 == 0 { 3.0 } else { 0.0 }
            })
            .collect();
        let tensor = Tensor::from_vec(values, (rows, k), &Device::Cpu).unwrap();
        for dtype in DECODED_DTYPES {
            let q = QTensor::quantize(&tensor, dtype).unwrap();
            let want = ggml_values(&q);
            let data = q.data().unwrap();
            let row_bytes = k / dtype.block_size() * dtype.type_size();
            let decode = decoder(dtype).unwrap();
            for r in 0..rows {
                let row = &data[r * row_bytes..][..row_bytes];
                for b in 0..k / 32 {
                    for e in 0..32 {
                        let got = match decode {
                            Decoder::Nibbles(f) => f(row, b).value(e),
                            Decoder::Bytes(f) => f(row, b).value(e),
                        };
                        let at = r * k + b * 32 + e;
                        // Equal as numbers (±0 alike), so no rounding may differ.
                        assert!(
                            got == want[at],
                            "{dtype:?} row {r} block {b} element {e}: {got} vs {}",
                            want[at]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn only_types_with_a_kernel_have_a_decoder() {
        for dtype in [
            GgmlDType::F32,
            GgmlDType::F16,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
        ] {
            assert!(decoder(dtype).is_none(), "{dtype:?}");
        }
    }
}
