//! The engine: one per loaded model, on its own thread. It owns the model's scheduler and
//! runner and loops: take commands (add, cancel) → schedule → runner step → update →
//! detokenize and match stop strings → send each request's events to its own channel.
//! A closed channel means the client left: the request is cancelled and its blocks freed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use heddle_core::scheduler::AddError;
use heddle_core::{
    FinishReason, Priority, Request, RequestId, SampledToken, SamplingParams, ScheduledBatch,
    Scheduler, SchedulerConfig, SchedulerStats, StopCriteria, TokenId,
};
use heddle_model::detokenizer::IncrementalDetokenizer;
use heddle_model::runner::{ModelRunner, SampledOutput};
use heddle_model::stop_strings::StopStringMatcher;
use heddle_model::tokenizer::Tokenizer;
use tokio::sync::{mpsc as async_mpsc, oneshot};

/// What a caller asks the engine to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<TokenId>,
    pub priority: Priority,
    pub sampling: SamplingParams,
    /// max_tokens, the request's stop token ids and stop strings, ignore_eos; the
    /// model's EOS ids are added by the engine.
    pub stop: StopCriteria,
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
pub struct Usage {
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
    /// The request ended; nothing follows. `text` is output held back until now.
    Finished {
        reason: FinishReason,
        text: String,
        usage: Usage,
    },
}

/// Why the engine did not take a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("{0}")]
    Invalid(String),
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
        request: GenerationRequest,
        events: async_mpsc::UnboundedSender<EngineEvent>,
        reply: oneshot::Sender<Result<(), SubmitError>>,
    },
    Cancel(RequestId),
}

/// The clock requests' arrivals are measured on: seconds since the engine started.
fn seconds_since(start: std::time::Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// A cheap, cloneable handle to a running engine.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
    stats: Arc<Mutex<SchedulerStats>>,
    tokenizer: Arc<Tokenizer>,
}

impl EngineHandle {
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The scheduler's counters as of the last step.
    pub fn stats(&self) -> SchedulerStats {
        *self.stats.lock().expect("stats lock")
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
                request,
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
    wants_logprobs: bool,
    usage: Usage,
}

/// The engine thread's state.
pub struct Engine {
    scheduler: Scheduler,
    runner: Box<dyn ModelRunner>,
    tokenizer: Arc<Tokenizer>,
    live: HashMap<RequestId, Live>,
    /// The step's batch and sampled tokens, reused from step to step.
    batch: ScheduledBatch,
    sampled: Vec<SampledToken>,
    stats: Arc<Mutex<SchedulerStats>>,
    started: std::time::Instant,
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
        let scheduler = Scheduler::new(config)?;
        let stats = Arc::new(Mutex::new(scheduler.stats()));
        let (commands, commands_rx) = mpsc::channel();
        let handle = EngineHandle {
            commands,
            next_id: Arc::new(AtomicU64::new(1)),
            stats: stats.clone(),
            tokenizer: tokenizer.clone(),
        };
        let mut engine = Engine {
            scheduler,
            runner,
            tokenizer,
            live: HashMap::new(),
            batch: ScheduledBatch::default(),
            sampled: Vec::new(),
            stats,
            started: std::time::Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || engine.run(commands_rx))?;
        Ok((handle, thread))
    }

    fn run(&mut self, commands: mpsc::Receiver<Command>) {
        loop {
            // Block only when there is nothing to compute.
            if !self.scheduler.has_work() {
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
                let answer = self.add(id, request, events);
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
        } = request;
        // Every request gets a seed, so its sampling never depends on the batch.
        sampling.seed.get_or_insert_with(rand::random);
        stop.eos_token_ids = self.tokenizer.stop_token_ids().to_vec();
        let stops = StopStringMatcher::new(&stop.stop_strings);
        let prompt_tokens = prompt.len();
        let wants_logprobs = sampling.logprobs || sampling.top_logprobs > 0;
        let core_request = Request {
            id,
            prompt,
            priority,
            sampling,
            stop,
            arrival: seconds_since(self.started),
        };
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
                        stops,
                        wants_logprobs,
                        usage: Usage {
                            prompt_tokens,
                            ..Usage::default()
                        },
                    },
                );
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
            self.live.remove(&id);
        }
    }

    fn step(&mut self) {
        self.scheduler.schedule_into(&mut self.batch);
        let batch = &self.batch;
        if batch.is_empty() {
            self.publish_stats();
            return;
        }
        for seq in batch.seqs.iter().filter(|s| s.num_generated == 0) {
            if let (Some(live), Some(cached)) = (
                self.live.get_mut(&seq.id),
                self.scheduler.cached_prompt_tokens(seq.id),
            ) {
                live.usage.cached_tokens = cached;
            }
        }
        let outputs = match self.runner.step(batch, &self.scheduler) {
            Ok(outputs) => outputs,
            Err(error) => {
                tracing::error!(%error, "model step failed; failing its requests");
                self.scheduler.update(&[]);
                let failed: Vec<RequestId> = batch.seqs.iter().map(|s| s.id).collect();
                for id in failed {
                    if self.scheduler.finish(id, FinishReason::Error).is_ok() {
                        self.end(id, FinishReason::Error);
                    }
                }
                return;
            }
        };
        self.sampled.clear();
        self.sampled.extend(outputs.iter().map(SampledToken::from));
        let events = self.scheduler.update(&self.sampled);
        // `update` reports at most one event per sampled token, in the same order, so
        // each event's output is found by walking the outputs once.
        let mut remaining = outputs.iter();
        for event in events {
            let output = remaining.by_ref().find(|o| o.id == event.id);
            self.deliver(event.id, event.token, event.finish, output);
        }
        self.publish_stats();
    }

    /// Turns one sampled token into text and events, applying stop strings.
    fn deliver(
        &mut self,
        id: RequestId,
        token: TokenId,
        finish: Option<FinishReason>,
        output: Option<&SampledOutput>,
    ) {
        let Some(live) = self.live.get_mut(&id) else {
            return;
        };
        live.usage.completion_tokens += 1;
        // A stop token ends the output; its text is not part of it.
        let piece = if finish == Some(FinishReason::Stop) {
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
        let Some(mut live) = self.live.remove(&id) else {
            return;
        };
        // Whoever sees the last event also sees the blocks it freed.
        self.publish_stats();
        let text = if live.stopped {
            String::new()
        } else {
            // Bytes of an unfinished character, then whatever was held back as a possible
            // stop string: the output is complete, so it is not one.
            let rest = live.detokenizer.finish().unwrap_or_default();
            let scan = live.stops.push(&rest);
            if scan.stop.is_some() {
                scan.text
            } else {
                scan.text + &live.stops.finish()
            }
        };
        let _ = live.events.send(EngineEvent::Finished {
            reason,
            text,
            usage: live.usage,
        });
    }

    fn publish_stats(&self) {
        *self.stats.lock().expect("stats lock") = self.scheduler.stats();
    }
}
