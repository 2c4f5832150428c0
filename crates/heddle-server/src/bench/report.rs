//! The benchmark's result: a table for people, a JSON document for tools.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use super::dataset::BenchPrompt;
use super::stats::{LatencyFigures, RunMetrics, Summary};
use super::BenchArgs;

/// The prompts of the measured run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptStats {
    pub count: usize,
    /// Prompt tokens by the benchmark's tokenizer.
    pub prompt_tokens: Option<Summary>,
    /// Requested output tokens (max_tokens).
    pub max_tokens: Option<Summary>,
}

impl PromptStats {
    pub fn of(prompts: &[BenchPrompt]) -> Self {
        let lengths = |len: fn(&BenchPrompt) -> usize| -> Vec<f64> {
            prompts.iter().map(|p| len(p) as f64).collect()
        };
        Self {
            count: prompts.len(),
            prompt_tokens: super::stats::summarize(&lengths(|p| p.prompt_tokens)),
            max_tokens: super::stats::summarize(&lengths(|p| p.output_len)),
        }
    }
}

/// Everything `--json` writes.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// heddle's version, which wrote the report.
    pub heddle_version: &'static str,
    /// Seconds since the Unix epoch when the report was made.
    pub timestamp: u64,
    pub label: Option<String>,
    pub config: BenchArgs,
    pub tokenizer: PathBuf,
    pub prompts: PromptStats,
    /// The one-at-a-time run, with --compare-single.
    pub single: Option<RunMetrics>,
    /// The run as configured.
    pub result: RunMetrics,
    /// Output tokens per second of `result` over `single`'s.
    pub speedup_vs_single: Option<f64>,
}

impl BenchReport {
    pub fn new(
        config: BenchArgs,
        tokenizer: PathBuf,
        prompts: PromptStats,
        single: Option<RunMetrics>,
        result: RunMetrics,
    ) -> Self {
        let speedup_vs_single = single
            .as_ref()
            .filter(|single| single.output_throughput > 0.0)
            .map(|single| result.output_throughput / single.output_throughput);
        Self {
            heddle_version: env!("CARGO_PKG_VERSION"),
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            label: config.label.clone(),
            config,
            tokenizer,
            prompts,
            single,
            result,
            speedup_vs_single,
        }
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let json = serde_json::to_string_pretty(self).context("serializing the report")?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// The human-readable report.
    pub fn table(&self) -> String {
        let config = &self.config;
        let mut out = String::new();
        let concurrency = config
            .max_concurrency
            .map_or("unlimited".to_string(), |n| n.to_string());
        rule(&mut out, "Serving Benchmark Result", '=');
        row(
            &mut out,
            "Target",
            format!("{}{}", config.url, config.endpoint.path()),
        );
        row(&mut out, "Model", &config.model);
        if let Some(label) = &self.label {
            row(&mut out, "Label", label);
        }
        row(
            &mut out,
            "Request rate / burstiness",
            format!("{} req/s / {}", config.request_rate, config.burstiness),
        );
        row(&mut out, "Max concurrency", concurrency);
        if let Some(mix) = &config.priority_mix {
            row(&mut out, "Priority mix", mix);
        }
        if let (Some(input), Some(output)) = (&self.prompts.prompt_tokens, &self.prompts.max_tokens)
        {
            row(
                &mut out,
                "Prompt / max output tokens (mean)",
                format!("{:.1} / {:.1}", input.mean, output.mean),
            );
        }
        run_figures(&mut out, &self.result);
        if let (Some(single), Some(speedup)) = (&self.single, self.speedup_vs_single) {
            rule(&mut out, "One at a time (--compare-single)", '-');
            row(&mut out, "Successful requests", single.completed);
            row(&mut out, "Failed requests", single.failed);
            row(
                &mut out,
                "Duration (s)",
                format!("{:.2}", single.duration_s),
            );
            row(
                &mut out,
                "Output token throughput (tok/s)",
                format!("{:.2}", single.output_throughput),
            );
            latency_table(&mut out, &single.latency);
            rule(&mut out, "Speedup", '-');
            row(
                &mut out,
                "Output tok/s, concurrent / single",
                format!("{speedup:.2}x"),
            );
        }
        rule(&mut out, "", '=');
        out
    }
}

const WIDTH: usize = 64;

fn rule(out: &mut String, title: &str, fill: char) {
    if title.is_empty() {
        let _ = writeln!(out, "{}", fill.to_string().repeat(WIDTH));
        return;
    }
    let side = WIDTH.saturating_sub(title.len() + 2);
    let left = fill.to_string().repeat(side / 2);
    let right = fill.to_string().repeat(side - side / 2);
    let _ = writeln!(out, "{left} {title} {right}");
}

fn row(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{:<40}{:>24}", format!("{name}:"), value.to_string());
}

fn run_figures(out: &mut String, run: &RunMetrics) {
    row(out, "Successful requests", run.completed);
    row(out, "Failed requests", run.failed);
    for (kind, count) in &run.errors {
        row(out, &format!("  errors: {kind}"), count);
    }
    row(
        out,
        "Benchmark duration (s)",
        format!("{:.2}", run.duration_s),
    );
    row(out, "Total input tokens", run.input_tokens);
    row(out, "Total generated tokens", run.output_tokens);
    row(
        out,
        "Request throughput (req/s)",
        format!("{:.2}", run.request_throughput),
    );
    row(
        out,
        "Output token throughput (tok/s)",
        format!("{:.2}", run.output_throughput),
    );
    row(
        out,
        "Total token throughput (tok/s)",
        format!("{:.2}", run.total_token_throughput),
    );
    latency_table(out, &run.latency);
    if !run.per_priority.is_empty() {
        rule(out, "Per priority (ms: TTFT / TPOT / E2E median)", '-');
        let _ = writeln!(
            out,
            "{:<8}{:>6}{:>6}{:>14}{:>10}{:>10}{:>10}",
            "", "ok", "fail", "output tok", "TTFT", "TPOT", "E2E"
        );
        for (priority, figures) in &run.per_priority {
            let median = |summary: &Option<Summary>| {
                summary
                    .as_ref()
                    .map_or("-".to_string(), |s| format!("{:.1}", s.median))
            };
            let _ = writeln!(
                out,
                "{:<8}{:>6}{:>6}{:>14}{:>10}{:>10}{:>10}",
                priority,
                figures.completed,
                figures.failed,
                figures.output_tokens,
                median(&figures.latency.ttft_ms),
                median(&figures.latency.tpot_ms),
                median(&figures.latency.e2e_ms),
            );
        }
    }
}

fn latency_table(out: &mut String, latency: &LatencyFigures) {
    let _ = writeln!(
        out,
        "{:<16}{:>12}{:>12}{:>12}{:>12}",
        "(ms)", "mean", "median", "p90", "p99"
    );
    for (name, summary) in [
        ("TTFT", &latency.ttft_ms),
        ("TPOT", &latency.tpot_ms),
        ("ITL", &latency.itl_ms),
        ("E2E", &latency.e2e_ms),
    ] {
        match summary {
            Some(s) => {
                let _ = writeln!(
                    out,
                    "{name:<16}{:>12.2}{:>12.2}{:>12.2}{:>12.2}",
                    s.mean, s.median, s.p90, s.p99
                );
            }
            None => {
                let _ = writeln!(out, "{name:<16}{:>12}", "-");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::client::{ReportedUsage, StreamTiming};
    use crate::bench::stats::RequestRecord;
    use clap::Parser;
    use std::time::Duration;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(extra: &[&str]) -> BenchArgs {
        let argv = [&["bench", "--api-key", "secret"], extra].concat();
        Cli::try_parse_from(argv).unwrap().bench
    }

    /// A run of `requests` requests of 10 output tokens over `seconds`.
    fn run(requests: usize, seconds: u64) -> RunMetrics {
        let record = RequestRecord {
            priority: None,
            expected_prompt_tokens: 4,
            max_tokens: 10,
            outcome: Ok(StreamTiming {
                ttft: Duration::from_millis(10),
                latency: Duration::from_millis(100),
                chunk_gaps: vec![Duration::from_millis(10); 9],
                content_chunks: 10,
                usage: Some(ReportedUsage {
                    prompt_tokens: 4,
                    completion_tokens: 10,
                }),
            }),
        };
        RunMetrics::from_records(&vec![record; requests], Duration::from_secs(seconds))
    }

    #[test]
    fn the_speedup_is_concurrent_over_single_output_throughput() {
        let prompts = PromptStats::of(&[]);
        let report = BenchReport::new(
            args(&["--compare-single", "--label", "x"]),
            PathBuf::from("t.gguf"),
            prompts.clone(),
            Some(run(4, 4)),
            run(4, 1),
        );
        assert_eq!(report.speedup_vs_single, Some(4.0));
        let table = report.table();
        assert!(
            table.contains("4.00x") && table.contains("One at a time"),
            "{table}"
        );
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["label"], "x");
        assert!(json["config"].get("api_key").is_none());
        assert_eq!(json["config"]["request_rate"], "inf");

        let alone = BenchReport::new(args(&[]), PathBuf::new(), prompts, None, run(2, 1));
        assert_eq!(alone.speedup_vs_single, None);
        assert!(!alone.table().contains("Speedup"));
    }
}
