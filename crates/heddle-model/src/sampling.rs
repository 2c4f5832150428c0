//! Choosing the next token from one sequence's logits.
//!
//! Order of operations (HF's, also vLLM's), after the sequence's logit biases and grammar
//! mask (see [`crate::logits_processing`]): repetition penalty over prompt and output,
//! frequency and presence penalties over the output, then temperature, top-k, top-p
//! (within the top-k mass) and min-p, then a draw. Greedy (temperature 0 or top-k 1) takes
//! the arg-max of the penalised logits, the lowest id on ties.
//!
//! Reproducibility: each draw uses its own ChaCha8 generator, seeded with the request's
//! seed and set to stream `num_generated`, so a seeded request draws the same tokens
//! whatever else shares the batch and after preemption (a recomputed sequence reaches the
//! same `num_generated` with the same history). A request without a seed draws a fresh
//! seed per token from the thread's OS-seeded generator: it is meant to be unpredictable,
//! so it needs no state here.

use heddle_core::{SamplingParams, TokenId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::logits_processing::LogitsAdjustment;

/// A sampled token, with log-probabilities when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    /// log p(token) under the model's own distribution, when `logprobs` was requested.
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens, most likely first (lowest id on ties).
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// Chooses tokens, keeping its working buffers from one call to the next: after the
/// first calls, sampling a token allocates nothing but the `top_logprobs` it returns,
/// however large the vocabulary. A runner keeps one per thread that samples.
#[derive(Debug, Default)]
pub struct Sampler {
    /// Token ids being ranked or counted: up to the vocabulary, or the history.
    ids: Vec<TokenId>,
    /// The (id, weight) of the tokens a draw chooses among.
    candidates: Vec<(TokenId, f32)>,
    /// The tokens the penalties changed, with their logits before.
    originals: Vec<(TokenId, f32)>,
    /// The row before its adjustment, when log-probabilities are asked for.
    raw: Vec<f32>,
}

impl Sampler {
    /// Samples from `logits` (the row is modified: penalties are applied in place).
    ///
    /// Log-probabilities are those of the raw logits (before penalties and temperature):
    /// OpenAI reports the model's distribution, not the sampler's, and vLLM does the
    /// same. `history` is the prompt followed by the output so far; `prompt_len` splits it.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        history: &[TokenId],
        prompt_len: usize,
        num_generated: usize,
    ) -> Sampled {
        self.sample_adjusted(logits, params, None, history, prompt_len, num_generated)
    }

    /// [`Self::sample`] after `adjustment` (logit biases, a grammar's mask) changes the
    /// row. Log-probabilities stay those of the model's raw logits.
    pub fn sample_adjusted(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        adjustment: Option<&LogitsAdjustment>,
        history: &[TokenId],
        prompt_len: usize,
        num_generated: usize,
    ) -> Sampled {
        let wants_logprobs = params.logprobs || params.top_logprobs > 0;
        let lse = if wants_logprobs {
            log_sum_exp(logits)
        } else {
            0.0
        };
        let top_logprobs = top_logprobs(logits, lse, params.top_logprobs as usize, &mut self.ids);
        self.raw.clear();
        if let Some(adjustment) = adjustment {
            if params.logprobs {
                self.raw.extend_from_slice(logits);
            }
            adjustment.apply(logits);
        }
        self.apply_penalties(logits, params, history, prompt_len);

        let token = if params.is_greedy() {
            argmax(logits)
        } else {
            let seed = params.seed.unwrap_or_else(|| rand::rng().random());
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(num_generated as u64);
            self.draw(logits, params, rng.random::<f64>())
        };
        let logprob = params.logprobs.then(|| {
            let raw = match self.raw.get(token as usize) {
                Some(&raw) => raw,
                None => self
                    .originals
                    .iter()
                    .find(|(t, _)| *t == token)
                    .map_or(logits[token as usize], |&(_, l)| l),
            };
            raw - lse
        });
        Sampled {
            token,
            logprob,
            top_logprobs,
        }
    }

    /// Applies the repetition, frequency and presence penalties in place, keeping the
    /// original logits of the tokens it changed in `originals`.
    fn apply_penalties(
        &mut self,
        logits: &mut [f32],
        params: &SamplingParams,
        history: &[TokenId],
        prompt_len: usize,
    ) {
        self.originals.clear();
        if !params.has_penalties() {
            return;
        }
        let vocab = logits.len();
        let output = &history[prompt_len.min(history.len())..];
        let repetition = params.repetition_penalty != 1.0;
        // Every token a penalty may touch: all of the history for the repetition
        // penalty, the output for the others.
        let touched = &mut self.ids;
        touched.clear();
        touched.extend_from_slice(if repetition { history } else { output });
        touched.sort_unstable();
        touched.dedup();
        touched.retain(|&t| (t as usize) < vocab);
        self.originals
            .extend(touched.iter().map(|&t| (t, logits[t as usize])));

        if repetition {
            let p = params.repetition_penalty;
            for &t in touched.iter() {
                let l = &mut logits[t as usize];
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
        if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
            let counts = &mut self.ids;
            counts.clear();
            counts.extend_from_slice(output);
            counts.sort_unstable();
            for run in counts.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    *l -= params.frequency_penalty * run.len() as f32 + params.presence_penalty;
                }
            }
        }
    }

    /// Draws with temperature, top-k, top-p and min-p from `u` uniform in [0, 1).
    fn draw(&mut self, logits: &[f32], params: &SamplingParams, u: f64) -> TokenId {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
        let inv_t = 1.0 / params.temperature;
        if !inv_t.is_finite() {
            // A temperature so small that 1/t overflows leaves only the arg-max.
            return argmax(logits);
        }
        // Unnormalised probabilities; the most likely token weighs 1.
        let weight = |id: TokenId| ((logits[id as usize] - max) * inv_t).exp();
        let pick = |candidates: &mut dyn Iterator<Item = (TokenId, f32)>, total: f64| {
            let target = u * total;
            let mut cum = 0f64;
            let mut last = 0;
            for (id, w) in candidates {
                if w <= 0.0 {
                    continue; // masked out, or too unlikely to matter: never drawn
                }
                cum += w as f64;
                last = id;
                if cum > target {
                    return id;
                }
            }
            last
        };
        let vocab = logits.len() as TokenId;
        let sorted = params.top_k > 0 || params.top_p < 1.0;
        if !sorted {
            // Only min-p, or nothing: walk the vocabulary in id order, no sorting needed.
            let keep = |&(_, w): &(TokenId, f32)| w >= params.min_p;
            let total: f64 = (0..vocab)
                .map(|i| (i, weight(i)))
                .filter(keep)
                .map(|(_, w)| w as f64)
                .sum();
            return pick(&mut (0..vocab).map(|i| (i, weight(i))).filter(keep), total);
        }

        let candidates = &mut self.candidates;
        let ranked = |n: usize, ids: &mut Vec<TokenId>, candidates: &mut Vec<(TokenId, f32)>| {
            candidates.clear();
            candidates.extend(top_indices(logits, n, ids).iter().map(|&i| (i, weight(i))));
        };
        if params.top_k > 0 {
            ranked(params.top_k as usize, &mut self.ids, candidates);
        } else {
            // The nucleus is a prefix of the sorted vocabulary: widen the sorted prefix
            // until it holds top_p of the whole mass (usually at the first try).
            let total: f64 = (0..vocab).map(|i| weight(i) as f64).sum();
            let mut n = 64;
            loop {
                ranked(n, &mut self.ids, candidates);
                let mass: f64 = candidates.iter().map(|&(_, w)| w as f64).sum();
                if mass >= params.top_p as f64 * total || n >= logits.len() {
                    break;
                }
                n *= 8;
            }
        }
        if params.top_p < 1.0 {
            let mass: f64 = candidates.iter().map(|&(_, w)| w as f64).sum();
            let mut cum = 0f64;
            let keep = candidates
                .iter()
                .position(|&(_, w)| {
                    cum += w as f64;
                    cum >= params.top_p as f64 * mass
                })
                .map_or(candidates.len(), |i| i + 1);
            candidates.truncate(keep);
        }
        if params.min_p > 0.0 {
            let threshold = params.min_p * candidates[0].1;
            candidates.retain(|&(_, w)| w >= threshold);
        }
        let total: f64 = candidates.iter().map(|&(_, w)| w as f64).sum();
        pick(&mut candidates.iter().copied(), total)
    }
}

/// Samples with a fresh [`Sampler`], for one-off use; a runner keeps its samplers so as
/// not to allocate their buffers for every token.
pub fn sample(
    logits: &mut [f32],
    params: &SamplingParams,
    history: &[TokenId],
    prompt_len: usize,
    num_generated: usize,
) -> Sampled {
    Sampler::default().sample(logits, params, history, prompt_len, num_generated)
}

/// The log-probability of `token` and of the `top` most likely tokens (most likely first,
/// lowest id on ties) under a raw logits row: exactly what [`Sampler::sample`] reports
/// when it samples `token` from that row, so a text scored token by token gets the
/// log-probabilities its generation would have had. `ids` is working space.
pub fn token_logprobs(
    logits: &[f32],
    token: TokenId,
    top: usize,
    ids: &mut Vec<TokenId>,
) -> (f32, Vec<(TokenId, f32)>) {
    let lse = log_sum_exp(logits);
    (
        logits[token as usize] - lse,
        top_logprobs(logits, lse, top, ids),
    )
}

/// The `n` most likely tokens of a row whose log-sum-exp is `lse`, with their
/// log-probabilities.
fn top_logprobs(logits: &[f32], lse: f32, n: usize, ids: &mut Vec<TokenId>) -> Vec<(TokenId, f32)> {
    let top = top_indices(logits, n, ids);
    let mut top_logprobs = Vec::with_capacity(top.len());
    top_logprobs.extend(top.iter().map(|&i| (i, logits[i as usize] - lse)));
    top_logprobs
}

/// log Σ exp(l), accumulated in f64 so that log-probabilities over a large vocabulary
/// are normalised to f32 precision.
pub fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// The log-softmax of a logits row.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| l - lse).collect()
}

/// The index of the largest logit; the lowest on ties.
pub fn argmax(logits: &[f32]) -> TokenId {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as TokenId
}

/// The `n` highest logits' ids, highest first, lowest id first on ties, ranked in `ids`
/// (whose earlier contents are dropped, and whose capacity is kept for the next call).
fn top_indices<'a>(logits: &[f32], n: usize, ids: &'a mut Vec<TokenId>) -> &'a [TokenId] {
    ids.clear();
    let n = n.min(logits.len());
    if n == 0 {
        return ids;
    }
    let order = |a: &TokenId, b: &TokenId| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    ids.extend(0..logits.len() as TokenId);
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, order);
        ids.truncate(n);
    }
    ids.sort_unstable_by(order);
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            ..Default::default()
        }
    }

    fn logits() -> Vec<f32> {
        (0..1000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 5.0)
            .collect()
    }

    #[test]
    fn a_seed_reproduces_its_draws() {
        let p = SamplingParams {
            seed: Some(42),
            ..params(1.5)
        };
        let draws = |p: &SamplingParams| -> Vec<TokenId> {
            (0..50)
                .map(|n| sample(&mut logits(), p, &[], 0, n).token)
                .collect()
        };
        assert_eq!(draws(&p), draws(&p));
        let other = SamplingParams {
            seed: Some(43),
            ..p
        };
        assert_ne!(draws(&p), draws(&other));
        // Successive draws of one request differ (they use different streams).
        let tokens = draws(&p);
        assert!(tokens.iter().any(|&t| t != tokens[0]));
    }

    #[test]
    fn a_scored_token_has_the_log_probabilities_its_sampling_reports() {
        let p = SamplingParams {
            logprobs: true,
            top_logprobs: 5,
            repetition_penalty: 1.3,
            seed: Some(7),
            ..params(0.8)
        };
        let history = [3, 17, 17, 250];
        for n in 0..20 {
            let sampled = sample(&mut logits(), &p, &history, 2, n);
            let (logprob, top) = token_logprobs(&logits(), sampled.token, 5, &mut Vec::new());
            assert_eq!(Some(logprob), sampled.logprob);
            assert_eq!(top, sampled.top_logprobs);
        }
        let (logprob, top) = token_logprobs(&[0.0, 0.0], 1, 2, &mut Vec::new());
        assert!((logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|&(id, _)| id).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn top_k_one_and_temperature_zero_are_greedy() {
        let l = logits();
        let best = argmax(&l);
        assert_eq!(l[best as usize], 4.99);
        for seed in 0..20 {
            let p = SamplingParams {
                top_k: 1,
                seed: Some(seed),
                ..params(2.0)
            };
            assert_eq!(sample(&mut l.clone(), &p, &[], 0, 0).token, best);
        }
        assert_eq!(sample(&mut l.clone(), &params(0.0), &[], 0, 0).token, best);
        // Ties go to the lowest id.
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn penalties_move_what_they_should() {
        let l = vec![2.0, 1.9, -1.0, 0.5];
        // Greedy picks 0; token 0 repeated in the output is penalised away.
        let p = SamplingParams {
            frequency_penalty: 0.06,
            ..params(0.0)
        };
        assert_eq!(sample(&mut l.clone(), &p, &[3, 0], 1, 1).token, 0);
        assert_eq!(sample(&mut l.clone(), &p, &[3, 0, 0], 1, 2).token, 1);
        let p = SamplingParams {
            presence_penalty: 0.2,
            ..params(0.0)
        };
        assert_eq!(sample(&mut l.clone(), &p, &[0], 0, 1).token, 1);
        // Presence and frequency count only the output, not the prompt.
        assert_eq!(sample(&mut l.clone(), &p, &[0], 1, 0).token, 0);

        // Repetition: positive logits divided, negative multiplied, prompt included.
        let p = SamplingParams {
            repetition_penalty: 2.0,
            ..params(0.0)
        };
        let mut row = l.clone();
        assert_eq!(sample(&mut row, &p, &[0, 2], 2, 0).token, 1);
        assert_eq!(row, vec![1.0, 1.9, -2.0, 0.5]);
    }

    #[test]
    fn logprobs_are_the_models_normalised_distribution() {
        let l = logits();
        let p = SamplingParams {
            logprobs: true,
            top_logprobs: 5,
            repetition_penalty: 1.3,
            seed: Some(7),
            ..params(0.0)
        };
        let best = argmax(&l);
        let s = sample(&mut l.clone(), &p, &[best], 1, 0);
        let lp = log_softmax(&l);
        let lse = log_sum_exp(&lp);
        assert!(lse.abs() < 1e-5, "log-softmax is not normalised: {lse}");
        // The chosen token's log-prob is the raw one, not the penalised one.
        assert_eq!(s.logprob, Some(lp[s.token as usize]));
        assert_eq!(s.top_logprobs.len(), 5);
        assert!(s.top_logprobs.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(s.top_logprobs[0], (best, lp[best as usize]));
        // The penalised arg-max was not chosen greedily.
        assert_ne!(s.token, best);
        assert!(s.top_logprobs.iter().any(|&(t, _)| t == s.token));
    }

    #[test]
    fn a_reused_sampler_draws_what_a_fresh_one_does() {
        // Its buffers carry nothing from one call to the next but their capacity.
        let mut reused = Sampler::default();
        let history: Vec<TokenId> = (0..40).map(|i| i * 13 % 1000).collect();
        for case in 0..64u64 {
            let p = SamplingParams {
                top_k: [0, 1, 50, 900][case as usize % 4],
                top_p: [1.0, 0.9, 0.3, 0.999][case as usize / 4 % 4],
                min_p: [0.0, 0.1][case as usize / 16 % 2],
                repetition_penalty: [1.0, 1.4][case as usize / 32],
                frequency_penalty: 0.2,
                seed: Some(case),
                logprobs: true,
                top_logprobs: (case % 6) as u32,
                ..params(1.2)
            };
            let fresh = sample(&mut logits(), &p, &history, 20, case as usize);
            let again = reused.sample(&mut logits(), &p, &history, 20, case as usize);
            assert_eq!(fresh, again, "{p:?}");
        }
    }

    #[test]
    fn draws_follow_the_distribution_and_the_filters() {
        let l = vec![0.0, (2f32).ln(), (3f32).ln(), (4f32).ln()];
        let count = |p: SamplingParams| {
            let mut counts = [0usize; 4];
            for n in 0..20_000 {
                counts[sample(&mut l.clone(), &p, &[], 0, n).token as usize] += 1;
            }
            counts
        };
        let seeded = |p: SamplingParams| SamplingParams { seed: Some(1), ..p };
        // Probabilities 0.1, 0.2, 0.3, 0.4: each within 2% absolute.
        let c = count(seeded(params(1.0)));
        for (i, &c) in c.iter().enumerate() {
            let want = (i + 1) as f64 / 10.0;
            assert!((c as f64 / 20_000.0 - want).abs() < 0.02, "{c:?}");
        }
        // top_k 2 keeps tokens 3 and 2 in proportion 4:3.
        let c = count(seeded(SamplingParams {
            top_k: 2,
            ..params(1.0)
        }));
        assert_eq!(c[0] + c[1], 0);
        assert!((c[3] as f64 / c[2] as f64 - 4.0 / 3.0).abs() < 0.1, "{c:?}");
        // top_p 0.5: 0.4 is not enough, 0.4 + 0.3 is.
        let c = count(seeded(SamplingParams {
            top_p: 0.5,
            ..params(1.0)
        }));
        assert_eq!(c[0] + c[1], 0, "{c:?}");
        // min_p 0.6: keeps probabilities >= 0.24, that is tokens 2 and 3.
        let c = count(seeded(SamplingParams {
            min_p: 0.6,
            ..params(1.0)
        }));
        assert_eq!(c[0] + c[1], 0, "{c:?}");
        assert!(c[2] > 0 && c[3] > 0);
        // A temperature too small to invert is greedy.
        let c = count(seeded(params(1e-39)));
        assert_eq!(c[3], 20_000);
        // A tiny top_p is greedy.
        let c = count(seeded(SamplingParams {
            top_p: 0.01,
            ..params(1.0)
        }));
        assert_eq!(c[3], 20_000);
    }
}
