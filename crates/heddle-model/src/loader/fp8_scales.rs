//! Checkpoints that store their projections as FP8 E4M3 codes with scales beside them
//! (`quantization_config` with `quant_method: "fp8"`, as vLLM's and DeepSeek's FP8
//! checkpoints write it, or `"compressed-tensors"` in its `float-quantized` format): a
//! weight's value is its code times its scale. The scale tensor sits beside the weight
//! (`….weight_scale`, or `….weight_scale_inv` for block scales, which despite the name
//! multiplies too) and holds one scale, one per output row, or one per block of rows ×
//! columns. Activation scales (`input_scale`) are not read: heddle computes each step's
//! activation scale itself (at least as fine as a static one).

use crate::error::{ModelError, Result};

/// The names a weight's scale tensor may have, most common first.
pub fn scale_names(weight: &str) -> [String; 2] {
    [format!("{weight}_scale"), format!("{weight}_scale_inv")]
}

/// Multiplies the decoded codes of the weight `name` [n, k] (row-major `values`) by their
/// scales: `scales` of shape `scale_shape`, which is [] or [1] (one scale), [n] or [n, 1]
/// (one per output row), or [⌈n/bn⌉, ⌈k/bk⌉] (one per block of bn × bk; the block's size
/// follows from the shapes).
pub fn apply_scales(
    name: &str,
    values: &mut [f32],
    n: usize,
    k: usize,
    scales: &[f32],
    scale_shape: &[usize],
) -> Result<()> {
    let bad = || {
        ModelError::Config(format!(
            "{name}: an FP8 weight [{n}, {k}] with a scale of shape {scale_shape:?} (one \
             scale, one per output row, or one per block are read)"
        ))
    };
    if values.len() != n * k || scales.len() != scale_shape.iter().product::<usize>() {
        return Err(bad());
    }
    match *scale_shape {
        [] | [1] | [1, 1] => values.iter_mut().for_each(|v| *v *= scales[0]),
        [rows] | [rows, 1] if rows == n => {
            for (row, &scale) in values.chunks_mut(k).zip(scales) {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        [block_rows, block_cols] if block_rows > 0 && block_cols > 0 => {
            let (bn, bk) = (n.div_ceil(block_rows), k.div_ceil(block_cols));
            if n.div_ceil(bn) != block_rows || k.div_ceil(bk) != block_cols {
                return Err(bad());
            }
            for (r, row) in values.chunks_mut(k).enumerate() {
                let scale_row = &scales[(r / bn) * block_cols..][..block_cols];
                for (c, v) in row.iter_mut().enumerate() {
                    *v *= scale_row[c / bk];
                }
            }
        }
        _ => return Err(bad()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_scale_row_scales_and_block_scales_multiply_the_codes() {
        let codes: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut one = codes.clone();
        apply_scales("w", &mut one, 3, 4, &[0.5], &[]).unwrap();
        assert_eq!(one[5], 2.5);
        let mut rows = codes.clone();
        apply_scales("w", &mut rows, 3, 4, &[1.0, 2.0, 3.0], &[3, 1]).unwrap();
        assert_eq!((rows[3], rows[4], rows[11]), (3.0, 8.0, 33.0));
        // Blocks of 2 × 2 over a 3 × 4 weight: 2 × 2 scales, the last block row partial.
        let mut blocks = codes.clone();
        apply_scales("w", &mut blocks, 3, 4, &[1.0, 10.0, 100.0, 1000.0], &[2, 2]).unwrap();
        assert_eq!(
            blocks,
            vec![0., 1., 20., 30., 4., 5., 60., 70., 800., 900., 10000., 11000.]
        );
    }

    #[test]
    fn a_scale_that_fits_no_layout_is_refused() {
        let mut values = vec![1.0; 12];
        let err = apply_scales("w", &mut values, 3, 4, &[1.0, 2.0], &[2]).unwrap_err();
        assert!(err.to_string().contains("w: an FP8 weight [3, 4]"), "{err}");
        // 5 block rows cannot cover 3 rows.
        let err = apply_scales("w", &mut values, 3, 4, &[1.0; 10], &[5, 2]).unwrap_err();
        assert!(err.to_string().contains("shape [5, 2]"), "{err}");
    }

    #[test]
    fn scale_tensors_sit_beside_their_weight() {
        assert_eq!(
            scale_names("model.layers.0.mlp.down_proj.weight"),
            [
                "model.layers.0.mlp.down_proj.weight_scale".to_string(),
                "model.layers.0.mlp.down_proj.weight_scale_inv".to_string()
            ]
        );
    }
}
