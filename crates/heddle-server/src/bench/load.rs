//! Sends a run's requests on their schedule, under a concurrency limit, and shows
//! progress on stderr.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::Semaphore;

use super::client::BenchClient;
use super::dataset::BenchPrompt;
use super::stats::RequestRecord;

/// One run: which prompts, when each is due, and how many may be in flight at once.
pub struct LoadPlan<'a> {
    pub label: &'a str,
    pub prompts: &'a [BenchPrompt],
    /// When each prompt is due, from the start of the run.
    pub offsets: &'a [Duration],
    /// None: no limit.
    pub max_concurrency: Option<usize>,
    pub show_progress: bool,
}

/// Runs the plan; returns one record per prompt, in the prompts' order, and the time
/// from the start to the end of the last response.
pub async fn run_load(client: &BenchClient, plan: &LoadPlan<'_>) -> (Vec<RequestRecord>, Duration) {
    assert_eq!(plan.prompts.len(), plan.offsets.len());
    // A semaphore with as many permits as requests never makes anyone wait.
    let permits = plan.max_concurrency.unwrap_or(plan.prompts.len()).max(1);
    let slots = Semaphore::new(permits);
    let progress = Progress::new(plan.label, plan.prompts.len(), plan.show_progress);
    let start = Instant::now();
    let tokio_start = tokio::time::Instant::from_std(start);
    let requests = plan
        .prompts
        .iter()
        .zip(plan.offsets)
        .map(|(prompt, &offset)| {
            let (slots, progress) = (&slots, &progress);
            async move {
                tokio::time::sleep_until(tokio_start + offset).await;
                let _slot = slots
                    .acquire()
                    .await
                    .expect("the semaphore is never closed");
                let outcome = client.send(prompt).await;
                if let Err(failure) = &outcome {
                    tracing::debug!("request failed: {}", failure.message());
                }
                progress.finished(outcome.is_ok());
                RequestRecord {
                    priority: prompt.priority,
                    expected_prompt_tokens: prompt.prompt_tokens,
                    max_tokens: prompt.output_len,
                    outcome,
                }
            }
        });
    let records = join_all(requests).await;
    let duration = start.elapsed();
    progress.done();
    (records, duration)
}

/// How often the progress line is rewritten on a terminal, and printed anew elsewhere
/// (a log file should not get a line per request).
const TERMINAL_REFRESH: Duration = Duration::from_millis(200);
const LOG_REFRESH: Duration = Duration::from_secs(5);

/// A progress line on stderr.
struct Progress<'a> {
    label: &'a str,
    total: usize,
    enabled: bool,
    terminal: bool,
    start: Instant,
    completed: AtomicUsize,
    failed: AtomicUsize,
    last_shown: Mutex<Instant>,
}

impl<'a> Progress<'a> {
    fn new(label: &'a str, total: usize, enabled: bool) -> Self {
        let start = Instant::now();
        Self {
            label,
            total,
            enabled,
            terminal: std::io::stderr().is_terminal(),
            start,
            completed: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            last_shown: Mutex::new(start),
        }
    }

    fn finished(&self, ok: bool) {
        let counter = if ok { &self.completed } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
        let refresh = if self.terminal {
            TERMINAL_REFRESH
        } else {
            LOG_REFRESH
        };
        let mut last = self.last_shown.lock().expect("progress lock");
        if last.elapsed() >= refresh {
            *last = Instant::now();
            self.show(false);
        }
    }

    fn done(&self) {
        self.show(true);
    }

    fn show(&self, last: bool) {
        if !self.enabled {
            return;
        }
        let completed = self.completed.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        let width = 30;
        let filled = (completed + failed) * width / self.total.max(1);
        let line = format!(
            "[{}] [{}{}] {}/{} done, {failed} failed, {:.1} s",
            self.label,
            "#".repeat(filled),
            "-".repeat(width - filled),
            completed + failed,
            self.total,
            self.start.elapsed().as_secs_f64()
        );
        let mut stderr = std::io::stderr().lock();
        // A terminal gets one line rewritten in place; a log gets whole lines.
        let _ = match (self.terminal, last) {
            (true, false) => write!(stderr, "\r{line}"),
            (true, true) => writeln!(stderr, "\r{line}"),
            (false, _) => writeln!(stderr, "{line}"),
        };
    }
}
