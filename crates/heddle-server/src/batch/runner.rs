//! The batch runner: one task per unfinished batch drives it through its statuses, and
//! each model has a fixed number of batch slots (`batch_lines_in_flight`), so that batch
//! lines never flood a waiting queue and interactive requests keep their latency.
//!
//! A line holds its slot from submission to its committed result. A line the server
//! cannot take now (429, 503) waits and is tried again with backoff; the batch's
//! completion window bounds how long. Cancelling a batch, its expiry and the server's
//! shutdown drop the lines in flight at once — their engine requests are cancelled and
//! nothing is recorded for them, so a restart runs them again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::input;
use super::line::{self, Attempt};
use super::objects::{BatchEndpoint, BatchLineError, BatchStatus};
use super::store::{BatchRecord, PendingLine, Store, StoreError, StoreResult, UnrunLines};
use crate::api::auth::Caller;
use crate::api::{unix_now, AppState};
use crate::metrics::BatchLineMetrics;

/// The first pause before a line the server could not take is tried again; it doubles up
/// to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(250);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// The metrics label of lines whose `model` is no served model (they fail at once).
const UNKNOWN_MODEL: &str = "unknown";

const CANCELLED_LINES: UnrunLines = UnrunLines {
    code: "batch_cancelled",
    message: "The batch was cancelled before this request ran.",
};
const EXPIRED_LINES: UnrunLines = UnrunLines {
    code: "batch_expired",
    message: "This request could not be executed before the completion window expired.",
};

/// Runs every unfinished batch; shared by the HTTP handlers through [`AppState`].
pub struct BatchRunner {
    pub store: Store,
    lines_in_flight: usize,
    /// Each model's batch slots.
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
    running: Mutex<HashMap<String, RunningBatch>>,
    stopping: watch::Sender<bool>,
}

struct RunningBatch {
    cancel: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Why a batch's lines stopped before all had run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Interruption {
    Cancelled,
    Stopped,
    Expired,
}

/// What ends a batch's lines early: its cancellation, the server's shutdown, its expiry.
#[derive(Clone)]
struct Interrupt {
    cancelled: watch::Receiver<bool>,
    stopping: watch::Receiver<bool>,
    deadline: tokio::time::Instant,
}

impl Interrupt {
    async fn wait(&mut self) -> Interruption {
        async fn raised(flag: &mut watch::Receiver<bool>) {
            if flag.wait_for(|raised| *raised).await.is_err() {
                // Its sender is gone: it can no longer be raised.
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            () = raised(&mut self.cancelled) => Interruption::Cancelled,
            () = raised(&mut self.stopping) => Interruption::Stopped,
            () = tokio::time::sleep_until(self.deadline) => Interruption::Expired,
        }
    }

    /// The interruption already raised, if any.
    fn raised(&self) -> Option<Interruption> {
        if *self.cancelled.borrow() {
            Some(Interruption::Cancelled)
        } else if *self.stopping.borrow() {
            Some(Interruption::Stopped)
        } else if tokio::time::Instant::now() >= self.deadline {
            Some(Interruption::Expired)
        } else {
            None
        }
    }
}

impl BatchRunner {
    pub fn new(store: Store, lines_in_flight: usize) -> Self {
        BatchRunner {
            store,
            lines_in_flight,
            slots: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            stopping: watch::Sender::new(false),
        }
    }

    /// Starts driving a batch, unless it is already driven or the server is stopping.
    pub fn launch(&self, state: &AppState, id: &str) {
        let mut running = self.running_batches();
        if *self.stopping.borrow() || running.contains_key(id) {
            return;
        }
        let (cancel, cancelled) = watch::channel(false);
        let task = tokio::spawn(drive(state.clone(), id.to_string(), cancelled));
        running.insert(id.to_string(), RunningBatch { cancel, task });
    }

    /// Resumes every batch a previous run left unfinished.
    pub async fn resume(&self, state: &AppState) -> StoreResult<usize> {
        let ids = self.store.unfinished_batches().await?;
        for id in &ids {
            self.launch(state, id);
        }
        Ok(ids.len())
    }

    /// Tells a batch's task that the batch was cancelled (its status already says so).
    pub fn cancel(&self, id: &str) {
        if let Some(batch) = self.running_batches().get(id) {
            batch.cancel.send_replace(true);
        }
    }

    /// Stops every batch now: lines in flight are dropped and run again after a restart.
    pub fn stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Waits until every batch task has stopped (after [`Self::stop`]).
    pub async fn stopped(&self) {
        let batches: Vec<RunningBatch> = self.running_batches().drain().map(|(_, b)| b).collect();
        for batch in batches {
            let _ = batch.task.await;
        }
    }

    fn running_batches(&self) -> std::sync::MutexGuard<'_, HashMap<String, RunningBatch>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slots(&self, model: &str) -> Arc<Semaphore> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(model.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.lines_in_flight)))
            .clone()
    }
}

/// A batch's task: moves it through its statuses until it ends or the server stops.
async fn drive(state: AppState, id: String, cancelled: watch::Receiver<bool>) {
    if let Err(error) = drive_statuses(&state, &id, cancelled).await {
        tracing::error!(
            batch = %id,
            %error,
            "the batch stopped on a database error; it resumes when the server restarts"
        );
    }
    state.batches.running_batches().remove(&id);
}

async fn drive_statuses(
    state: &AppState,
    id: &str,
    cancelled: watch::Receiver<bool>,
) -> StoreResult<()> {
    let store = &state.batches.store;
    loop {
        let Some(batch) = store.batch(id.to_string()).await? else {
            return Ok(());
        };
        let now = unix_now();
        let interrupt = Interrupt {
            cancelled: cancelled.clone(),
            stopping: state.batches.stopping.subscribe(),
            // A second late, so that the wall clock has passed `expires_at` by then.
            deadline: tokio::time::Instant::now()
                + Duration::from_secs(batch.object.expires_at.saturating_sub(now) + 1),
        };
        if interrupt.raised() == Some(Interruption::Stopped) {
            return Ok(());
        }
        let expired = now >= batch.object.expires_at;
        match batch.status {
            BatchStatus::Validating | BatchStatus::InProgress if expired => {
                store
                    .finish_batch(id.into(), BatchStatus::Expired, Some(EXPIRED_LINES), now)
                    .await?;
                tracing::info!(batch = %id, "batch expired");
            }
            BatchStatus::Validating => validate(store, &batch).await?,
            BatchStatus::InProgress => {
                match run_lines(state, &batch, interrupt).await? {
                    None => {
                        store
                            .move_status(
                                id.into(),
                                &[BatchStatus::InProgress],
                                BatchStatus::Finalizing,
                                unix_now(),
                            )
                            .await?;
                    }
                    Some(Interruption::Stopped) => return Ok(()),
                    // The status says what to do next.
                    Some(Interruption::Cancelled | Interruption::Expired) => {}
                }
            }
            BatchStatus::Finalizing => {
                store
                    .finish_batch(id.into(), BatchStatus::Completed, None, now)
                    .await?;
                tracing::info!(batch = %id, "batch completed");
            }
            BatchStatus::Cancelling => {
                store
                    .finish_batch(
                        id.into(),
                        BatchStatus::Cancelled,
                        Some(CANCELLED_LINES),
                        now,
                    )
                    .await?;
                tracing::info!(batch = %id, "batch cancelled");
            }
            BatchStatus::Completed
            | BatchStatus::Failed
            | BatchStatus::Expired
            | BatchStatus::Cancelled => return Ok(()),
        }
    }
}

/// Checks the input file: its lines are stored and the batch runs, or it fails with the
/// problems found.
async fn validate(store: &Store, batch: &BatchRecord) -> StoreResult<()> {
    let id = batch.object.id.clone();
    let now = unix_now();
    let Some(endpoint) = BatchEndpoint::parse(&batch.object.endpoint) else {
        let problem = BatchLineError {
            code: "invalid_endpoint".into(),
            message: format!("Unsupported endpoint {:?}.", batch.object.endpoint),
            param: Some("endpoint".into()),
            line: None,
        };
        return store.fail_batch(id, vec![problem], now).await;
    };
    let Some(content) = store
        .file_content(batch.object.input_file_id.clone(), batch.owner.clone())
        .await?
    else {
        let problem = BatchLineError {
            code: "file_not_found".into(),
            message: format!(
                "The input file {} was deleted before the batch started.",
                batch.object.input_file_id
            ),
            param: Some("input_file_id".into()),
            line: None,
        };
        return store.fail_batch(id, vec![problem], now).await;
    };
    let parsed = tokio::task::spawn_blocking(move || input::parse(&content, endpoint))
        .await
        .map_err(|_| StoreError::Panicked)?;
    match parsed {
        Ok(lines) => {
            tracing::info!(batch = %id, lines = lines.len(), "batch validated; running");
            store.start_batch(id, lines, now).await
        }
        Err(problems) => {
            tracing::info!(batch = %id, problems = problems.len(), "batch input refused");
            store.fail_batch(id, problems, now).await
        }
    }
}

/// Runs the lines without a result, each in a slot of its model; None once every one has
/// its result committed, else why they stopped.
async fn run_lines(
    state: &AppState,
    batch: &BatchRecord,
    mut interrupt: Interrupt,
) -> StoreResult<Option<Interruption>> {
    let runner = &state.batches;
    let id = batch.object.id.clone();
    let Some(endpoint) = BatchEndpoint::parse(&batch.object.endpoint) else {
        return Err(StoreError::Corrupt("batch endpoint"));
    };
    let pending = runner.store.pending_lines(id.clone()).await?;
    let caller = Arc::new(batch.caller.clone());

    let label = |line: &PendingLine| match &line.model {
        Some(model) if state.pool.spec(model).is_some() => model.clone(),
        _ => UNKNOWN_MODEL.to_string(),
    };
    let mut queued: HashMap<String, usize> = HashMap::new();
    for line in &pending {
        *queued.entry(label(line)).or_default() += 1;
    }
    for (model, count) in &queued {
        state.metrics.batch_lines(model).add_queued(*count);
    }

    let mut tasks: JoinSet<StoreResult<()>> = JoinSet::new();
    let mut failure = None;
    for line in pending {
        let model = label(&line);
        let slots = runner.slots(&model);
        let permit = tokio::select! {
            permit = slots.acquire_owned() => permit.expect("slots are never closed"),
            _ = interrupt.wait() => break,
        };
        let metrics = state.metrics.batch_lines(&model);
        metrics.start_running();
        if let Some(count) = queued.get_mut(&model) {
            *count -= 1;
        }
        let run = LineRun {
            state: state.clone(),
            batch_id: id.clone(),
            endpoint,
            caller: caller.clone(),
            line,
            metrics,
        };
        let line_interrupt = interrupt.clone();
        tasks.spawn(async move {
            let _slot = permit;
            run.run(line_interrupt).await
        });
        while let Some(done) = tasks.try_join_next() {
            if let Err(error) = joined(done) {
                failure = Some(error);
            }
        }
        if failure.is_some() {
            break;
        }
    }
    for (model, count) in queued {
        state.metrics.batch_lines(&model).remove_queued(count);
    }
    while let Some(done) = tasks.join_next().await {
        if let Err(error) = joined(done) {
            failure = Some(error);
        }
    }
    match failure {
        Some(error) => Err(error),
        None => Ok(interrupt.raised()),
    }
}

fn joined(done: Result<StoreResult<()>, tokio::task::JoinError>) -> StoreResult<()> {
    done.map_err(|_| StoreError::Panicked)?
}

/// One line in its slot.
struct LineRun {
    state: AppState,
    batch_id: String,
    endpoint: BatchEndpoint,
    caller: Arc<Caller>,
    line: PendingLine,
    metrics: Arc<BatchLineMetrics>,
}

impl LineRun {
    /// Runs the line until it has an answer, then commits it; an interruption drops it
    /// unrecorded.
    async fn run(self, mut interrupt: Interrupt) -> StoreResult<()> {
        let mut pause = FIRST_RETRY_PAUSE;
        let (succeeded, result) = loop {
            let attempt = line::run(
                &self.state,
                &self.caller,
                self.endpoint,
                &self.line.custom_id,
                &self.line.body,
            );
            let attempt = tokio::select! {
                attempt = attempt => attempt,
                _ = interrupt.wait() => {
                    self.metrics.stop_running(None);
                    return Ok(());
                }
            };
            match attempt {
                Attempt::Answered { succeeded, result } => break (succeeded, result),
                Attempt::RetryLater(error) => {
                    tracing::debug!(
                        batch = %self.batch_id,
                        line = self.line.index,
                        reason = %error.message,
                        "batch line deferred"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        _ = interrupt.wait() => {
                            self.metrics.stop_running(None);
                            return Ok(());
                        }
                    }
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                }
            }
        };
        let recorded = self
            .state
            .batches
            .store
            .record_result(
                self.batch_id,
                self.line.index,
                succeeded,
                result.to_string(),
            )
            .await;
        self.metrics
            .stop_running(matches!(recorded, Ok(true)).then_some(succeeded));
        recorded.map(drop)
    }
}
