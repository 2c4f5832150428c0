//! Rotary position embeddings: each pair of a head's dimensions turns by an angle
//! proportional to the token's position. [`rope_frequencies`] is shared with the CUDA
//! runner, so both rotate by the same angles.

use crate::config::{ModelConfig, RopeScaling};
use crate::loader::RopeLayout;

/// A model's rotation: the frequency of each rotated pair and which dimensions pair up.
pub(crate) struct Rope {
    layout: RopeLayout,
    head_dim: usize,
    /// Frequency of each rotated pair, scaling applied.
    inv_freq: Vec<f64>,
}

impl Rope {
    /// `freq_factors`: per-pair divisors of the frequencies (llama.cpp's form of Llama
    /// 3.1's scaling), when the model has them.
    pub(crate) fn new(
        config: &ModelConfig,
        layout: RopeLayout,
        freq_factors: Option<&[f32]>,
    ) -> Self {
        Rope {
            layout,
            head_dim: config.head_dim,
            inv_freq: rope_frequencies(config, freq_factors),
        }
    }

    /// cos then sin of each position's angles into `table`: `[positions, head_dim]`.
    pub(crate) fn angles(&self, positions: &[usize], table: &mut Vec<f32>) {
        let hd = self.head_dim;
        table.resize(positions.len() * hd, 0.0);
        let half = hd / 2;
        for (cs, &pos) in table.chunks_exact_mut(hd).zip(positions) {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let (sin, cos) = (pos as f64 * f).sin_cos();
                cs[i] = cos as f32;
                cs[half + i] = sin as f32;
            }
        }
    }

    /// Rotates each of the `heads` heads of each token row of `x` by its position's
    /// angles (a row of [`Self::angles`]'s table).
    pub(crate) fn rotate(&self, x: &mut [f32], heads: usize, rope: &[f32]) {
        let hd = self.head_dim;
        let half = hd / 2;
        for (row, cs) in x.chunks_exact_mut(heads * hd).zip(rope.chunks_exact(hd)) {
            let (cos, sin) = cs.split_at(half);
            for head in row.chunks_exact_mut(hd) {
                match self.layout {
                    RopeLayout::Interleaved => {
                        for i in 0..half {
                            let (a, b) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = a * cos[i] - b * sin[i];
                            head[2 * i + 1] = a * sin[i] + b * cos[i];
                        }
                    }
                    RopeLayout::Halves => {
                        for i in 0..half {
                            let (a, b) = (head[i], head[i + half]);
                            head[i] = a * cos[i] - b * sin[i];
                            head[i + half] = a * sin[i] + b * cos[i];
                        }
                    }
                }
            }
        }
    }
}

/// Each rotated pair's frequency, theta^(-2i/d), with the model's scaling applied.
pub fn rope_frequencies(c: &ModelConfig, freq_factors: Option<&[f32]>) -> Vec<f64> {
    let d = c.head_dim as f64;
    (0..c.head_dim / 2)
        .map(|i| {
            let mut f = (c.rope_theta as f64).powf(-2.0 * i as f64 / d);
            match c.rope_scaling {
                None => {}
                Some(RopeScaling::Linear { factor }) => f /= factor as f64,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => {
                    let (factor, low, high) = (
                        factor as f64,
                        low_freq_factor as f64,
                        high_freq_factor as f64,
                    );
                    let old = original_max_position_embeddings as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > old / low {
                        f /= factor;
                    } else if wavelen >= old / high {
                        let smooth = (old / wavelen - low) / (high - low);
                        f = (1.0 - smooth) * f / factor + smooth * f;
                    }
                }
            }
            if let Some(factors) = freq_factors {
                f /= factors[i] as f64;
            }
            f
        })
        .collect()
}
