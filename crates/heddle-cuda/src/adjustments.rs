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

use heddle_core::TokenId;
use heddle_model::logits_processing::StepAdjustments;

use crate::plan::SampledRow;

/// Words of a record before its mask.
const RECORD_HEADER: usize = 2;
/// Words per logit bias.
const BIAS_WORDS: usize = 3;

/// A row's mask words and biases.
struct Record<'a> {
    mask: &'a [u32],
    bias: &'a [(TokenId, f32)],
}

impl<'a> Record<'a> {
    /// The record of `row`, when it has a mask or biases.
    fn of(adjustments: &'a StepAdjustments, row: &SampledRow) -> Option<Self> {
        let adjustment = adjustments.get(&row.id)?;
        let mask = adjustment.mask.as_ref().map_or(&[][..], |m| m.words());
        let bias = &adjustment.bias[..];
        (!mask.is_empty() || !bias.is_empty()).then_some(Record { mask, bias })
    }

    fn len(&self) -> usize {
        RECORD_HEADER + self.mask.len() + BIAS_WORDS * self.bias.len()
    }
}

/// How many words [`pack`] writes for `rows`.
pub fn packed_len(rows: &[SampledRow], adjustments: &StepAdjustments) -> usize {
    rows.len()
        + rows
            .iter()
            .filter_map(|row| Record::of(adjustments, row))
            .map(|record| record.len())
            .sum::<usize>()
}

/// Packs the adjustments of `rows` (a step's sampled rows, in order) into `words`, which
/// is [`packed_len`] long: written in place, so that the runner packs straight into the
/// page-locked memory the copy starts from.
pub fn pack(rows: &[SampledRow], adjustments: &StepAdjustments, words: &mut [i32]) {
    let (offsets, mut records) = words.split_at_mut(rows.len());
    let mut next = rows.len();
    for (offset, row) in offsets.iter_mut().zip(rows) {
        let Some(Record { mask, bias }) = Record::of(adjustments, row) else {
            *offset = -1;
            continue;
        };
        *offset = next as i32;
        let len = RECORD_HEADER + mask.len() + BIAS_WORDS * bias.len();
        let (record, rest) = std::mem::take(&mut records).split_at_mut(len);
        records = rest;
        next += len;
        record[0] = mask.len() as i32;
        record[1] = bias.len() as i32;
        let (mask_words, bias_words) = record[RECORD_HEADER..].split_at_mut(mask.len());
        for (word, &bits) in mask_words.iter_mut().zip(mask) {
            *word = bits as i32;
        }
        for (entry, &(token, value)) in bias_words.chunks_exact_mut(BIAS_WORDS).zip(bias) {
            entry.copy_from_slice(&[token as i32, value.to_bits() as i32, 0]);
        }
    }
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
        let rows = [row(1), row(2), row(3)];
        let mut words = vec![7; packed_len(&rows, &adjustments)];
        pack(&rows, &adjustments, &mut words);
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
    fn masks_are_packed_word_for_word_and_records_follow_each_other() {
        use heddle_model::grammar::TokenMask;
        let mask = TokenMask::allowing(70, &[0, 33, 69]);
        let mut adjustments = StepAdjustments::new();
        adjustments.insert(
            1,
            LogitsAdjustment {
                bias: Vec::new().into(),
                mask: Some(mask.clone()),
            },
        );
        adjustments.insert(
            2,
            LogitsAdjustment {
                bias: vec![(4, 1.5)].into(),
                mask: Some(mask.clone()),
            },
        );
        let rows = [row(1), row(2)];
        let mut words = vec![7; packed_len(&rows, &adjustments)];
        pack(&rows, &adjustments, &mut words);
        let mask_words: Vec<i32> = mask.words().iter().map(|&w| w as i32).collect();
        assert_eq!(mask_words.len(), 3);
        let first = 2;
        let second = first + RECORD_HEADER + mask_words.len();
        assert_eq!(&words[..2], &[first as i32, second as i32]);
        assert_eq!(&words[first..first + 2], &[3, 0]);
        assert_eq!(&words[first + 2..second], &mask_words[..]);
        assert_eq!(&words[second..second + 2], &[3, 1]);
        assert_eq!(&words[second + 2..second + 5], &mask_words[..]);
        assert_eq!(&words[second + 5..], &[4, 1.5f32.to_bits() as i32, 0]);
    }

    #[test]
    fn a_step_with_nothing_to_change_packs_only_the_header() {
        let rows = [row(1), row(2)];
        let mut words = vec![7; packed_len(&rows, &StepAdjustments::new())];
        pack(&rows, &StepAdjustments::new(), &mut words);
        assert_eq!(words, [-1, -1]);
    }
}
