//! Latency and throughput figures of a benchmark run, in `vllm bench serve`'s terms.
//!
//! - TTFT: time from sending a request to its first chunk of generated text.
//! - TPOT: per request, (e2e − TTFT) / (output tokens − 1): the mean time per token
//!   after the first; requests with one output token have none.
//! - ITL: every gap between two successive chunks of generated text, all requests
//!   pooled (a chunk usually holds one token).
//! - E2E: time from sending a request to the end of its stream.
//!
//! Token counts are the server's `usage` where it reports one; otherwise the prompt
//! length the benchmark computed and the number of text chunks.

use std::collections::BTreeMap;
use std::time::Duration;

use heddle_core::Priority;
use serde::Serialize;

use super::client::{RequestFailure, StreamTiming};

/// Mean, spread and percentiles of a set of values (milliseconds, in this module).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The `p`th percentile (0..=100) of sorted values, interpolating linearly between the
/// two nearest ranks (numpy's default, which vLLM's figures use).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    assert!(!sorted.is_empty(), "the percentile of no values");
    let rank = (p / 100.0).clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let below = rank.floor() as usize;
    let above = rank.ceil() as usize;
    sorted[below] + (sorted[above] - sorted[below]) * (rank - below as f64)
}

/// The summary of `values`, or None when there are none.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let mean = sorted.iter().sum::<f64>() / n;
    // Population standard deviation, as numpy's default.
    let std = (sorted.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    Some(Summary {
        count: sorted.len(),
        mean,
        std,
        min: sorted[0],
        median: percentile(&sorted, 50.0),
        p90: percentile(&sorted, 90.0),
        p99: percentile(&sorted, 99.0),
        max: sorted[sorted.len() - 1],
    })
}

/// Time per output token after the first: (e2e − TTFT) / (output tokens − 1).
pub fn time_per_output_token(
    latency: Duration,
    ttft: Duration,
    output_tokens: usize,
) -> Option<Duration> {
    (output_tokens > 1).then(|| latency.saturating_sub(ttft) / (output_tokens as u32 - 1))
}

/// One request of a run, as sent and as answered.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub priority: Option<Priority>,
    /// The prompt's length by the benchmark's tokenizer.
    pub expected_prompt_tokens: usize,
    pub max_tokens: usize,
    pub outcome: Result<StreamTiming, RequestFailure>,
}

impl RequestRecord {
    fn prompt_tokens(&self, timing: &StreamTiming) -> usize {
        timing
            .usage
            .map_or(self.expected_prompt_tokens, |u| u.prompt_tokens)
    }

    fn output_tokens(timing: &StreamTiming) -> usize {
        timing
            .usage
            .map_or(timing.content_chunks, |u| u.completion_tokens)
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Latencies of a group of requests, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LatencyFigures {
    pub ttft_ms: Option<Summary>,
    pub tpot_ms: Option<Summary>,
    pub itl_ms: Option<Summary>,
    pub e2e_ms: Option<Summary>,
}

impl LatencyFigures {
    fn of<'a>(records: impl Iterator<Item = &'a RequestRecord> + Clone) -> Self {
        let timings = records.filter_map(|r| r.outcome.as_ref().ok());
        let ttft: Vec<f64> = timings.clone().map(|t| millis(t.ttft)).collect();
        let tpot: Vec<f64> = timings
            .clone()
            .filter_map(|t| {
                time_per_output_token(t.latency, t.ttft, RequestRecord::output_tokens(t))
            })
            .map(millis)
            .collect();
        let itl: Vec<f64> = timings
            .clone()
            .flat_map(|t| t.chunk_gaps.iter().copied().map(millis))
            .collect();
        let e2e: Vec<f64> = timings.map(|t| millis(t.latency)).collect();
        Self {
            ttft_ms: summarize(&ttft),
            tpot_ms: summarize(&tpot),
            itl_ms: summarize(&itl),
            e2e_ms: summarize(&e2e),
        }
    }
}

/// The figures of one priority class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PriorityFigures {
    pub completed: usize,
    pub failed: usize,
    pub output_tokens: usize,
    #[serde(flatten)]
    pub latency: LatencyFigures,
}

/// One request in the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestDetail {
    pub priority: Option<&'static str>,
    pub expected_prompt_tokens: usize,
    pub max_tokens: usize,
    /// Reported by the server (or the expected count when it reports no usage).
    pub prompt_tokens: Option<usize>,
    pub output_tokens: Option<usize>,
    pub usage_reported: bool,
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
    pub error: Option<String>,
}

/// Every figure of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunMetrics {
    /// From the first request sent to the last response ended.
    pub duration_s: f64,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Failed requests by HTTP status or failure kind (connect, transport, stream_error,
    /// no_output).
    pub errors: BTreeMap<String, usize>,
    /// Completed requests whose stream reported `usage`.
    pub usage_reported: usize,
    /// Prompt tokens of completed requests, as the server counted them.
    pub input_tokens: usize,
    /// The same prompts' tokens by the benchmark's tokenizer: equal to `input_tokens`
    /// on completions when the server tokenizes the same way and adds no BOS.
    pub expected_input_tokens: usize,
    pub output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    #[serde(flatten)]
    pub latency: LatencyFigures,
    /// Per priority class, for requests sent with a priority.
    pub per_priority: BTreeMap<&'static str, PriorityFigures>,
    pub request_details: Vec<RequestDetail>,
}

impl RunMetrics {
    pub fn from_records(records: &[RequestRecord], duration: Duration) -> Self {
        let mut errors = BTreeMap::new();
        let (mut input_tokens, mut expected_input_tokens, mut output_tokens) = (0, 0, 0);
        let mut usage_reported = 0;
        for record in records {
            match &record.outcome {
                Ok(timing) => {
                    input_tokens += record.prompt_tokens(timing);
                    expected_input_tokens += record.expected_prompt_tokens;
                    output_tokens += RequestRecord::output_tokens(timing);
                    usage_reported += usize::from(timing.usage.is_some());
                }
                Err(failure) => *errors.entry(failure.category()).or_insert(0) += 1,
            }
        }
        let completed = records.iter().filter(|r| r.outcome.is_ok()).count();
        let seconds = duration.as_secs_f64();
        let per_second = |count: usize| {
            if seconds > 0.0 {
                count as f64 / seconds
            } else {
                0.0
            }
        };

        let mut per_priority = BTreeMap::new();
        for priority in Priority::ALL {
            let class = records.iter().filter(|r| r.priority == Some(priority));
            let sent = class.clone().count();
            if sent == 0 {
                continue;
            }
            let finished = class.clone().filter_map(|r| r.outcome.as_ref().ok());
            per_priority.insert(
                priority.as_str(),
                PriorityFigures {
                    completed: finished.clone().count(),
                    failed: sent - finished.clone().count(),
                    output_tokens: finished.map(RequestRecord::output_tokens).sum(),
                    latency: LatencyFigures::of(class),
                },
            );
        }

        RunMetrics {
            duration_s: seconds,
            requests: records.len(),
            completed,
            failed: records.len() - completed,
            errors,
            usage_reported,
            input_tokens,
            expected_input_tokens,
            output_tokens,
            request_throughput: per_second(completed),
            output_throughput: per_second(output_tokens),
            total_token_throughput: per_second(input_tokens + output_tokens),
            latency: LatencyFigures::of(records.iter()),
            per_priority,
            request_details: records.iter().map(detail).collect(),
        }
    }
}

fn detail(record: &RequestRecord) -> RequestDetail {
    let mut detail = RequestDetail {
        priority: record.priority.map(Priority::as_str),
        expected_prompt_tokens: record.expected_prompt_tokens,
        max_tokens: record.max_tokens,
        prompt_tokens: None,
        output_tokens: None,
        usage_reported: false,
        ttft_ms: None,
        tpot_ms: None,
        e2e_ms: None,
        error: None,
    };
    match &record.outcome {
        Ok(timing) => {
            let output_tokens = RequestRecord::output_tokens(timing);
            detail.prompt_tokens = Some(record.prompt_tokens(timing));
            detail.output_tokens = Some(output_tokens);
            detail.usage_reported = timing.usage.is_some();
            detail.ttft_ms = Some(millis(timing.ttft));
            detail.tpot_ms =
                time_per_output_token(timing.latency, timing.ttft, output_tokens).map(millis);
            detail.e2e_ms = Some(millis(timing.latency));
        }
        Err(failure) => detail.error = Some(failure.message()),
    }
    detail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::client::ReportedUsage;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&sorted, 0.0), 1.0);
        assert_eq!(percentile(&sorted, 100.0), 4.0);
        assert_eq!(percentile(&sorted, 50.0), 2.5);
        // rank 0.9 · 3 = 2.7: 3 + 0.7 · (4 − 3)
        assert!((percentile(&sorted, 90.0) - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        // rank 0.99 · 99 = 98.01: 99 + 0.01
        assert!((percentile(&hundred, 99.0) - 99.01).abs() < 1e-9);
    }

    #[test]
    fn summaries_sort_their_input() {
        let summary = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(summary.count, 4);
        assert_eq!(summary.mean, 2.5);
        assert_eq!(summary.median, 2.5);
        assert_eq!((summary.min, summary.max), (1.0, 4.0));
        assert!((summary.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn tpot_excludes_the_first_token() {
        // 100 ms to the first token, then 9 more tokens over 450 ms: 50 ms each.
        assert_eq!(time_per_output_token(ms(550), ms(100), 10), Some(ms(50)));
        assert_eq!(time_per_output_token(ms(550), ms(100), 1), None);
        assert_eq!(time_per_output_token(ms(550), ms(100), 0), None);
    }

    fn completed(
        priority: Option<Priority>,
        ttft: u64,
        gaps: &[u64],
        usage: Option<ReportedUsage>,
    ) -> RequestRecord {
        let chunk_gaps: Vec<Duration> = gaps.iter().copied().map(ms).collect();
        let latency = ms(ttft + gaps.iter().sum::<u64>());
        RequestRecord {
            priority,
            expected_prompt_tokens: 8,
            max_tokens: 16,
            outcome: Ok(StreamTiming {
                ttft: ms(ttft),
                latency,
                content_chunks: chunk_gaps.len() + 1,
                chunk_gaps,
                usage,
            }),
        }
    }

    #[test]
    fn run_metrics_add_up_tokens_errors_and_latencies() {
        let usage = |prompt_tokens, completion_tokens| {
            Some(ReportedUsage {
                prompt_tokens,
                completion_tokens,
            })
        };
        let records = vec![
            // 4 tokens reported, chunks 20 ms apart: TPOT 20 ms.
            completed(Some(Priority::High), 100, &[20, 20, 20], usage(9, 4)),
            // No usage: 3 chunks count as 3 tokens, the prompt as the expected 8.
            completed(Some(Priority::Low), 300, &[10, 30], None),
            RequestRecord {
                priority: Some(Priority::Low),
                expected_prompt_tokens: 8,
                max_tokens: 16,
                outcome: Err(RequestFailure::Status {
                    status: 429,
                    message: "busy".into(),
                }),
            },
        ];
        let metrics = RunMetrics::from_records(&records, Duration::from_secs(2));
        assert_eq!(
            (metrics.requests, metrics.completed, metrics.failed),
            (3, 2, 1)
        );
        assert_eq!(metrics.errors, BTreeMap::from([("429".to_string(), 1)]));
        assert_eq!(metrics.usage_reported, 1);
        assert_eq!(metrics.input_tokens, 9 + 8);
        assert_eq!(metrics.expected_input_tokens, 16);
        assert_eq!(metrics.output_tokens, 4 + 3);
        assert_eq!(metrics.request_throughput, 1.0);
        assert_eq!(metrics.output_throughput, 3.5);
        assert_eq!(metrics.total_token_throughput, 12.0);

        let ttft = metrics.latency.ttft_ms.as_ref().unwrap();
        assert_eq!((ttft.min, ttft.max, ttft.mean), (100.0, 300.0, 200.0));
        let tpot = metrics.latency.tpot_ms.as_ref().unwrap();
        assert_eq!(tpot.count, 2);
        assert!((tpot.min - 20.0).abs() < 1e-9 && (tpot.max - 20.0).abs() < 1e-9);
        let itl = metrics.latency.itl_ms.as_ref().unwrap();
        assert_eq!(itl.count, 5);
        assert!((itl.mean - 20.0).abs() < 1e-9);
        let e2e = metrics.latency.e2e_ms.as_ref().unwrap();
        assert_eq!((e2e.min, e2e.max), (160.0, 340.0));

        let high = &metrics.per_priority["high"];
        assert_eq!((high.completed, high.failed, high.output_tokens), (1, 0, 4));
        let low = &metrics.per_priority["low"];
        assert_eq!((low.completed, low.failed, low.output_tokens), (1, 1, 3));
        assert!(!metrics.per_priority.contains_key("normal"));

        assert_eq!(metrics.request_details.len(), 3);
        assert_eq!(metrics.request_details[0].prompt_tokens, Some(9));
        assert_eq!(metrics.request_details[1].prompt_tokens, Some(8));
        assert!(!metrics.request_details[1].usage_reported);
        assert_eq!(
            metrics.request_details[2].error.as_deref(),
            Some("HTTP 429: busy")
        );
    }
}
