//! When requests are sent, and with which priority.
//!
//! Inter-arrival times follow `vllm bench serve`: gamma-distributed with shape
//! `burstiness` and mean `1 / rate`. Burstiness 1 is a Poisson process (exponential
//! gaps); below 1 requests come in bursts, above 1 more evenly.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, ensure, Context};
use heddle_core::Priority;
use rand::Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Serialize, Serializer};

/// `--request-rate`: requests per second, or `inf` to send them all at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RequestRate {
    Infinite,
    PerSecond(f64),
}

impl FromStr for RequestRate {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        if matches!(text.to_ascii_lowercase().as_str(), "inf" | "infinity") {
            return Ok(RequestRate::Infinite);
        }
        let rate: f64 = text
            .parse()
            .with_context(|| format!("{text:?} is neither a number nor `inf`"))?;
        ensure!(
            rate.is_finite() && rate > 0.0,
            "the request rate must be positive, got {text}"
        );
        Ok(RequestRate::PerSecond(rate))
    }
}

impl fmt::Display for RequestRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestRate::Infinite => f.write_str("inf"),
            RequestRate::PerSecond(rate) => write!(f, "{rate}"),
        }
    }
}

/// JSON has no infinity: the rate is a number, or the string "inf".
impl Serialize for RequestRate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RequestRate::Infinite => serializer.serialize_str("inf"),
            RequestRate::PerSecond(rate) => serializer.serialize_f64(*rate),
        }
    }
}

/// When each of `count` requests is due, as offsets from the start: the first at zero,
/// then gamma-distributed gaps of mean `1 / rate` and shape `burstiness`.
pub fn arrival_offsets(
    rng: &mut impl Rng,
    count: usize,
    rate: RequestRate,
    burstiness: f64,
) -> anyhow::Result<Vec<Duration>> {
    ensure!(
        burstiness.is_finite() && burstiness > 0.0,
        "--burstiness must be positive, got {burstiness}"
    );
    let rate = match rate {
        RequestRate::Infinite => return Ok(vec![Duration::ZERO; count]),
        RequestRate::PerSecond(rate) => rate,
    };
    // Shape k and scale θ = 1 / (rate · k) give mean k·θ = 1 / rate.
    let gaps = Gamma::new(burstiness, 1.0 / (rate * burstiness))
        .context("the inter-arrival distribution")?;
    let mut due = 0.0;
    let mut offsets = Vec::with_capacity(count);
    for index in 0..count {
        if index > 0 {
            due += gaps.sample(rng);
        }
        offsets.push(Duration::from_secs_f64(due));
    }
    Ok(offsets)
}

/// `--priority-mix high:0.2,normal:0.5,low:0.3`: each request's priority is drawn with
/// these weights (they need not sum to 1).
#[derive(Debug, Clone, PartialEq)]
pub struct PriorityMix {
    weights: Vec<(Priority, f64)>,
}

impl PriorityMix {
    /// A priority drawn with the mix's weights.
    pub fn draw(&self, rng: &mut impl Rng) -> Priority {
        let total: f64 = self.weights.iter().map(|(_, weight)| weight).sum();
        let mut point = rng.random::<f64>() * total;
        for &(priority, weight) in &self.weights {
            if point < weight {
                return priority;
            }
            point -= weight;
        }
        // Rounding may leave `point` a hair above the last weight.
        self.weights[self.weights.len() - 1].0
    }
}

impl FromStr for PriorityMix {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> anyhow::Result<Self> {
        let mut weights: Vec<(Priority, f64)> = Vec::new();
        let mut named: Vec<Priority> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, weight)) = part.split_once(':') else {
                bail!("{part:?} is not PRIORITY:WEIGHT (e.g. high:0.2)");
            };
            let priority: Priority = name
                .parse()
                .with_context(|| format!("{name:?} is not high, normal or low"))?;
            let weight: f64 = weight
                .trim()
                .parse()
                .with_context(|| format!("the weight of {name:?}"))?;
            ensure!(
                weight.is_finite() && weight >= 0.0,
                "the weight of {name:?} must be a number >= 0, got {weight}"
            );
            ensure!(!named.contains(&priority), "{priority} is given twice");
            named.push(priority);
            if weight > 0.0 {
                weights.push((priority, weight));
            }
        }
        ensure!(
            !weights.is_empty(),
            "a priority mix needs a positive weight, e.g. high:0.2,normal:0.5,low:0.3"
        );
        Ok(PriorityMix { weights })
    }
}

impl fmt::Display for PriorityMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (priority, weight)) in self.weights.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            write!(f, "{priority}:{weight}")?;
        }
        Ok(())
    }
}

impl Serialize for PriorityMix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(
            self.weights
                .iter()
                .map(|(priority, weight)| (priority.as_str(), weight)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn gaps(offsets: &[Duration]) -> Vec<f64> {
        offsets
            .windows(2)
            .map(|pair| (pair[1] - pair[0]).as_secs_f64())
            .collect()
    }

    fn mean_and_variance(values: &[f64]) -> (f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, variance)
    }

    #[test]
    fn poisson_arrivals_have_the_requested_mean_rate() {
        let mut rng = StdRng::seed_from_u64(42);
        let offsets = arrival_offsets(&mut rng, 20_001, RequestRate::PerSecond(4.0), 1.0).unwrap();
        assert_eq!(offsets[0], Duration::ZERO);
        assert!(offsets.windows(2).all(|pair| pair[0] <= pair[1]));
        let (mean, variance) = mean_and_variance(&gaps(&offsets));
        // Exponential gaps: mean 1/rate = 0.25 s and variance mean² = 0.0625. With 20,000
        // gaps the standard error of the mean is 0.25/√20000 ≈ 0.0018.
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
        assert!((variance - 0.0625).abs() < 0.006, "variance {variance}");
    }

    #[test]
    fn burstiness_keeps_the_mean_and_shapes_the_variance() {
        // Gamma gaps of shape k and mean m have variance m² / k.
        for burstiness in [0.25, 4.0] {
            let mut rng = StdRng::seed_from_u64(9);
            let offsets =
                arrival_offsets(&mut rng, 40_001, RequestRate::PerSecond(2.0), burstiness).unwrap();
            let (mean, variance) = mean_and_variance(&gaps(&offsets));
            let expected_variance = 0.25 / burstiness;
            assert!((mean - 0.5).abs() < 0.02, "k={burstiness}: mean {mean}");
            assert!(
                (variance / expected_variance - 1.0).abs() < 0.1,
                "k={burstiness}: variance {variance}, expected {expected_variance}"
            );
        }
    }

    #[test]
    fn an_infinite_rate_sends_everything_at_once() {
        let mut rng = StdRng::seed_from_u64(1);
        let offsets = arrival_offsets(&mut rng, 5, RequestRate::Infinite, 1.0).unwrap();
        assert_eq!(offsets, vec![Duration::ZERO; 5]);
        assert!(arrival_offsets(&mut rng, 5, RequestRate::Infinite, 0.0).is_err());
    }

    #[test]
    fn the_same_seed_gives_the_same_arrivals() {
        let draw = |seed| {
            arrival_offsets(
                &mut StdRng::seed_from_u64(seed),
                50,
                RequestRate::PerSecond(10.0),
                1.0,
            )
            .unwrap()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
    }

    #[test]
    fn request_rates_parse() {
        assert_eq!("inf".parse::<RequestRate>().unwrap(), RequestRate::Infinite);
        assert_eq!(
            "2.5".parse::<RequestRate>().unwrap(),
            RequestRate::PerSecond(2.5)
        );
        for bad in ["0", "-1", "fast", "NaN"] {
            assert!(bad.parse::<RequestRate>().is_err(), "{bad}");
        }
        assert_eq!(
            serde_json::to_string(&RequestRate::Infinite).unwrap(),
            "\"inf\""
        );
    }

    #[test]
    fn priority_mixes_parse_and_draw_in_proportion() {
        let mix: PriorityMix = "high:0.2, normal:0.5,low:0.3".parse().unwrap();
        assert_eq!(mix.to_string(), "high:0.2,normal:0.5,low:0.3");
        let mut rng = StdRng::seed_from_u64(5);
        let mut counts = [0usize; 3];
        for _ in 0..30_000 {
            counts[mix.draw(&mut rng).value() as usize] += 1;
        }
        for (count, expected) in counts.iter().zip([0.2, 0.5, 0.3]) {
            let share = *count as f64 / 30_000.0;
            assert!((share - expected).abs() < 0.015, "{counts:?}");
        }
        let only_low: PriorityMix = "low:1,high:0".parse().unwrap();
        assert!((0..100).all(|_| only_low.draw(&mut rng) == Priority::Low));
        for bad in [
            "",
            "high",
            "urgent:1",
            "high:-1",
            "high:0",
            "low:1,low:2",
            "high:0,high:1",
        ] {
            assert!(bad.parse::<PriorityMix>().is_err(), "{bad:?}");
        }
        assert_eq!(
            serde_json::to_value(&mix).unwrap(),
            serde_json::json!({"high": 0.2, "normal": 0.5, "low": 0.3})
        );
    }
}
