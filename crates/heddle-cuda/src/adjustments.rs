//! A step's logit biases and grammar masks, packed for the sampler kernel.
//!
//! The masks are computed on the host while the forward pass runs (see the engine's
//! `sequence_logits`); once they are ready, the runner packs them into one buffer of i32
//! words, copies it on the step's stream right behind the forward pass, and the sampler
//! applies each row's record before drawing. The copy is ordered by the stream, so the
//! step waits for nothing more than it did without masks.
//!
//! Layout (`ADJ_*` in kernels.cu): `words[row]` for each sampled row is the offset of
//! the row's record, or -1 when the row is sampled as is. A record is
//! `[mask words, bias count, mask…, (token, bias bits, 0)…]`; the sampler overwrites each
//! bias's last word with the raw logit, so that log-probabilities stay the model's.

use heddle_model::logits_processing::StepAdjustments;

use crate::plan::SampledRow;

/// Words of a record before its mask.
const RECORD_HEADER: usize = 2;
/// Words per logit bias.
const BIAS_WORDS: usize = 3;

/// Packs the adjustments of `rows` (a step's sampled rows, in order) into `words`.
/// Returns whether any row has one.
pub fn pack(rows: &[SampledRow], adjustments: &StepAdjustments, words: &mut Vec<i32>) -> bool {
    words.clear();
    words.resize(rows.len(), -1);
    let mut any = false;
    for (i, row) in rows.iter().enumerate() {
        let Some(adjustment) = adjustments.get(&row.id) else {
            continue;
        };
        let mask = adjustment.mask.as_ref().map_or(&[][..], |m| m.words());
        if mask.is_empty() && adjustment.bias.is_empty() {
            continue;
        }
        any = true;
        words[i] = words.len() as i32;
        words.reserve(RECORD_HEADER + mask.len() + BIAS_WORDS * adjustment.bias.len());
        words.extend([mask.len() as i32, adjustment.bias.len() as i32]);
        words.extend(mask.iter().map(|&w| w as i32));
        for &(token, bias) in adjustment.bias.iter() {
            words.extend([token as i32, bias.to_bits() as i32, 0]);
        }
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;
    use heddle_model::logits_processing::LogitsAdjustment;

    fn row(id: u64) -> SampledRow {
        SampledRow {
            id,
            logprob: false,
            top_logprobs: 0,
        }
    }

    #[test]
    fn rows_without_adjustments_point_nowhere_and_biases_follow_the_header() {
        let mut adjustments = StepAdjustments::new();
        adjustments.insert(
            2,
            LogitsAdjustment {
                bias: vec![(5, -100.0), (9, 2.5)].into(),
                mask: None,
            },
        );
        adjustments.insert(3, LogitsAdjustment::default());
        let mut words = Vec::new();
        assert!(pack(&[row(1), row(2), row(3)], &adjustments, &mut words));
        assert_eq!(&words[..3], &[-1, 3, -1]);
        let record = &words[3..];
        assert_eq!(record[..RECORD_HEADER], [0, 2]);
        assert_eq!(
            record[RECORD_HEADER..],
            [
                5,
                (-100f32).to_bits() as i32,
                0,
                9,
                2.5f32.to_bits() as i32,
                0
            ]
        );
        assert_eq!(record.len(), RECORD_HEADER + 2 * BIAS_WORDS);
    }

    #[test]
    fn a_step_with_nothing_to_change_packs_only_the_header() {
        let mut words = vec![7; 10];
        assert!(!pack(
            &[row(1), row(2)],
            &StepAdjustments::new(),
            &mut words
        ));
        assert_eq!(words, [-1, -1]);
    }
}
