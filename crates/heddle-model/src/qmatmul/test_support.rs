//! Inputs and runs shared by the matmul tests.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use super::{best_family, forward_all_with, Family, Input, Linear, QuantizedRows};

/// The GGUF types decoded into the kernels' block forms ([`super::ggml_blocks`]).
pub(crate) const DECODED_DTYPES: [GgmlDType; 7] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q4K,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// A deterministic pseudo-random sequence in [-1, 1).
pub(crate) fn noise(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// An n × k matrix of noise quantized to `dtype`.
pub(crate) fn qtensor(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> QTensor {
    let w = noise(n * k, seed);
    let t = candle_core::Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

/// The weights of `t` as candle (ggml) dequantizes them.
pub(crate) fn ggml_values(t: &QTensor) -> Vec<f32> {
    let values = t.dequantize(&Device::Cpu).unwrap();
    values.flatten_all().unwrap().to_vec1().unwrap()
}

/// Every kernel family this CPU runs, the portable one first.
pub(crate) fn families() -> Vec<Family> {
    let best = best_family();
    let mut families = vec![Family::Portable];
    if best != Family::Portable {
        families.push(Family::Avx2);
    }
    if best == Family::Vnni {
        families.push(Family::Vnni);
    }
    families
}

/// The `rows` rows of `x` times `w`ᵀ, with the kernels of `family`.
pub(crate) fn product(family: Family, w: &Linear, x: &[f32], rows: usize) -> Vec<f32> {
    let mut q = QuantizedRows::default();
    q.quantize(x, rows);
    let mut out = vec![0f32; rows * w.out_features()];
    forward_all_with(family, &mut [(w, &mut out)], &Input::new(x, rows, Some(&q)));
    out
}
