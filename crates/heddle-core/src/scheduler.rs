//! The step scheduler: one [`Scheduler::schedule`] per model step builds the batch, one
//! [`Scheduler::update`] applies what the model sampled.
//!
//! Every sequence just has "tokens computed so far" (vLLM-v1 style): a prefill chunk and
//! a decode token are both "compute the next n tokens", so they share one token budget
//! in the same step. Each step:
//! 1. waiting requests strictly more urgent than the least urgent running ones take
//!    their seats when the seat limit is what keeps them out (priority preemption);
//! 2. running sequences, most urgent first, get their next tokens; when blocks run out
//!    the least urgent running sequence is preempted (by recompute) until they fit;
//! 3. waiting requests, most urgent first, are admitted while seats, budget and blocks
//!    (above the watermark) allow, starting from their longest cached prefix. Admission
//!    is strict: if the most urgent waiting request does not fit, nobody behind it
//!    jumps ahead, so a big urgent request is not starved by small ones.
//!
//! Thrash guard: priority preemption only takes a sequence that has produced at least
//! one token since it was last admitted, so every admission makes progress. Urgency keys
//! are time-invariant (see [`crate::queue`]), so two requests can never preempt each
//! other back and forth.
//!
//! One step ahead: the next step may be scheduled while the last one is still in flight
//! (a GPU runner then queues it behind the running one, so the host's planning overlaps
//! the device's work). Its tokens are credited when scheduled: a sequence whose step in
//! flight samples a token decodes that token next, not yet known
//! ([`ScheduledSeq::last_token_pending`]); one that the sampled token finishes by length
//! is left out, one that it finishes otherwise (a stop token, a stop string, a cancel)
//! computes one step for nothing, whose output `update` drops.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

use crate::batch::{SampledToken, ScheduledBatch, ScheduledSeq, SequenceTokens, StepEvent};
use crate::error::CoreError;
use crate::kv::{BlockPool, BlockTable, KvStats, DEFAULT_BLOCK_SIZE};
use crate::kv_events::KvCacheEvent;
use crate::queue::{AgingQueue, PutOutcome, UrgencyKey, DEFAULT_AGING_RATE};
use crate::request::{FinishReason, Priority, Request, RequestId, RequestStatus, TokenId};

/// Limits and policies of one scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_running: usize,
    /// Most tokens (prefill and decode together) in one step.
    pub max_batched_tokens: usize,
    /// Most prompt tokens of one sequence in one step.
    pub prefill_chunk: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// Fraction of blocks kept free when admitting new sequences, so that running ones
    /// can grow without being preempted at once.
    pub watermark: f64,
    /// Priority levels gained per second of waiting.
    pub aging_rate: f64,
    /// Most waiting requests; None is unbounded.
    pub queue_capacity: Option<usize>,
    /// The model's context length: prompt + max_tokens must fit.
    pub max_model_len: usize,
    pub enable_prefix_cache: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            max_running: 256,
            max_batched_tokens: 2048,
            prefill_chunk: 512,
            num_blocks: 4096,
            block_size: DEFAULT_BLOCK_SIZE,
            watermark: 0.01,
            aging_rate: DEFAULT_AGING_RATE,
            queue_capacity: None,
            max_model_len: 8192,
            enable_prefix_cache: true,
        }
    }
}

impl SchedulerConfig {
    pub fn validate(&self) -> Result<(), CoreError> {
        let bad = |param: &'static str, reason: &str| {
            Err(CoreError::InvalidParam {
                param,
                reason: reason.to_string(),
            })
        };
        if self.max_running == 0 {
            return bad("max_running", "must be >= 1");
        }
        if self.max_batched_tokens == 0 {
            return bad("max_batched_tokens", "must be >= 1");
        }
        if self.prefill_chunk == 0 {
            return bad("prefill_chunk", "must be >= 1");
        }
        if self.num_blocks == 0 || self.block_size == 0 {
            return bad("num_blocks", "blocks and block size must be >= 1");
        }
        if !(0.0..1.0).contains(&self.watermark) {
            return bad("watermark", "must be in [0, 1)");
        }
        if !(self.aging_rate.is_finite() && self.aging_rate >= 0.0) {
            return bad("aging_rate", "must be >= 0");
        }
        if self.queue_capacity == Some(0) {
            return bad("queue_capacity", "must be >= 1 when set");
        }
        Ok(())
    }

    /// Longest sequence (prompt + output) this scheduler can ever hold.
    pub fn max_sequence_len(&self) -> usize {
        self.max_model_len.min(self.num_blocks * self.block_size)
    }
}

/// A request accepted by [`Scheduler::add`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    Queued,
    /// Queued by displacing this less urgent waiting request, which is now cancelled.
    QueuedDisplacing(RequestId),
}

/// Why [`Scheduler::add`] turned a request away.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AddError {
    #[error(transparent)]
    Invalid(#[from] CoreError),
    /// The waiting queue is full of requests at least as urgent (HTTP 429).
    #[error("the waiting queue is full")]
    QueueFull,
}

/// Counters of a scheduler, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SchedulerStats {
    /// Waiting requests by base priority: [high, normal, low].
    pub waiting: [usize; 3],
    pub running: usize,
    /// Preemptions since start (memory and priority).
    pub preemptions: u64,
    /// Requests refused because the queue was full, and those displaced from it.
    pub refused: u64,
    pub displaced: u64,
    pub kv: KvStats,
}

#[derive(Debug)]
struct Sequence {
    priority: Priority,
    arrival: f64,
    key: UrgencyKey,
    status: RequestStatus,
    request: Request,
    /// Prompt then generated tokens.
    tokens: Vec<TokenId>,
    /// Tokens whose keys and values are in the cache.
    num_computed: usize,
    /// `num_computed` plus the tokens of the steps in flight.
    num_scheduled: usize,
    /// Tokens that the steps in flight sample for it, not yet applied by `update`.
    pending_samples: usize,
    table: BlockTable,
    /// Prompt tokens served from the prefix cache at first admission (for usage).
    cached_prompt_tokens: Option<usize>,
    /// `tokens.len()` when last admitted: progress is measured from here.
    len_at_admission: usize,
}

impl Sequence {
    fn num_generated(&self) -> usize {
        self.tokens.len() - self.request.prompt.len()
    }

    /// Whether the token a step in flight samples is certain to end the sequence by
    /// length: then nothing is scheduled for it until that step's update.
    fn ends_by_length_in_flight(&self) -> bool {
        self.pending_samples > 0
            && self.num_generated() + self.pending_samples >= self.request.stop.max_tokens
    }

    /// The top-N of the prompt log-probabilities still to compute: until the first token
    /// is sampled, which happens only once the whole prompt was computed and scored.
    fn prompt_logprobs_due(&self) -> Option<u32> {
        self.request
            .sampling
            .prompt_logprobs
            .filter(|_| self.num_generated() == 0)
    }

    fn scores_prompt(&self) -> bool {
        self.prompt_logprobs_due().is_some()
    }
}

/// The continuous-batching scheduler of one model.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    pool: BlockPool,
    waiting: AgingQueue<()>,
    /// Running (and prefilling) sequences by urgency.
    running: BTreeMap<UrgencyKey, RequestId>,
    seqs: FxHashMap<RequestId, Sequence>,
    /// What the scheduled steps not yet updated compute, oldest step first.
    in_flight: Vec<InFlight>,
    /// The tags of those steps, oldest first: at most two (one running, one ahead).
    steps_in_flight: VecDeque<u64>,
    next_step_tag: u64,
    /// Reused by `schedule_into` for the order of running sequences.
    order_scratch: Vec<RequestId>,
    preemptions: u64,
    refused: u64,
    displaced: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Result<Self, CoreError> {
        config.validate()?;
        Ok(Scheduler {
            pool: BlockPool::new(config.num_blocks, config.block_size),
            waiting: AgingQueue::new(config.aging_rate, config.queue_capacity),
            running: BTreeMap::new(),
            seqs: FxHashMap::default(),
            in_flight: Vec::new(),
            steps_in_flight: VecDeque::new(),
            next_step_tag: 0,
            order_scratch: Vec::new(),
            preemptions: 0,
            refused: 0,
            displaced: 0,
            config,
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Offers a request. Invalid requests and a full queue are refused; a full queue may
    /// instead cancel a strictly less urgent waiting request to make room.
    pub fn add(&mut self, request: Request) -> Result<AddOutcome, AddError> {
        request.validate()?;
        if self.seqs.contains_key(&request.id) {
            return Err(CoreError::DuplicateRequest(request.id).into());
        }
        let needed = request.prompt.len() + request.stop.max_tokens;
        let limit = self.config.max_sequence_len();
        if needed > limit {
            return Err(CoreError::ContextTooLong { needed, limit }.into());
        }
        let (id, priority, arrival) = (request.id, request.priority, request.arrival);
        let outcome = match self.waiting.put(id, priority, arrival, ()) {
            PutOutcome::Queued => AddOutcome::Queued,
            PutOutcome::Displaced(victim, ()) => {
                self.seqs.remove(&victim);
                self.displaced += 1;
                AddOutcome::QueuedDisplacing(victim)
            }
            PutOutcome::Refused(()) => {
                self.refused += 1;
                return Err(AddError::QueueFull);
            }
        };
        let key = self.waiting.key(id).expect("just queued");
        self.seqs.insert(
            id,
            Sequence {
                priority,
                arrival,
                key,
                status: RequestStatus::Waiting,
                tokens: request.prompt.clone(),
                request,
                num_computed: 0,
                num_scheduled: 0,
                pending_samples: 0,
                table: BlockTable::default(),
                cached_prompt_tokens: None,
                len_at_admission: 0,
            },
        );
        Ok(outcome)
    }

    /// Cancels a request wherever it is; its blocks return to the pool. False if unknown
    /// (already ended).
    pub fn cancel(&mut self, id: RequestId) -> bool {
        self.end(id, RequestStatus::Cancelled).is_ok()
    }

    /// Ends a running request from outside, e.g. when the engine matched a stop string.
    pub fn finish(&mut self, id: RequestId, reason: FinishReason) -> Result<(), CoreError> {
        self.end(id, RequestStatus::Finished(reason))
    }

    /// Whether anything is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.seqs.is_empty()
    }

    pub fn status(&self, id: RequestId) -> Option<RequestStatus> {
        self.seqs.get(&id).map(|s| s.status)
    }

    /// Prompt tokens of `id` served from the prefix cache when it was first admitted.
    pub fn cached_prompt_tokens(&self, id: RequestId) -> Option<usize> {
        self.seqs.get(&id).and_then(|s| s.cached_prompt_tokens)
    }

    /// Records the prefix cache's changes from now on, for [`Self::drain_kv_events`];
    /// called on a new scheduler, before its first step.
    pub fn enable_kv_events(&mut self) {
        self.pool.enable_events();
    }

    /// The prefix cache's changes since the last drain (see [`crate::kv_events`]).
    pub fn drain_kv_events(&mut self) -> Vec<KvCacheEvent> {
        self.pool.drain_events()
    }

    pub fn stats(&self) -> SchedulerStats {
        SchedulerStats {
            waiting: self.waiting.len_per_priority(),
            running: self.running.len(),
            preemptions: self.preemptions,
            refused: self.refused,
            displaced: self.displaced,
            kv: self.pool.stats(),
        }
    }

    /// Builds the next step's batch.
    ///
    /// No clock is needed here: aging is carried by the requests' arrival times, which
    /// order exactly like effective priorities at any common `now` (see [`crate::queue`]).
    pub fn schedule(&mut self) -> ScheduledBatch {
        let mut batch = ScheduledBatch::default();
        self.schedule_into(&mut batch);
        batch
    }

    /// [`Self::schedule`] into a batch kept by the caller: its buffers are reused, so a
    /// steady-state step allocates nothing. May be called once while the last step is in
    /// flight (not yet given to [`Self::update`]): the new step follows it (see the
    /// module's "one step ahead").
    pub fn schedule_into(&mut self, batch: &mut ScheduledBatch) {
        debug_assert!(
            self.steps_in_flight.len() <= 1,
            "scheduled more than one step ahead of the updates"
        );
        batch.preempted.clear();
        let mut filled = 0;
        let budget = self.config.max_batched_tokens;

        self.preempt_for_priority(batch);
        let priority_preemptions = batch.preempted.len();
        let budget = self.schedule_running(batch, &mut filled, budget);
        // A step that had to preempt for memory admits nobody.
        let memory_pressure = batch.preempted.len() > priority_preemptions;
        if !memory_pressure {
            self.admit_waiting(batch, &mut filled, budget);
        }

        batch.seqs.truncate(filled);
        if batch.is_empty() {
            return; // not a step: no update follows
        }
        let step = self.next_step_tag;
        self.next_step_tag += 1;
        self.steps_in_flight.push_back(step);
        for scheduled in &batch.seqs {
            let seq = self.seqs.get_mut(&scheduled.id).expect("scheduled exists");
            seq.num_scheduled += scheduled.tokens.len();
            seq.pending_samples += scheduled.needs_logits as usize;
            self.in_flight.push(InFlight {
                step,
                id: scheduled.id,
                tokens: scheduled.tokens.len(),
                samples: scheduled.needs_logits,
            });
        }
    }

    /// Fills in the pending tokens of a batch scheduled ahead that was not launched before
    /// the step it followed was updated: each is now known, or its sequence has ended, and
    /// its row is dropped (nothing of it is in flight any more). A batch left empty is no
    /// longer a step: no update follows it.
    pub fn resolve_pending(&mut self, batch: &mut ScheduledBatch) {
        let was_a_step = !batch.is_empty();
        batch.seqs.retain_mut(|scheduled| {
            if !scheduled.last_token_pending {
                return true;
            }
            let position = scheduled.end_position() - 1;
            let Some(&token) = self.seqs.get(&scheduled.id).and_then(|seq| {
                seq.status
                    .is_running()
                    .then(|| seq.tokens.get(position))
                    .flatten()
            }) else {
                return false;
            };
            *scheduled.tokens.last_mut().expect("a pending token") = token;
            scheduled.last_token_pending = false;
            true
        });
        if was_a_step && batch.is_empty() {
            // Its sequences all ended, and with them their entries.
            self.steps_in_flight.pop_back();
        }
    }

    /// Applies a step's sampled tokens: appends them, applies EOS / stop-token /
    /// max_tokens rules, frees finished sequences' blocks. Returns one event per token.
    pub fn update(&mut self, sampled: &[SampledToken]) -> Vec<StepEvent> {
        self.credit_in_flight();
        let mut events = Vec::with_capacity(sampled.len());
        for s in sampled {
            let Some(seq) = self.seqs.get_mut(&s.id) else {
                continue;
            };
            if seq.num_computed != seq.tokens.len() {
                continue; // not a step that ends in logits, or a stale output
            }
            seq.tokens.push(s.token);
            if seq.status == RequestStatus::Prefilling {
                seq.status
                    .transition(RequestStatus::Running)
                    .expect("prefilling becomes running");
            }
            let finish = if seq.request.stop.is_stop_token(s.token) {
                Some(FinishReason::Stop)
            } else if seq.num_generated() >= seq.request.stop.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            events.push(StepEvent {
                id: s.id,
                token: s.token,
                finish,
            });
            if let Some(reason) = finish {
                self.end(s.id, RequestStatus::Finished(reason))
                    .expect("a running sequence can finish");
            }
        }
        events
    }

    /// Credits the tokens the oldest step in flight computed to the sequences still
    /// running, registering their full blocks in the prefix cache.
    fn credit_in_flight(&mut self) {
        let Some(step) = self.steps_in_flight.pop_front() else {
            return;
        };
        // Entries are kept in step order, so the oldest step's are the first ones.
        let done = self.in_flight.partition_point(|e| e.step == step);
        for entry in self.in_flight.drain(..done) {
            let Some(seq) = self.seqs.get_mut(&entry.id) else {
                continue;
            };
            if !seq.status.is_running() {
                continue;
            }
            seq.num_computed += entry.tokens;
            seq.pending_samples -= entry.samples as usize;
            if self.config.enable_prefix_cache {
                self.pool
                    .register_computed(&mut seq.table, &seq.tokens, seq.num_computed);
            }
        }
    }

    /// Abandons the steps in flight when the model failed to compute one: their tokens
    /// are not credited, their blocks are not registered in the prefix cache (their K/V
    /// may never have been written), and every sequence they scheduled ends with
    /// [`FinishReason::Error`], its blocks returned to the pool. Returns those sequences,
    /// in batch order.
    pub fn abort_step(&mut self) -> Vec<RequestId> {
        self.steps_in_flight.clear();
        let mut failed = Vec::new();
        // Ending a sequence removes all its entries, so each is ended once.
        while let Some(entry) = self.in_flight.first() {
            let id = entry.id;
            self.end(id, RequestStatus::Finished(FinishReason::Error))
                .expect("a scheduled sequence can fail");
            failed.push(id);
        }
        failed
    }

    /// Takes seats from the least urgent running sequences for strictly more urgent
    /// waiting ones, when the seat limit is what keeps them out.
    fn preempt_for_priority(&mut self, batch: &mut ScheduledBatch) {
        if self.running.len() < self.config.max_running {
            return;
        }
        let mut victims = Vec::new();
        let mut candidates = self.running.iter().rev();
        for (_, _, waiting_key) in self.waiting.iter() {
            let Some((&key, &victim)) = candidates.next() else {
                break;
            };
            let seq = &self.seqs[&victim];
            let progressed = seq.tokens.len() > seq.len_at_admission;
            if !waiting_key.strictly_more_urgent(&key) || !progressed {
                break;
            }
            victims.push(victim);
        }
        for victim in victims {
            self.preempt(victim, batch);
        }
    }

    /// Gives running sequences, most urgent first, their next tokens within `budget`,
    /// preempting the least urgent ones when blocks run out. Returns the budget left.
    fn schedule_running(
        &mut self,
        batch: &mut ScheduledBatch,
        filled: &mut usize,
        mut budget: usize,
    ) -> usize {
        let mut order = std::mem::take(&mut self.order_scratch);
        order.clear();
        order.extend(self.running.values().copied());
        for &id in &order {
            if budget == 0 {
                break;
            }
            if self.seqs[&id].status.is_waiting() {
                continue; // preempted to make room for a more urgent sequence
            }
            let seq = &self.seqs[&id];
            if seq.ends_by_length_in_flight() {
                continue;
            }
            let remaining = seq.tokens.len() + seq.pending_samples - seq.num_scheduled;
            debug_assert!(remaining > 0, "a running sequence has a next token");
            let n = remaining.min(budget).min(self.config.prefill_chunk);
            let target = seq.num_scheduled + n;
            if !self.make_room(id, target, batch) {
                continue; // preempted itself: nothing less urgent was left to take
            }
            budget -= n;
            self.fill_scheduled(batch, filled, id, n);
        }
        self.order_scratch = order;
        budget
    }

    /// Ensures `id` has blocks for `target` tokens, preempting the least urgent running
    /// sequences as needed. False if `id` itself had to be preempted.
    fn make_room(&mut self, id: RequestId, target: usize, batch: &mut ScheduledBatch) -> bool {
        loop {
            let seq = self.seqs.get_mut(&id).expect("running sequence exists");
            if self.pool.grow(&mut seq.table, target) {
                return true;
            }
            let (_, &victim) = self
                .running
                .last_key_value()
                .expect("the sequence itself is running");
            self.preempt(victim, batch);
            if victim == id {
                return false;
            }
        }
    }

    /// Admits waiting requests, most urgent first, while seats, `budget` and blocks
    /// allow; stops at the first that does not fit (strict order).
    fn admit_waiting(&mut self, batch: &mut ScheduledBatch, filled: &mut usize, mut budget: usize) {
        while budget > 0 && self.running.len() < self.config.max_running {
            let Some((id, _, _)) = self.waiting.peek() else {
                break;
            };
            let Some(n) = self.try_admit(id, budget) else {
                break;
            };
            budget -= n;
            self.fill_scheduled(batch, filled, id, n);
        }
    }

    /// Admits the most urgent waiting request if seats, budget and blocks allow; returns
    /// the number of tokens it computes this step.
    ///
    /// The first chunk is cut to the blocks available above the watermark, so a long
    /// prompt starts as soon as any room exists. The watermark keeps room for running
    /// sequences to grow; with none running it would only block a request that needs the
    /// whole pool, so it is not applied then.
    fn try_admit(&mut self, id: RequestId, budget: usize) -> Option<usize> {
        let watermark = if self.running.is_empty() {
            0
        } else {
            (self.config.watermark * self.config.num_blocks as f64).ceil() as usize
        };
        let seq = self.seqs.get_mut(&id).expect("waiting sequence exists");
        // A prompt whose log-probabilities are asked for must be computed: cached blocks
        // hold its keys and values but not its logits. (Its blocks are still registered.)
        let reuses_cache = self.config.enable_prefix_cache && !seq.scores_prompt();
        let (mut table, cached) = if reuses_cache {
            self.pool.lookup_prefix(&seq.tokens, 1)
        } else {
            (BlockTable::default(), 0)
        };
        let room_blocks = table.len() + self.pool.num_allocatable().saturating_sub(watermark);
        let room_tokens = (room_blocks * self.config.block_size).saturating_sub(cached);
        let n = (seq.tokens.len() - cached)
            .min(budget)
            .min(self.config.prefill_chunk)
            .min(room_tokens);
        let target = cached + n;
        let fits = n > 0 && self.pool.grow(&mut table, target);
        if !fits {
            self.pool
                .free_table(table)
                .expect("blocks retained by the lookup are released once");
            return None;
        }
        self.waiting.pop();
        if seq.cached_prompt_tokens.is_none() {
            let prompt_len = seq.request.prompt.len();
            let hit = cached.min(prompt_len);
            seq.cached_prompt_tokens = Some(hit);
            self.pool.record_prefix_lookup(hit, prompt_len - hit);
        }
        seq.table = table;
        seq.num_computed = cached;
        seq.num_scheduled = cached;
        seq.pending_samples = 0;
        seq.len_at_admission = seq.tokens.len();
        seq.status
            .transition(RequestStatus::Prefilling)
            .expect("a waiting sequence can be admitted");
        self.running.insert(seq.key, id);
        Some(n)
    }

    /// Preempts by recompute: blocks freed (cached ones stay findable), generated tokens
    /// kept, back to the waiting queue with the original arrival so it keeps aging.
    fn preempt(&mut self, id: RequestId, batch: &mut ScheduledBatch) {
        let seq = self.seqs.get_mut(&id).expect("preempted sequence exists");
        seq.status
            .transition(RequestStatus::Preempted)
            .expect("only running sequences are preempted");
        self.running.remove(&seq.key);
        let table = std::mem::take(&mut seq.table);
        self.pool.free_table(table).expect("a table is freed once");
        seq.num_computed = 0;
        seq.num_scheduled = 0;
        seq.pending_samples = 0;
        // What a step in flight computes for it is dropped with its blocks.
        self.in_flight.retain(|e| e.id != id);
        self.waiting.requeue(id, seq.priority, seq.arrival, ());
        // The queue assigns a fresh tie-breaker; keep the sequence's key in sync.
        seq.key = self.waiting.key(id).expect("just requeued");
        self.preemptions += 1;
        // Never in this step's batch: victims are less urgent than every sequence
        // scheduled so far, and running sequences are scheduled most urgent first.
        batch.preempted.push(id);
    }

    /// Writes sequence `id`'s share of the step into slot `*filled` of the batch,
    /// reusing that slot's buffers from earlier steps.
    fn fill_scheduled(
        &self,
        batch: &mut ScheduledBatch,
        filled: &mut usize,
        id: RequestId,
        n: usize,
    ) {
        let seq = &self.seqs[&id];
        let start = seq.num_scheduled;
        let end = start + n;
        let known = end.min(seq.tokens.len());
        if *filled == batch.seqs.len() {
            batch.seqs.push(ScheduledSeq {
                id,
                tokens: Vec::new(),
                start_position: 0,
                block_table: Vec::new(),
                needs_logits: false,
                sampling: seq.request.sampling,
                prompt_logprobs: None,
                num_generated: 0,
                last_token_pending: false,
            });
        }
        let slot = &mut batch.seqs[*filled];
        *filled += 1;
        slot.id = id;
        slot.tokens.clear();
        slot.tokens.extend_from_slice(&seq.tokens[start..known]);
        // Only the token a step in flight samples can be unknown, and it is the last.
        debug_assert!(end - known <= 1 && end - known <= seq.pending_samples);
        slot.last_token_pending = end > known;
        if slot.last_token_pending {
            slot.tokens.push(0);
        }
        slot.start_position = start;
        slot.block_table.clear();
        slot.block_table.extend_from_slice(seq.table.blocks());
        slot.needs_logits = end == seq.tokens.len() + seq.pending_samples;
        slot.sampling = seq.request.sampling;
        slot.prompt_logprobs = seq
            .prompt_logprobs_due()
            .filter(|_| seq.pending_samples == 0);
        slot.num_generated = seq.num_generated() + seq.pending_samples;
    }

    fn end(&mut self, id: RequestId, to: RequestStatus) -> Result<(), CoreError> {
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(CoreError::UnknownRequest(id))?;
        seq.status.transition(to)?;
        let seq = self.seqs.remove(&id).expect("checked above");
        self.waiting.remove(id);
        self.running.remove(&seq.key);
        self.in_flight.retain(|e| e.id != id);
        self.pool.free_table(seq.table)
    }
}

/// One sequence's share of a step in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The step's tag.
    step: u64,
    id: RequestId,
    tokens: usize,
    /// Whether the step samples a token for it.
    samples: bool,
}

impl Drop for Scheduler {
    /// Returns the blocks of sequences still live, so that their tables end freed (see
    /// [`BlockTable`]'s drop check) even though the pool goes with the scheduler.
    fn drop(&mut self) {
        for seq in self.seqs.values_mut() {
            let table = std::mem::take(&mut seq.table);
            // Only a second release of a block fails, and each table is freed once.
            let _ = self.pool.free_table(table);
        }
    }
}

impl SequenceTokens for Scheduler {
    fn sequence_tokens(&self, id: RequestId) -> &[TokenId] {
        self.seqs.get(&id).map_or(&[], |s| &s.tokens)
    }

    fn prompt_len(&self, id: RequestId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.request.prompt.len())
    }
}

#[cfg(test)]
mod tests;
