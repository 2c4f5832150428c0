//! Prometheus metrics, labelled by model, written in the text exposition format.
//!
//! Scheduler state (queues, seats, KV blocks, prefix cache, preemptions, refusals) is read
//! from each loaded engine's `stats()` at scrape time. Latencies, endings and token counts
//! are recorded by the engine, where every request ends exactly once — also those whose
//! client left — measured from the moment the HTTP request arrived, so they include
//! queueing and detokenization.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use heddle_core::{FinishReason, Priority, SchedulerStats};

use crate::engine::EngineHealth;

const TTFT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
const GRAMMAR_MASK_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
];
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const END_TO_END_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default, Clone)]
struct HistogramState {
    /// Observations per bucket (not cumulative); one more than `bounds` for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            state: Mutex::new(HistogramState {
                counts: vec![0; bounds.len() + 1],
                sum: 0.0,
            }),
        }
    }

    pub fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.counts[bucket] += 1;
        state.sum += value;
    }

    /// How many observations, and their sum.
    pub fn count_and_sum(&self) -> (u64, f64) {
        let state = self.snapshot();
        (state.counts.iter().sum(), state.sum)
    }

    fn snapshot(&self) -> HistogramState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What is measured of one model's requests, kept across its loads.
#[derive(Debug)]
pub struct ModelMetrics {
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub end_to_end_latency: Histogram,
    /// Per step with grammars: the time to compute all their masks (alongside the
    /// forward pass) ...
    pub grammar_mask: Histogram,
    /// ... and how long sampling then still waited for them (what the masks cost the step).
    pub grammar_mask_wait: Histogram,
    /// Per engine step: the model runner's share (forward pass, sampling, the wait for
    /// the device) ...
    pub model_step: Histogram,
    /// ... and the whole step, scheduling and delivering the tokens included; the
    /// difference is the engine's own time, when a GPU has nothing to do.
    pub engine_step: Histogram,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    /// Finished sequences by reason: stop, length, cancelled, error.
    finished: [AtomicU64; 4],
    /// Requests answered 429 because the waiting queue was full.
    rejected_queue_full: AtomicU64,
    /// Times the model's engine panicked and was restarted.
    engine_restarts: AtomicU64,
    /// Sequences the engine accepted; each is counted once more when it ends.
    accepted: AtomicU64,
    /// Steps launched behind the one in flight (overlapped steps).
    overlapped_steps: AtomicU64,
}

const FINISH_REASONS: [FinishReason; 4] = [
    FinishReason::Stop,
    FinishReason::Length,
    FinishReason::Cancelled,
    FinishReason::Error,
];

impl Default for ModelMetrics {
    fn default() -> Self {
        ModelMetrics {
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            inter_token_latency: Histogram::new(INTER_TOKEN_BUCKETS),
            end_to_end_latency: Histogram::new(END_TO_END_BUCKETS),
            grammar_mask: Histogram::new(GRAMMAR_MASK_BUCKETS),
            grammar_mask_wait: Histogram::new(GRAMMAR_MASK_BUCKETS),
            model_step: Histogram::new(STEP_BUCKETS),
            engine_step: Histogram::new(STEP_BUCKETS),
            prompt_tokens: AtomicU64::default(),
            generation_tokens: AtomicU64::default(),
            finished: Default::default(),
            rejected_queue_full: AtomicU64::default(),
            engine_restarts: AtomicU64::default(),
            accepted: AtomicU64::default(),
            overlapped_steps: AtomicU64::default(),
        }
    }
}

impl ModelMetrics {
    pub fn record_queue_full(&self) {
        self.rejected_queue_full.fetch_add(1, Ordering::Relaxed);
    }

    /// One step's grammar masks: how many, how long they took, how long sampling waited.
    pub fn record_grammar_masks(
        &self,
        masked: usize,
        mask_time: std::time::Duration,
        wait: std::time::Duration,
    ) {
        if masked > 0 {
            self.grammar_mask.observe(mask_time.as_secs_f64());
            self.grammar_mask_wait.observe(wait.as_secs_f64());
        }
    }

    pub fn record_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_engine_restart(&self) {
        self.engine_restarts.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_overlapped_step(&self) {
        self.overlapped_steps.fetch_add(1, Ordering::Relaxed);
    }

    /// A sequence ended, `elapsed` after its request arrived.
    pub fn record_finish(
        &self,
        reason: FinishReason,
        elapsed: Duration,
        prompt_tokens: usize,
        generated: usize,
    ) {
        self.end_to_end_latency.observe(elapsed.as_secs_f64());
        let slot = FINISH_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(FINISH_REASONS.len() - 1);
        self.finished[slot].fetch_add(1, Ordering::Relaxed);
        self.prompt_tokens
            .fetch_add(prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated as u64, Ordering::Relaxed);
    }
}

/// A loaded model's engine as a scrape sees it.
#[derive(Debug, Clone)]
pub struct EngineReport {
    pub model: String,
    pub stats: SchedulerStats,
    pub health: EngineHealth,
}

/// Picks one of a model's histograms.
type HistogramOf = fn(&ModelMetrics) -> &Histogram;
/// Picks one of a model's counters.
type CounterOf = fn(&ModelMetrics) -> &AtomicU64;
/// Reads one of a model's batch line counts.
type BatchLineCount = fn(&BatchLineMetrics) -> f64;

/// Lines of batches (the Batch API) of one model: how many wait for a slot, how many are
/// submitted, and how each ended. A line is counted once as it ends: its result is
/// committed to the database first.
#[derive(Debug, Default)]
pub struct BatchLineMetrics {
    queued: AtomicI64,
    running: AtomicI64,
    completed: AtomicU64,
    failed: AtomicU64,
}

impl BatchLineMetrics {
    /// `count` lines of a batch now wait for a slot.
    pub fn add_queued(&self, count: usize) {
        self.queued.fetch_add(count as i64, Ordering::Relaxed);
    }

    /// `count` waiting lines left the queue without running (the batch was cancelled,
    /// expired or the server stopped).
    pub fn remove_queued(&self, count: usize) {
        self.queued.fetch_sub(count as i64, Ordering::Relaxed);
    }

    /// A waiting line got its slot.
    pub fn start_running(&self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
    }

    /// A running line gave its slot back: `ended` says how, if its result was committed.
    pub fn stop_running(&self, ended: Option<bool>) {
        self.running.fetch_sub(1, Ordering::Relaxed);
        match ended {
            Some(true) => self.completed.fetch_add(1, Ordering::Relaxed),
            Some(false) => self.failed.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }
}

/// Every model's metrics, kept across unloads so that counters never go backwards.
#[derive(Debug, Default)]
pub struct Metrics {
    models: Mutex<BTreeMap<String, Arc<ModelMetrics>>>,
    batch_lines: Mutex<BTreeMap<String, Arc<BatchLineMetrics>>>,
}

impl Metrics {
    pub fn model(&self, id: &str) -> Arc<ModelMetrics> {
        let mut models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        models.entry(id.to_string()).or_default().clone()
    }

    /// The batch line counts of a model (for lines naming no served model: "unknown").
    pub fn batch_lines(&self, model: &str) -> Arc<BatchLineMetrics> {
        let mut lines = self.batch_lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.entry(model.to_string()).or_default().clone()
    }

    /// The exposition text; `engines` are the loaded models' engines.
    pub fn render(&self, engines: &[EngineReport]) -> String {
        let models: Vec<(String, Arc<ModelMetrics>)> = self
            .models
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, m)| (id.clone(), m.clone()))
            .collect();
        let mut out = String::new();
        write_scheduler_families(&mut out, engines);
        crate::vllm_gauges::write(&mut out, engines);

        let counters: [(&str, &str, CounterOf); 6] = [
            (
                "heddle_prompt_tokens_total",
                "Prompt tokens of finished sequences.",
                |m| &m.prompt_tokens,
            ),
            (
                "heddle_generation_tokens_total",
                "Tokens generated by finished sequences.",
                |m| &m.generation_tokens,
            ),
            (
                "heddle_sequences_accepted_total",
                "Sequences the engine accepted; once drained, equal to the sum of \
                 heddle_sequences_finished_total.",
                |m| &m.accepted,
            ),
            (
                "heddle_engine_restarts_total",
                "Times a model's engine panicked, failed its requests and was restarted.",
                |m| &m.engine_restarts,
            ),
            (
                "heddle_requests_rejected_total",
                "Requests answered 429 because the waiting queue was full.",
                |m| &m.rejected_queue_full,
            ),
            (
                "heddle_engine_overlapped_steps_total",
                "Steps launched behind the one in flight, before its results were applied \
                 (--overlap-steps).",
                |m| &m.overlapped_steps,
            ),
        ];
        for (name, help, pick) in counters {
            let mut family = Family::new(&mut out, name, "counter", help);
            for (id, m) in &models {
                family.sample("", &[("model", id)], pick(m).load(Ordering::Relaxed) as f64);
            }
        }
        let mut family = Family::new(
            &mut out,
            "heddle_sequences_finished_total",
            "counter",
            "Finished sequences by finish reason.",
        );
        for (id, m) in &models {
            for (reason, count) in FINISH_REASONS.iter().zip(&m.finished) {
                family.sample(
                    "",
                    &[("model", id), ("reason", reason.as_str())],
                    count.load(Ordering::Relaxed) as f64,
                );
            }
        }
        let histograms: [(&str, &str, HistogramOf); 7] = [
            (
                "heddle_time_to_first_token_seconds",
                "Time from request arrival to the first generated token.",
                |m| &m.time_to_first_token,
            ),
            (
                "heddle_inter_token_latency_seconds",
                "Time between consecutive generated tokens of a sequence.",
                |m| &m.inter_token_latency,
            ),
            (
                "heddle_end_to_end_latency_seconds",
                "Time from request arrival to the end of a sequence.",
                |m| &m.end_to_end_latency,
            ),
            (
                "heddle_grammar_mask_seconds",
                "Per step with grammar-constrained sequences: time to compute their token \
                 masks, alongside the forward pass.",
                |m| &m.grammar_mask,
            ),
            (
                "heddle_grammar_mask_wait_seconds",
                "Per step with grammar-constrained sequences: time sampling waited for the \
                 masks after the forward pass.",
                |m| &m.grammar_mask_wait,
            ),
            (
                "heddle_model_step_seconds",
                "Per engine step: time in the model runner (forward pass, sampling, the wait \
                 for the device).",
                |m| &m.model_step,
            ),
            (
                "heddle_engine_step_seconds",
                "Per engine step: the whole step, scheduling and delivering tokens included.",
                |m| &m.engine_step,
            ),
        ];
        for (name, help, pick) in histograms {
            let mut family = Family::new(&mut out, name, "histogram", help);
            for (id, m) in &models {
                family.histogram(id, pick(m));
            }
        }
        self.write_batch_families(&mut out);
        out
    }

    fn write_batch_families(&self, out: &mut String) {
        let lines: Vec<(String, Arc<BatchLineMetrics>)> = self
            .batch_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, m)| (id.clone(), m.clone()))
            .collect();
        let families: [(&str, &str, &str, BatchLineCount); 4] = [
            (
                "heddle_batch_lines_queued",
                "gauge",
                "Lines of running batches waiting for one of the model's batch slots.",
                |m| m.queued.load(Ordering::Relaxed) as f64,
            ),
            (
                "heddle_batch_lines_running",
                "gauge",
                "Lines of batches submitted to the model's engine now.",
                |m| m.running.load(Ordering::Relaxed) as f64,
            ),
            (
                "heddle_batch_lines_completed_total",
                "counter",
                "Batch lines answered 200, their result committed.",
                |m| m.completed.load(Ordering::Relaxed) as f64,
            ),
            (
                "heddle_batch_lines_failed_total",
                "counter",
                "Batch lines that failed (their error committed to the batch's error file).",
                |m| m.failed.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, kind, help, value) in families {
            let mut family = Family::new(out, name, kind, help);
            for (id, m) in &lines {
                family.sample("", &[("model", id)], value(m));
            }
        }
    }
}

fn write_scheduler_families(out: &mut String, engines: &[EngineReport]) {
    let gauge = |out: &mut String, name: &str, help: &str, value: fn(&SchedulerStats) -> f64| {
        let mut family = Family::new(out, name, "gauge", help);
        for engine in engines {
            family.sample("", &[("model", &engine.model)], value(&engine.stats));
        }
    };
    let counter = |out: &mut String, name: &str, help: &str, value: fn(&SchedulerStats) -> f64| {
        let mut family = Family::new(out, name, "counter", help);
        for engine in engines {
            family.sample("", &[("model", &engine.model)], value(&engine.stats));
        }
    };

    let mut family = Family::new(
        out,
        "heddle_model_loaded",
        "gauge",
        "1 for every model loaded in the pool.",
    );
    for engine in engines {
        family.sample("", &[("model", &engine.model)], 1.0);
    }
    let mut family = Family::new(
        out,
        "heddle_engine_up",
        "gauge",
        "1 while a loaded model's engine serves; 0 while it restarts after a panic or has stopped.",
    );
    for engine in engines {
        let up = engine.health == EngineHealth::Running;
        family.sample("", &[("model", &engine.model)], f64::from(u8::from(up)));
    }
    let mut family = Family::new(
        out,
        "heddle_queue_depth",
        "gauge",
        "Waiting requests by base priority.",
    );
    for engine in engines {
        for priority in Priority::ALL {
            family.sample(
                "",
                &[("model", &engine.model), ("priority", priority.as_str())],
                engine.stats.waiting[priority.value() as usize] as f64,
            );
        }
    }
    gauge(
        out,
        "heddle_running_sequences",
        "Sequences admitted to the batch.",
        |s| s.running as f64,
    );
    gauge(out, "heddle_kv_blocks_total", "KV cache blocks.", |s| {
        s.kv.total_blocks as f64
    });
    gauge(
        out,
        "heddle_kv_blocks_used",
        "KV cache blocks referenced by a sequence.",
        |s| s.kv.used_blocks as f64,
    );
    gauge(
        out,
        "heddle_kv_blocks_cached",
        "KV cache blocks holding a prefix-cache entry, used or not.",
        |s| s.kv.cached_blocks as f64,
    );
    gauge(
        out,
        "heddle_kv_blocks_free",
        "KV cache blocks that can be handed out now.",
        |s| s.kv.free_blocks as f64,
    );
    gauge(
        out,
        "heddle_prefix_cache_hit_rate",
        "Share of prompt tokens served from the prefix cache since the model was loaded.",
        |s| {
            let looked_up = s.kv.prefix_hit_tokens + s.kv.prefix_miss_tokens;
            if looked_up == 0 {
                0.0
            } else {
                s.kv.prefix_hit_tokens as f64 / looked_up as f64
            }
        },
    );
    counter(
        out,
        "heddle_prefix_cache_hit_tokens_total",
        "Prompt tokens served from the prefix cache.",
        |s| s.kv.prefix_hit_tokens as f64,
    );
    counter(
        out,
        "heddle_prefix_cache_miss_tokens_total",
        "Prompt tokens that had to be computed.",
        |s| s.kv.prefix_miss_tokens as f64,
    );
    counter(
        out,
        "heddle_preemptions_total",
        "Running sequences preempted (memory or priority) since the model was loaded.",
        |s| s.preemptions as f64,
    );
    counter(
        out,
        "heddle_scheduler_refused_total",
        "Requests the scheduler refused because its waiting queue was full.",
        |s| s.refused as f64,
    );
    counter(
        out,
        "heddle_scheduler_displaced_total",
        "Waiting requests displaced from a full queue by more urgent ones.",
        |s| s.displaced as f64,
    );
}

/// Writes one metric family: its HELP and TYPE lines, then its samples.
pub(crate) struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl<'a> Family<'a> {
    pub(crate) fn new(out: &'a mut String, name: &'a str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    pub(crate) fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label(value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", format_value(value));
    }

    fn histogram(&mut self, model: &str, histogram: &Histogram) {
        let state = histogram.snapshot();
        let mut cumulative = 0u64;
        for (bound, count) in histogram.bounds.iter().zip(&state.counts) {
            cumulative += count;
            let le = format_value(*bound);
            self.sample(
                "_bucket",
                &[("model", model), ("le", &le)],
                cumulative as f64,
            );
        }
        cumulative += state.counts[histogram.bounds.len()];
        self.sample(
            "_bucket",
            &[("model", model), ("le", "+Inf")],
            cumulative as f64,
        );
        self.sample("_sum", &[("model", model)], state.sum);
        self.sample("_count", &[("model", model)], cumulative as f64);
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn format_value(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(model: &str, stats: SchedulerStats) -> EngineReport {
        EngineReport {
            model: model.to_string(),
            stats,
            health: EngineHealth::Running,
        }
    }

    #[test]
    fn an_ending_is_counted_with_its_latency_and_tokens() {
        let metrics = Metrics::default();
        let model = metrics.model("m");
        model.record_finish(FinishReason::Cancelled, Duration::from_millis(30), 12, 3);
        let text = metrics.render(&[]);
        assert!(
            text.contains("heddle_sequences_finished_total{model=\"m\",reason=\"cancelled\"} 1\n")
        );
        assert!(text.contains("heddle_end_to_end_latency_seconds_count{model=\"m\"} 1\n"));
        assert!(text.contains("heddle_prompt_tokens_total{model=\"m\"} 12\n"));
        assert!(text.contains("heddle_generation_tokens_total{model=\"m\"} 3\n"));
    }

    #[test]
    fn histograms_are_cumulative_with_inf_sum_and_count() {
        let metrics = Metrics::default();
        let model = metrics.model("m");
        model.time_to_first_token.observe(0.003);
        model.time_to_first_token.observe(0.2);
        model.time_to_first_token.observe(1000.0);
        let text = metrics.render(&[]);
        assert!(text
            .contains("heddle_time_to_first_token_seconds_bucket{model=\"m\",le=\"0.005\"} 1\n"));
        assert!(
            text.contains("heddle_time_to_first_token_seconds_bucket{model=\"m\",le=\"0.25\"} 2\n")
        );
        assert!(
            text.contains("heddle_time_to_first_token_seconds_bucket{model=\"m\",le=\"+Inf\"} 3\n")
        );
        assert!(text.contains("heddle_time_to_first_token_seconds_count{model=\"m\"} 3\n"));
        assert!(text.contains("heddle_time_to_first_token_seconds_sum{model=\"m\"} 1000.203\n"));
    }

    #[test]
    fn scheduler_stats_become_labelled_gauges() {
        let mut stats = SchedulerStats {
            waiting: [1, 2, 3],
            running: 4,
            ..SchedulerStats::default()
        };
        stats.kv.total_blocks = 64;
        stats.kv.used_blocks = 5;
        stats.kv.prefix_hit_tokens = 30;
        stats.kv.prefix_miss_tokens = 10;
        let text = Metrics::default().render(&[report("a\"b", stats)]);
        assert!(text.contains("heddle_queue_depth{model=\"a\\\"b\",priority=\"low\"} 3\n"));
        assert!(text.contains("heddle_running_sequences{model=\"a\\\"b\"} 4\n"));
        assert!(text.contains("heddle_kv_blocks_used{model=\"a\\\"b\"} 5\n"));
        assert!(text.contains("heddle_prefix_cache_hit_rate{model=\"a\\\"b\"} 0.75\n"));
    }

    #[test]
    fn batch_lines_move_from_queued_to_running_to_an_ending() {
        let metrics = Metrics::default();
        let lines = metrics.batch_lines("m");
        lines.add_queued(4);
        lines.start_running();
        lines.start_running();
        lines.stop_running(Some(true));
        lines.stop_running(Some(false));
        lines.start_running();
        lines.stop_running(None);
        lines.remove_queued(1);
        let text = metrics.render(&[]);
        assert!(
            text.contains("heddle_batch_lines_queued{model=\"m\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("heddle_batch_lines_running{model=\"m\"} 0\n"));
        assert!(text.contains("heddle_batch_lines_completed_total{model=\"m\"} 1\n"));
        assert!(text.contains("heddle_batch_lines_failed_total{model=\"m\"} 1\n"));
    }

    #[test]
    fn every_family_is_declared_once() {
        let metrics = Metrics::default();
        metrics.model("a");
        metrics.model("b");
        let engines = [
            report("a", SchedulerStats::default()),
            report("b", SchedulerStats::default()),
        ];
        let text = metrics.render(&engines);
        let mut seen = std::collections::HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(seen.insert(line.to_string()), "declared twice: {line}");
        }
    }
}
