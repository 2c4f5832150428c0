//! The engine: one per loaded model, on its own thread. It owns the model's scheduler and
//! runner and loops: take commands (add, cancel) → schedule → runner step → update →
//! detokenize and match stop strings → send each request's events to its own channel.
//! A closed channel means the client left: the request is cancelled and its blocks freed.
//!
//! Every request ends here exactly once (finished, cancelled, displaced, abandoned by its
//! client or failed), so this is where its latencies and its ending are counted.
//!
//! Failures: a model step that fails ends that step's requests with an error and is never
//! credited (see [`Scheduler::abort_step`]); a panic ends every live request with an
//! error — except requests that have produced nothing and were not in the step that
//! panicked, which are submitted again, unseen by their clients — and the engine then
//! reloads its runner and starts over with an empty scheduler (its health is `Restarting`
//! meanwhile), or stops if it cannot.

use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use heddle_core::scheduler::AddError;
use heddle_core::{
    FinishReason, Priority, Request, RequestId, SamplingParams, ScheduledBatch, Scheduler,
    SchedulerConfig, SchedulerStats, StepEvent, StopCriteria, TokenId,
};
use heddle_model::detokenizer::IncrementalDetokenizer;
use heddle_model::driver::StepDriver;
use heddle_model::grammar::{GrammarCompiler, GrammarError};
use heddle_model::runner::{ModelRunner, SampledOutput};
use heddle_model::stop_strings::StopStringMatcher;
use heddle_model::tokenizer::Tokenizer;
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::faults::{FaultInjection, StepFault};
use crate::kv_events::KvEventSink;
use crate::metrics::ModelMetrics;
use crate::sequence_logits::{self, SequenceLogits};

/// What a caller asks the engine to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<TokenId>,
    pub priority: Priority,
    pub sampling: SamplingParams,
    /// max_tokens, the request's stop token ids and stop strings, ignore_eos; the
    /// model's EOS ids are added by the engine.
    pub stop: StopCriteria,
    /// When the caller received it: latencies are measured from here.
    pub arrived: Instant,
    /// Logit biases and the grammar the output must match.
    pub logits: SequenceLogits,
}

/// Log-probabilities of one generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    /// The most likely alternatives, most likely first.
    pub top: Vec<(TokenId, f32)>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// What a request's channel receives.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// One generated token and the text it completes (possibly empty while a multi-byte
    /// character or a possible stop string is held back).
    Token {
        token: TokenId,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The log-probabilities of the prompt's tokens, for a request with
    /// `prompt_logprobs`: one entry per prompt token, the first `None` (nothing predicts
    /// it). Sent once, before anything else.
    PromptLogprobs(Vec<Option<TokenLogprobs>>),
    /// The request ended; nothing follows. `text` is output held back until now.
    Finished {
        reason: FinishReason,
        text: String,
        usage: TokenCounts,
    },
}

/// Why the engine did not take a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
    /// The request asks, through `param`, for what this engine's runner cannot do.
    #[error("{message}")]
    Unsupported {
        param: &'static str,
        message: &'static str,
    },
    #[error("the waiting queue is full; retry later")]
    QueueFull,
    #[error("the engine has stopped")]
    Stopped,
}

/// A request the engine accepted: its id (for cancellation) and its events.
#[derive(Debug)]
pub struct Submitted {
    pub id: RequestId,
    pub events: async_mpsc::UnboundedReceiver<EngineEvent>,
}

enum Command {
    Add {
        id: RequestId,
        request: Box<GenerationRequest>,
        events: async_mpsc::UnboundedSender<EngineEvent>,
        reply: oneshot::Sender<Result<(), SubmitError>>,
    },
    Cancel(RequestId),
}

/// The clock requests' arrivals are measured on: seconds since the engine started.
fn seconds_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// Whether an engine is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineHealth {
    Running,
    /// It panicked and is reloading its runner; requests sent now wait for it.
    Restarting,
    /// Its thread has ended (it could not reload, or every handle was dropped).
    Stopped,
}

impl EngineHealth {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => EngineHealth::Running,
            1 => EngineHealth::Restarting,
            _ => EngineHealth::Stopped,
        }
    }
}

/// What the engine thread publishes for its handles.
struct Shared {
    stats: Mutex<SchedulerStats>,
    health: AtomicU8,
}

impl Shared {
    fn set_health(&self, health: EngineHealth) {
        self.health.store(health as u8, Ordering::Release);
    }
}

/// Builds a fresh runner and says how many KV blocks it has: how an engine comes back
/// after a panic.
pub type RunnerFactory =
    Box<dyn FnMut() -> anyhow::Result<(Box<dyn ModelRunner>, usize)> + Send + 'static>;

/// How an engine is measured and supervised.
pub struct EngineOptions {
    /// Where its requests' latencies and endings are counted.
    pub metrics: Arc<ModelMetrics>,
    pub faults: Arc<FaultInjection>,
    /// Reloads the runner after a panic; without it a panicked engine stops.
    pub reload: Option<RunnerFactory>,
    /// Where the prefix cache's changes are published (`--kv-events-endpoint`).
    pub kv_events: Option<KvEventSink>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            metrics: Arc::new(ModelMetrics::default()),
            faults: Arc::new(FaultInjection::default()),
            reload: None,
            kv_events: None,
        }
    }
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
    shared: Arc<Shared>,
    tokenizer: Arc<Tokenizer>,
    grammars: Arc<Grammars>,
}

/// The model's grammar compiler, built on first use (indexing the vocabulary takes a
/// moment that requests without a grammar need not pay).
struct Grammars {
    compiler: OnceLock<Result<GrammarCompiler, GrammarError>>,
    vocab_size: usize,
    /// Whether the runner applies masks and biases; if not, requests that need them are
    /// refused.
    supported: bool,
}

impl EngineHandle {
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Whether this engine's runner can apply grammar masks and logit biases.
    pub fn applies_logits_adjustments(&self) -> bool {
        self.grammars.supported
    }

    /// The compiler of grammars over this model's vocabulary. The first call builds it:
    /// call it off the async threads.
    pub fn grammar_compiler(&self) -> Result<&GrammarCompiler, GrammarError> {
        self.grammars
            .compiler
            .get_or_init(|| GrammarCompiler::new(self.tokenizer.clone(), self.grammars.vocab_size))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The scheduler's counters as of the last step.
    pub fn stats(&self) -> SchedulerStats {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn health(&self) -> EngineHealth {
        EngineHealth::from_u8(self.shared.health.load(Ordering::Acquire))
    }

    /// Hands a request to the engine; the answer says whether it was queued.
    pub async fn submit(&self, request: GenerationRequest) -> Result<Submitted, SubmitError> {
        let (id, reply) = self.send_add(request)?;
        reply.0.await.map_err(|_| SubmitError::Stopped)??;
        Ok(Submitted {
            id,
            events: reply.1,
        })
    }

    /// [`Self::submit`] for callers outside an async runtime.
    pub fn submit_blocking(&self, request: GenerationRequest) -> Result<Submitted, SubmitError> {
        let (id, reply) = self.send_add(request)?;
        reply
            .0
            .blocking_recv()
            .map_err(|_| SubmitError::Stopped)??;
        Ok(Submitted {
            id,
            events: reply.1,
        })
    }

    /// Cancels a request wherever it is; unknown ids are ignored.
    pub fn cancel(&self, id: RequestId) {
        let _ = self.commands.send(Command::Cancel(id));
    }

    #[allow(clippy::type_complexity)]
    fn send_add(
        &self,
        request: GenerationRequest,
    ) -> Result<
        (
            RequestId,
            (
                oneshot::Receiver<Result<(), SubmitError>>,
                async_mpsc::UnboundedReceiver<EngineEvent>,
            ),
        ),
        SubmitError,
    > {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, events_rx) = async_mpsc::unbounded_channel();
        let (reply, reply_rx) = oneshot::channel();
        self.commands
            .send(Command::Add {
                id,
                request: Box::new(request),
                events,
                reply,
            })
            .map_err(|_| SubmitError::Stopped)?;
        Ok((id, (reply_rx, events_rx)))
    }
}

/// A request the engine is working on.
struct Live {
    events: async_mpsc::UnboundedSender<EngineEvent>,
    detokenizer: IncrementalDetokenizer,
    stops: StopStringMatcher,
    /// A stop string matched: the rest of the output is dropped.
    stopped: bool,
    logits: SequenceLogits,
    wants_logprobs: bool,
    /// The prompt's log-probabilities by position, filled as its chunks are computed
    /// (a recompute after preemption overwrites), until they are sent with the first
    /// token; None when not asked for or already sent.
    prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// `max_tokens: 0` (to score the prompt): nothing is generated. The scheduler runs it
    /// for one token, which is dropped.
    generates_nothing: bool,
    usage: TokenCounts,
    arrived: Instant,
    last_token: Option<Instant>,
    /// The request as the scheduler took it, until its first token: a restart after a
    /// panic submits it again (once).
    resubmit: Option<Request>,
}

impl Live {
    /// Counts the request's ending: every request passes here exactly once.
    fn record_end(&self, reason: FinishReason, metrics: &ModelMetrics) {
        metrics.record_finish(
            reason,
            self.arrived.elapsed(),
            self.usage.prompt_tokens,
            self.usage.completion_tokens,
        );
    }

    /// Sends the request's last event, with any held-back text, and counts its ending.
    fn finish(mut self, reason: FinishReason, metrics: &ModelMetrics) {
        self.record_end(reason, metrics);
        let text = if self.stopped {
            String::new()
        } else {
            // Bytes of an unfinished character, then whatever was held back as a possible
            // stop string: the output is complete, so it is not one.
            let rest = self.detokenizer.finish().unwrap_or_default();
            let scan = self.stops.push(&rest);
            if scan.stop.is_some() {
                scan.text
            } else {
                scan.text + &self.stops.finish()
            }
        };
        let _ = self.events.send(EngineEvent::Finished {
            reason,
            text,
            usage: self.usage,
        });
    }
}

/// The engine thread's state.
pub struct Engine {
    scheduler: Scheduler,
    runner: Box<dyn ModelRunner>,
    tokenizer: Arc<Tokenizer>,
    live: HashMap<RequestId, Live>,
    /// Schedules each step and applies its outputs, its buffers reused from step to step.
    driver: StepDriver,
    shared: Arc<Shared>,
    metrics: Arc<ModelMetrics>,
    faults: Arc<FaultInjection>,
    started: Instant,
    kv_events: Option<KvEventSink>,
}

/// How long an idle engine waits for a command before checking again.
const IDLE_WAIT: Duration = Duration::from_millis(50);

impl Engine {
    /// Starts an engine thread for `runner`; stops when every handle is dropped.
    pub fn spawn(
        name: &str,
        runner: Box<dyn ModelRunner>,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
    ) -> anyhow::Result<(EngineHandle, JoinHandle<()>)> {
        Self::spawn_with(name, runner, tokenizer, config, EngineOptions::default())
    }

    /// [`Self::spawn`] with metrics, faults and a way to reload after a panic.
    pub fn spawn_with(
        name: &str,
        runner: Box<dyn ModelRunner>,
        tokenizer: Arc<Tokenizer>,
        config: SchedulerConfig,
        options: EngineOptions,
    ) -> anyhow::Result<(EngineHandle, JoinHandle<()>)> {
        let scheduler = Scheduler::new(config)?;
        let shared = Arc::new(Shared {
            stats: Mutex::new(scheduler.stats()),
            health: AtomicU8::new(EngineHealth::Running as u8),
        });
        let (commands, commands_rx) = mpsc::channel();
        let grammars = Grammars {
            compiler: OnceLock::new(),
            vocab_size: runner.config().vocab_size,
            supported: runner.applies_logits_adjustments(),
        };
        let handle = EngineHandle {
            commands,
            next_id: Arc::new(AtomicU64::new(1)),
            shared: shared.clone(),
            tokenizer: tokenizer.clone(),
            grammars: Arc::new(grammars),
        };
        let engine = Engine::new(
            scheduler,
            runner,
            tokenizer,
            shared,
            options.metrics,
            options.faults,
            Instant::now(),
            options.kv_events,
        );
        let name = name.to_string();
        let reload = options.reload;
        let thread = std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || supervise(engine, commands_rx, reload, &name))?;
        Ok((handle, thread))
    }

    /// An engine with no request yet. With a KV event sink, its fresh scheduler records
    /// the prefix cache's changes, and "all cleared" is published at once.
    #[allow(clippy::too_many_arguments)]
    fn new(
        mut scheduler: Scheduler,
        runner: Box<dyn ModelRunner>,
        tokenizer: Arc<Tokenizer>,
        shared: Arc<Shared>,
        metrics: Arc<ModelMetrics>,
        faults: Arc<FaultInjection>,
        started: Instant,
        kv_events: Option<KvEventSink>,
    ) -> Self {
        if let Some(sink) = &kv_events {
            scheduler.enable_kv_events();
            // "All cleared" goes out now, not with the first step: subscribers forget an
            // engine that restarted even before it gets a request.
            sink.publish(scheduler.drain_kv_events());
        }
        Engine {
            scheduler,
            runner,
            tokenizer,
            live: HashMap::new(),
            driver: StepDriver::default(),
            shared,
            metrics,
            faults,
            started,
            kv_events,
        }
    }

    /// The engine after a panic: a fresh runner and an empty scheduler (nothing the old one
    /// cached can be trusted), the same handles, metrics and clock; the requests kept by
    /// [`Self::fail_after_panic`] are submitted again. The old runner is dropped before the
    /// new one loads, so a GPU's memory is not needed twice. If it cannot reload, the kept
    /// requests end with an error too.
    fn restart(self, reload: &mut RunnerFactory) -> anyhow::Result<Engine> {
        let Engine {
            scheduler,
            runner,
            tokenizer,
            live,
            shared,
            metrics,
            faults,
            started,
            kv_events,
            ..
        } = self;
        let config = scheduler.config().clone();
        drop(scheduler);
        drop(runner);
        faults.wait_while_restarts_held();
        let fresh = reload().and_then(|(runner, num_blocks)| {
            let scheduler = Scheduler::new(SchedulerConfig {
                num_blocks,
                ..config
            })?;
            Ok((runner, scheduler))
        });
        let (runner, scheduler) = match fresh {
            Ok(fresh) => fresh,
            Err(error) => {
                for (_, request) in live {
                    request.finish(FinishReason::Error, &metrics);
                }
                return Err(error);
            }
        };
        let mut engine = Engine::new(
            scheduler, runner, tokenizer, shared, metrics, faults, started, kv_events,
        );
        let mut kept: Vec<(RequestId, Live)> = live.into_iter().collect();
        kept.sort_by_key(|(_, request)| request.arrived);
        for (id, mut request) in kept {
            let core_request = request
                .resubmit
                .take()
                .expect("only requests that can be submitted again are kept");
            match engine.scheduler.add(core_request) {
                Ok(outcome) => {
                    engine.live.insert(id, request);
                    if let heddle_core::AddOutcome::QueuedDisplacing(victim) = outcome {
                        engine.end(victim, FinishReason::Cancelled);
                    }
                }
                Err(_) => request.finish(FinishReason::Error, &engine.metrics),
            }
        }
        engine.publish_stats();
        Ok(engine)
    }

    fn run(&mut self, commands: &mpsc::Receiver<Command>) {
        loop {
            // Block only when there is nothing to compute (nor a step in flight to collect).
            if !self.scheduler.has_work() && !self.driver.has_pending_step() {
                match commands.recv_timeout(IDLE_WAIT) {
                    Ok(command) => self.apply(command),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => self.apply(command),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        if !self.scheduler.has_work() {
                            return;
                        }
                        break;
                    }
                }
            }
            self.drop_abandoned();
            self.step();
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Add {
                id,
                request,
                events,
                reply,
            } => {
                let answer = self.add(id, *request, events);
                let _ = reply.send(answer);
            }
            Command::Cancel(id) => {
                if self.scheduler.cancel(id) {
                    self.end(id, FinishReason::Cancelled);
                }
            }
        }
    }

    fn add(
        &mut self,
        id: RequestId,
        request: GenerationRequest,
        events: async_mpsc::UnboundedSender<EngineEvent>,
    ) -> Result<(), SubmitError> {
        let GenerationRequest {
            prompt,
            priority,
            mut sampling,
            mut stop,
            arrived,
            logits,
        } = request;
        if sampling.prompt_logprobs.is_some() && !self.runner.computes_prompt_logprobs() {
            return Err(SubmitError::Unsupported {
                param: "echo",
                message: "This model's runner cannot compute prompt log-probabilities: `echo` \
                          with `logprobs` is refused on it.",
            });
        }
        let generates_nothing = stop.max_tokens == 0;
        if generates_nothing {
            stop.max_tokens = 1;
        }
        if !logits.is_unchanged() && !self.runner.applies_logits_adjustments() {
            return Err(SubmitError::Invalid(
                "This model's runner cannot apply grammar masks or logit biases: \
                 `response_format`, the guided_* fields and `logit_bias` are refused on it."
                    .into(),
            ));
        }
        // Every request gets a seed, so its sampling never depends on the batch.
        sampling.seed.get_or_insert_with(rand::random);
        stop.eos_token_ids = self.tokenizer.stop_token_ids().to_vec();
        let stops = StopStringMatcher::new(&stop.stop_strings);
        let prompt_tokens = prompt.len();
        let wants_logprobs = sampling.logprobs || sampling.top_logprobs > 0;
        let prompt_logprobs = sampling.prompt_logprobs.map(|_| vec![None; prompt_tokens]);
        let core_request = Request {
            id,
            prompt,
            priority,
            sampling,
            stop,
            arrival: seconds_since(self.started),
        };
        let resubmit = core_request.clone();
        match self.scheduler.add(core_request) {
            Ok(outcome) => {
                if let heddle_core::AddOutcome::QueuedDisplacing(victim) = outcome {
                    self.end(victim, FinishReason::Cancelled);
                }
                self.live.insert(
                    id,
                    Live {
                        events,
                        detokenizer: IncrementalDetokenizer::new(self.tokenizer.clone(), true),
                        stopped: false,
                        logits,
                        stops,
                        wants_logprobs,
                        prompt_logprobs,
                        generates_nothing,
                        usage: TokenCounts {
                            prompt_tokens,
                            ..TokenCounts::default()
                        },
                        arrived,
                        last_token: None,
                        resubmit: Some(resubmit),
                    },
                );
                self.metrics.record_accepted();
                self.publish_stats();
                Ok(())
            }
            Err(AddError::QueueFull) => Err(SubmitError::QueueFull),
            Err(AddError::Invalid(e)) => Err(SubmitError::Invalid(e.to_string())),
        }
    }

    /// Cancels requests whose client is gone.
    fn drop_abandoned(&mut self) {
        let gone: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(_, live)| live.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.scheduler.cancel(id);
            if let Some(live) = self.live.remove(&id) {
                live.record_end(FinishReason::Cancelled, &self.metrics);
            }
        }
    }

    /// One step, then what it changed in the prefix cache (blocks evicted while
    /// scheduling, blocks cached by the update) goes to the KV event subscribers.
    fn step(&mut self) {
        self.compute_step();
        if let Some(sink) = &self.kv_events {
            sink.publish(self.scheduler.drain_kv_events());
        }
    }

    /// One step, queued behind the one in flight where the runner can (see
    /// [`Self::overlaps_steps`]), else by itself; then its tokens are delivered.
    fn compute_step(&mut self) {
        let started = Instant::now();
        let mut failed_grammars = Vec::new();
        let overlap = self.overlaps_steps();
        let computed = if overlap || self.driver.has_pending_step() {
            self.overlapped_step(overlap)
        } else {
            self.single_step(&mut failed_grammars)
        };
        let Some((outputs, events)) = computed else {
            self.publish_stats();
            return;
        };
        for scored in self.runner.take_prompt_logprobs() {
            let slot = self
                .live
                .get_mut(&scored.id)
                .and_then(|live| live.prompt_logprobs.as_mut())
                .and_then(|prompt| prompt.get_mut(scored.position));
            if let Some(slot) = slot {
                *slot = Some(TokenLogprobs {
                    logprob: scored.logprob,
                    top: scored.top_logprobs,
                });
            }
        }
        let mut grammars = self.advance_grammars(&events);
        // `update` reports at most one event per sampled token, in the same order, so
        // each event's output is found by walking the outputs once.
        let mut remaining = outputs.iter();
        for event in events {
            let output = remaining.by_ref().find(|o| o.id == event.id);
            if let Some((_, error)) = failed_grammars.iter().find(|(id, _)| *id == event.id) {
                tracing::error!(%error, id = event.id, "the grammar failed; failing its request");
                let _ = self.scheduler.finish(event.id, FinishReason::Error);
                self.end(event.id, FinishReason::Error);
                continue;
            }
            let grammar = grammars.remove(&event.id);
            self.deliver(event.id, event.token, event.finish, output, grammar);
        }
        self.publish_stats();
        self.metrics
            .engine_step
            .observe(started.elapsed().as_secs_f64());
    }

    /// Whether the next step is queued behind the one in flight: the runner can, no live
    /// request's logits are adjusted (their masks come between a step's forward pass and
    /// its sampler, from the tokens before), and no fault is armed (faults are injected
    /// into steps run by themselves).
    fn overlaps_steps(&mut self) -> bool {
        !self.faults.armed()
            && self.live.values().all(|live| live.logits.is_unchanged())
            && self.runner.overlapped().is_some()
    }

    /// Records the prompt tokens that `batch` found in the prefix cache for the requests
    /// it admits.
    fn record_cached_tokens(
        live: &mut HashMap<RequestId, Live>,
        batch: &ScheduledBatch,
        scheduler: &Scheduler,
    ) {
        for seq in batch.seqs.iter().filter(|s| s.num_generated == 0) {
            if let (Some(live), Some(cached)) = (
                live.get_mut(&seq.id),
                scheduler.cached_prompt_tokens(seq.id),
            ) {
                live.usage.cached_tokens = cached;
            }
        }
    }

    /// Schedules and runs one step by itself; its outputs and the scheduler's events, or
    /// None when nothing was scheduled or the step failed (its requests then ended).
    fn single_step(
        &mut self,
        failed_grammars: &mut Vec<(RequestId, String)>,
    ) -> Option<(Vec<SampledOutput>, Vec<StepEvent>)> {
        let batch = self.driver.schedule(&mut self.scheduler);
        if batch.is_empty() {
            return None;
        }
        Self::record_cached_tokens(&mut self.live, batch, &self.scheduler);
        let model_started = Instant::now();
        let result = match self.faults.take() {
            None => self.run_model(failed_grammars),
            Some(StepFault::Fail) => Err("an injected step failure".to_string()),
            Some(StepFault::Panic) => panic!("an injected engine panic"),
        };
        self.metrics
            .model_step
            .observe(model_started.elapsed().as_secs_f64());
        match result {
            Ok(outputs) => {
                let events = self.driver.update(&mut self.scheduler, &outputs);
                Some((outputs, events))
            }
            Err(error) => {
                tracing::error!(%error, "model step failed; failing its requests");
                for id in self.scheduler.abort_step() {
                    self.end(id, FinishReason::Error);
                }
                None
            }
        }
    }

    /// Collects the step in flight (or runs one if none is), with `ahead` queueing the
    /// next one behind it first; as [`Self::single_step`] returns.
    fn overlapped_step(&mut self, ahead: bool) -> Option<(Vec<SampledOutput>, Vec<StepEvent>)> {
        let runner = self
            .runner
            .overlapped()
            .expect("only a runner that overlaps steps launches them");
        let live = &mut self.live;
        let model_started = Instant::now();
        let result =
            self.driver
                .step_overlapped(&mut self.scheduler, runner, ahead, |batch, scheduler| {
                    Self::record_cached_tokens(live, batch, scheduler)
                });
        self.metrics
            .model_step
            .observe(model_started.elapsed().as_secs_f64());
        match result {
            Ok(step) => step.map(|step| {
                if step.launched_ahead {
                    self.metrics.record_overlapped_step();
                }
                (step.outputs, step.events)
            }),
            Err(failed) => {
                tracing::error!(error = %failed.error, "model step failed; failing its requests");
                for id in failed.ended {
                    self.end(id, FinishReason::Error);
                }
                None
            }
        }
    }

    /// Advances the grammars of the sequences that accepted a token this step, all at
    /// once on the mask threads; by sequence, whether the grammar is now complete, or why
    /// it refused the token.
    fn advance_grammars(
        &mut self,
        events: &[StepEvent],
    ) -> HashMap<RequestId, Result<bool, String>> {
        if self
            .live
            .values()
            .all(|live| live.logits.constraint.is_none())
        {
            return HashMap::new();
        }
        let tokens: HashMap<RequestId, TokenId> = events.iter().map(|e| (e.id, e.token)).collect();
        let accepted: Vec<_> = self
            .live
            .iter_mut()
            .filter_map(|(id, live)| {
                let token = *tokens.get(id)?;
                Some((*id, live.logits.constraint.as_mut()?, token))
            })
            .collect();
        sequence_logits::accept_tokens(accepted)
            .into_iter()
            .collect()
    }

    /// Runs the model on the scheduled batch. Sequences sampled this step that have logit
    /// adjustments get them from a worker that computes their grammar masks alongside the
    /// forward pass; those whose grammar failed are added to `failed_grammars`.
    fn run_model(
        &mut self,
        failed_grammars: &mut Vec<(RequestId, String)>,
    ) -> Result<Vec<SampledOutput>, String> {
        let batch = self.driver.batch();
        let adjusted: Vec<(RequestId, &mut SequenceLogits)> =
            if self.live.values().all(|live| live.logits.is_unchanged()) {
                Vec::new()
            } else {
                let sampled: HashSet<RequestId> = batch
                    .seqs
                    .iter()
                    .filter(|s| s.needs_logits)
                    .map(|s| s.id)
                    .collect();
                self.live
                    .iter_mut()
                    .filter(|(id, live)| !live.logits.is_unchanged() && sampled.contains(id))
                    .map(|(&id, live)| (id, &mut live.logits))
                    .collect()
            };
        if adjusted.is_empty() {
            return self
                .runner
                .step(batch, &self.scheduler)
                .map_err(|e| e.to_string());
        }
        let (runner, scheduler, metrics) = (&mut self.runner, &self.scheduler, &self.metrics);
        // The masks are computed on the mask threads (no thread is started per step) while
        // this thread runs the step; the runner waits for them only before sampling.
        sequence_logits::mask_pool().in_place_scope(|scope| {
            let (sender, receiver) = mpsc::sync_channel(1);
            scope.spawn(move |_| {
                let _ = sender.send(sequence_logits::compute(adjusted));
            });
            let pending = Box::new(|| {
                let waiting = Instant::now();
                let computed = receiver
                    .recv()
                    .map_err(|_| "the grammar mask worker panicked".to_string())?;
                metrics.record_grammar_masks(
                    computed.masked,
                    computed.mask_time,
                    waiting.elapsed(),
                );
                *failed_grammars = computed.failed;
                Ok(computed.adjustments)
            });
            runner
                .step_adjusted(batch, scheduler, pending)
                .map_err(|e| e.to_string())
        })
    }

    /// Turns one sampled token into text and events, applying stop strings. `grammar` is
    /// the sequence's grammar after the token (see [`Self::advance_grammars`]).
    fn deliver(
        &mut self,
        id: RequestId,
        token: TokenId,
        finish: Option<FinishReason>,
        output: Option<&SampledOutput>,
        grammar: Option<Result<bool, String>>,
    ) {
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        // The whole prompt was computed before this first token was sampled.
        if let Some(prompt) = live.prompt_logprobs.take() {
            debug_assert!(prompt.iter().skip(1).all(Option::is_some));
            let _ = live.events.send(EngineEvent::PromptLogprobs(prompt));
        }
        if live.generates_nothing {
            // Its only token, sampled because a step that ends a prompt samples one: the
            // scheduler has already ended it (its max_tokens was 1).
            self.end(id, FinishReason::Length);
            return;
        }
        live.usage.completion_tokens += 1;
        let now = Instant::now();
        match live.last_token.replace(now) {
            None => {
                live.resubmit = None;
                self.metrics
                    .time_to_first_token
                    .observe((now - live.arrived).as_secs_f64());
            }
            Some(previous) => self
                .metrics
                .inter_token_latency
                .observe((now - previous).as_secs_f64()),
        }
        // A stop token ends the output; its text is not part of it.
        let stop_token = finish == Some(FinishReason::Stop);
        // The grammar advances with every accepted token; once complete, it ends the
        // output (the stop token it would force next adds nothing).
        let mut finish = finish;
        match grammar {
            Some(Err(error)) => {
                tracing::error!(%error, id, token, "a token the grammar refuses was sampled");
                let _ = self.scheduler.finish(id, FinishReason::Error);
                self.end(id, FinishReason::Error);
                return;
            }
            Some(Ok(true)) if finish.is_none() => {
                let _ = self.scheduler.finish(id, FinishReason::Stop);
                finish = Some(FinishReason::Stop);
            }
            _ => {}
        }
        let piece = if stop_token {
            Ok(String::new())
        } else {
            live.detokenizer.push(token)
        };
        let piece = match piece {
            Ok(piece) => piece,
            Err(error) => {
                tracing::error!(%error, id, token, "detokenization failed");
                let _ = self.scheduler.finish(id, FinishReason::Error);
                self.end(id, FinishReason::Error);
                return;
            }
        };
        let scan = live.stops.push(&piece);
        let logprobs = output.filter(|_| live.wants_logprobs).and_then(|o| {
            o.logprob.map(|logprob| TokenLogprobs {
                logprob,
                top: o.top_logprobs.clone(),
            })
        });
        let _ = live.events.send(EngineEvent::Token {
            token,
            text: scan.text,
            logprobs,
        });
        let finish = match (scan.stop, finish) {
            (Some(_), None) => {
                // The scheduler still runs it: end it there too.
                let _ = self.scheduler.finish(id, FinishReason::Stop);
                live.stopped = true;
                Some(FinishReason::Stop)
            }
            (Some(_), Some(_)) => {
                live.stopped = true;
                Some(FinishReason::Stop)
            }
            (None, finish) => finish,
        };
        if let Some(reason) = finish {
            self.end(id, reason);
        }
    }

    /// Sends the last event of a request (with any held-back text) and forgets it.
    fn end(&mut self, id: RequestId, reason: FinishReason) {
        // Whoever sees the last event also sees the blocks it freed.
        self.publish_stats();
        self.send_last_event(id, reason);
    }

    fn send_last_event(&mut self, id: RequestId, reason: FinishReason) {
        if let Some(live) = self.live.remove(&id) {
            live.finish(reason, &self.metrics);
        }
    }

    /// After a panic: a request that has produced nothing and was not in the step that
    /// panicked is kept, to be submitted again after the restart (once, so that a request
    /// that makes the engine panic cannot do it forever); every other request ends with an
    /// error. The scheduler is not consulted: the panic may have left it half-updated.
    fn fail_after_panic(&mut self) {
        let in_failed_step: HashSet<RequestId> =
            self.driver.batch().seqs.iter().map(|s| s.id).collect();
        let failed: Vec<RequestId> = self
            .live
            .iter()
            .filter(|(id, live)| live.resubmit.is_none() || in_failed_step.contains(id))
            .map(|(&id, _)| id)
            .collect();
        for id in failed {
            self.send_last_event(id, FinishReason::Error);
        }
    }

    fn publish_stats(&self) {
        *self.shared.stats.lock().unwrap_or_else(|e| e.into_inner()) = self.scheduler.stats();
    }
}

/// The engine thread: runs the engine, and after a panic fails its live requests and
/// restarts it with a reloaded runner (or stops, if it cannot reload).
fn supervise(
    mut engine: Engine,
    commands: mpsc::Receiver<Command>,
    mut reload: Option<RunnerFactory>,
    name: &str,
) {
    // Whatever this engine cached is gone once it stops (unloaded, or unable to restart).
    let kv_events = engine.kv_events.clone();
    let announce_stopped = || {
        if let Some(sink) = &kv_events {
            sink.publish(vec![heddle_core::KvCacheEvent::AllBlocksCleared]);
        }
    };
    loop {
        let Err(panic) = catch_unwind(AssertUnwindSafe(|| engine.run(&commands))) else {
            engine.shared.set_health(EngineHealth::Stopped);
            announce_stopped();
            return;
        };
        // Counted and shown before the requests hear of it.
        let shared = engine.shared.clone();
        shared.set_health(EngineHealth::Restarting);
        engine.metrics.record_engine_restart();
        tracing::error!(
            model = %name,
            panic = panic_message(panic.as_ref()),
            live = engine.live.len(),
            "the engine panicked; failing its requests and reloading the model"
        );
        engine.fail_after_panic();
        let restarted = reload
            .as_mut()
            .context("this engine has no way to reload its model")
            .and_then(|reload| engine.restart(reload));
        match restarted {
            Ok(fresh) => {
                engine = fresh;
                shared.set_health(EngineHealth::Running);
                tracing::info!(model = %name, "engine restarted");
            }
            Err(error) => {
                shared.set_health(EngineHealth::Stopped);
                announce_stopped();
                tracing::error!(model = %name, error = format!("{error:#}"), "the engine could not restart; it has stopped");
                return;
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}
