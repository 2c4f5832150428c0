//! Inputs shared by the matmul tests.

use candle_core::quantized::{GgmlDType, QTensor};

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

pub(crate) fn qtensor(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> QTensor {
    let w = noise(n * k, seed);
    let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}
