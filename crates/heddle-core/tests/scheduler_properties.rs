//! Property tests: the scheduler driven over random workloads by a deterministic fake
//! model that lives only here.

use std::collections::{HashMap, HashSet};

use heddle_core::scheduler::AddError;
use heddle_core::{
    AddOutcome, FinishReason, Priority, Request, RequestId, SampledToken, SamplingParams,
    ScheduledBatch, Scheduler, SchedulerConfig, SequenceTokens, StepEvent, StopCriteria, TokenId,
};
use proptest::prelude::*;

const EOS: TokenId = 0;

/// The fake model's token for sequence `id` at `position`; EOS now and then.
fn fake_token(id: RequestId, position: usize) -> TokenId {
    let x = id.wrapping_mul(0x9e37_79b9) ^ (position as u64 * 31);
    if x.is_multiple_of(23) {
        EOS
    } else {
        1 + (x % 97) as TokenId
    }
}

/// The fake model: a token from the sequence id and position.
fn fake_sample(batch: &ScheduledBatch) -> Vec<SampledToken> {
    batch
        .seqs
        .iter()
        .filter(|s| s.needs_logits)
        .map(|s| SampledToken {
            id: s.id,
            token: fake_token(s.id, s.end_position()),
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        prefix: usize,
        prompt_len: usize,
        max_tokens: usize,
        priority: u8,
    },
    Cancel(usize),
    Finish(usize),
    Step,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..3, 1usize..40, 1usize..16, 0u8..3).prop_map(|(prefix, prompt_len, max_tokens, priority)| Op::Add { prefix, prompt_len, max_tokens, priority }),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => any::<usize>().prop_map(Op::Finish),
        6 => Just(Op::Step),
    ]
}

fn config() -> impl Strategy<Value = SchedulerConfig> {
    (
        1usize..6,
        1usize..48,
        1usize..24,
        4usize..48,
        1usize..6,
        proptest::option::of(1usize..8),
    )
        .prop_map(
            |(max_running, budget, chunk, num_blocks, block_size, queue_capacity)| {
                SchedulerConfig {
                    max_running,
                    max_batched_tokens: budget,
                    prefill_chunk: chunk,
                    num_blocks,
                    block_size,
                    watermark: 0.05,
                    queue_capacity,
                    max_model_len: 64,
                    ..SchedulerConfig::default()
                }
            },
        )
}

/// Prompts share one of three prefixes, so the prefix cache gets hits.
fn prompt(prefix: usize, len: usize, id: RequestId) -> Vec<TokenId> {
    (0..len)
        .map(|i| {
            if i < 12 {
                200 + (prefix * 12 + i) as TokenId
            } else {
                1000 + id as TokenId * 64 + i as TokenId
            }
        })
        .collect()
}

/// The requests a property test has sent, and what became of them.
#[derive(Default)]
struct Sent {
    live: Vec<RequestId>,
    ended: HashSet<RequestId>,
    /// By request: (prompt length, max_tokens).
    lengths: HashMap<RequestId, (usize, usize)>,
    next_id: RequestId,
    now: f64,
}

impl Sent {
    /// Applies an `Add`, `Cancel` or `Finish` (a `Step` is the test's own).
    fn apply(&mut self, sched: &mut Scheduler, op: &Op) -> Result<(), TestCaseError> {
        self.now += 0.25;
        match *op {
            Op::Add {
                prefix,
                prompt_len,
                max_tokens,
                priority,
            } => {
                let id = self.next_id;
                self.next_id += 1;
                let request = Request {
                    id,
                    prompt: prompt(prefix, prompt_len, id),
                    priority: Priority::from_value(i64::from(priority)).unwrap(),
                    sampling: SamplingParams::greedy(),
                    stop: StopCriteria {
                        eos_token_ids: vec![EOS],
                        ..StopCriteria::new(max_tokens)
                    },
                    arrival: self.now,
                };
                self.lengths.insert(id, (prompt_len, max_tokens));
                match sched.add(request) {
                    Ok(AddOutcome::Queued) => self.live.push(id),
                    Ok(AddOutcome::QueuedDisplacing(victim)) => {
                        self.live.push(id);
                        prop_assert!(self.live.contains(&victim));
                        self.live.retain(|&other| other != victim);
                        prop_assert!(self.ended.insert(victim));
                    }
                    Err(AddError::QueueFull) | Err(AddError::Invalid(_)) => {
                        prop_assert!(self.ended.insert(id));
                    }
                }
            }
            Op::Cancel(pick) | Op::Finish(pick) if !self.live.is_empty() => {
                let id = self.live[pick % self.live.len()];
                let ok = if matches!(op, Op::Cancel(_)) {
                    sched.cancel(id)
                } else {
                    // Only a request that is computing can be finished from outside.
                    sched.finish(id, FinishReason::Stop).is_ok()
                };
                if ok {
                    self.live.retain(|&other| other != id);
                    prop_assert!(self.ended.insert(id));
                }
            }
            Op::Cancel(_) | Op::Finish(_) | Op::Step => {}
        }
        Ok(())
    }

    /// Checks an event, the `count`-th token of its request.
    fn check_event(&mut self, event: &StepEvent, count: usize) -> Result<(), TestCaseError> {
        let max_tokens = self.lengths[&event.id].1;
        prop_assert!(count <= max_tokens, "max_tokens exceeded");
        prop_assert!(!self.ended.contains(&event.id), "event after the end");
        if let Some(reason) = event.finish {
            prop_assert!(reason == FinishReason::Stop || count == max_tokens);
            prop_assert!(self.ended.insert(event.id), "ended twice");
            self.live.retain(|&id| id != event.id);
        }
        Ok(())
    }

    /// Checks that every request sent has ended, once.
    fn check_all_ended(&self) -> Result<(), TestCaseError> {
        prop_assert!(
            self.live.is_empty(),
            "requests never ended: {:?}",
            self.live
        );
        prop_assert_eq!(
            self.ended.len() as u64,
            self.next_id,
            "every request ends exactly once"
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn every_request_ends_once_and_nothing_leaks(cfg in config(), ops in proptest::collection::vec(op(), 1..150)) {
        let mut sched = Scheduler::new(cfg.clone()).unwrap();
        let mut sent = Sent::default();
        let mut generated: HashMap<RequestId, usize> = HashMap::new();

        let run_step = |sched: &mut Scheduler, sent: &mut Sent, generated: &mut HashMap<RequestId, usize>| -> Result<(), TestCaseError> {
            let batch = sched.schedule();
            prop_assert!(batch.num_tokens() <= cfg.max_batched_tokens, "budget exceeded");
            prop_assert!(batch.seqs.len() <= cfg.max_running, "too many sequences");
            prop_assert!(sched.stats().running <= cfg.max_running);
            let mut written = HashSet::new();
            let mut seen = HashSet::new();
            for s in &batch.seqs {
                prop_assert!(seen.insert(s.id), "sequence scheduled twice");
                prop_assert!(!s.tokens.is_empty());
                prop_assert!(s.block_table.len() * cfg.block_size >= s.end_position(), "blocks do not cover the tokens");
                // Blocks written this step belong to this sequence alone.
                let first = s.start_position / cfg.block_size;
                let last = (s.end_position() - 1) / cfg.block_size;
                for &b in &s.block_table[first..=last] {
                    prop_assert!(written.insert(b), "block {} written by two sequences", b);
                }
            }
            for s in &batch.seqs {
                let first_written = s.start_position / cfg.block_size;
                for &b in &s.block_table[..first_written] {
                    prop_assert!(!written.contains(&b), "a block read by one sequence is written by another");
                }
            }
            for event in sched.update(&fake_sample(&batch)) {
                let count = generated.entry(event.id).or_default();
                *count += 1;
                sent.check_event(&event, *count)?;
            }
            Ok(())
        };

        for op in ops {
            match op {
                Op::Step => run_step(&mut sched, &mut sent, &mut generated)?,
                other => sent.apply(&mut sched, &other)?,
            }
        }
        // Drain: everything left must finish within a bounded number of steps.
        let mut steps = 0;
        while sched.has_work() {
            run_step(&mut sched, &mut sent, &mut generated)?;
            steps += 1;
            prop_assert!(steps < 10_000, "the scheduler stopped making progress");
        }
        sent.check_all_ended()?;
        let kv = sched.stats().kv;
        prop_assert_eq!(kv.free_blocks, kv.total_blocks, "blocks leaked");
        prop_assert_eq!(kv.used_blocks, 0);
    }

    /// Under a sustained stream of HIGH requests that saturates the server, a LOW request
    /// is admitted once the HIGH requests that arrived before its aging crossover
    /// (arrival + 2 / rate) are served, and no later HIGH request goes before it.
    #[test]
    fn a_low_request_is_admitted_within_the_aging_bound(
        rate in prop_oneof![Just(0.1), Just(0.5), Just(1.0)],
        high_per_step in 2usize..5,
        low_step in 0usize..20,
    ) {
        let dt = 0.1;
        let cfg = SchedulerConfig { max_running: 1, num_blocks: 64, block_size: 4, aging_rate: rate, ..SchedulerConfig::default() };
        let mut sched = Scheduler::new(cfg).unwrap();
        let low_arrival = low_step as f64 * dt;
        let crossover = low_arrival + 2.0 / rate;
        let mut next_id = 1;
        let mut admitted = None;
        let mut highs_arrived_before_crossover = 0usize;
        for step in 0..20_000 {
            let now = step as f64 * dt;
            for _ in 0..high_per_step {
                sched.add(Request { priority: Priority::High, ..Request::new(next_id, vec![5], 1, now) }).unwrap();
                next_id += 1;
                if now <= crossover + 1e-9 {
                    highs_arrived_before_crossover += 1;
                }
            }
            if step == low_step {
                sched.add(Request { priority: Priority::Low, ..Request::new(0, vec![5], 1, now) }).unwrap();
            }
            let batch = sched.schedule();
            if batch.seqs.iter().any(|s| s.id == 0) {
                admitted = Some(step);
                break;
            }
            sched.update(&fake_sample(&batch));
        }
        let admitted = admitted.expect("LOW starved");
        // One request served per step: it waits at most for the HIGH ones ahead of it.
        prop_assert!(admitted <= highs_arrived_before_crossover + 1, "admitted at step {}, bound {}", admitted, highs_arrived_before_crossover + 1);
    }
}

proptest! {
    /// The engine's batch-invariance workload at the scheduler level: eight prompts that
    /// share a two-block system prompt arrive in three groups into a pool too small for
    /// all of them, then a ninth repeats the first.
    #[test]
    fn staggered_arrivals_into_a_small_pool_all_finish(gap1 in 0usize..12, gap2 in 0usize..12, lens in proptest::collection::vec(38usize..52, 8)) {
        let cfg = SchedulerConfig {
            num_blocks: 23,
            block_size: 16,
            max_running: 8,
            max_batched_tokens: 256,
            prefill_chunk: 64,
            max_model_len: 2048,
            ..SchedulerConfig::default()
        };
        let mut sched = Scheduler::new(cfg).unwrap();
        let prompt = |i: usize, len: usize| -> Vec<TokenId> {
            (0..len).map(|p| if p < 34 { 500 + p as TokenId } else { 1000 * (i as TokenId + 1) + p as TokenId }).collect()
        };
        let add = |sched: &mut Scheduler, id: u64, prompt: Vec<TokenId>| {
            let request = Request {
                id,
                prompt,
                priority: Priority::Normal,
                sampling: SamplingParams::greedy(),
                stop: StopCriteria { ignore_eos: true, ..StopCriteria::new(24) },
                arrival: id as f64,
            };
            sched.add(request).unwrap();
        };
        let mut finished = 0;
        let mut run = |sched: &mut Scheduler, steps: usize| {
            for _ in 0..steps {
                let batch = sched.schedule();
                for s in &batch.seqs {
                    assert!(!s.tokens.is_empty(), "an empty share was scheduled");
                }
                finished += sched.update(&fake_sample(&batch)).iter().filter(|e| e.finish.is_some()).count();
            }
        };
        for (i, &len) in lens.iter().enumerate() {
            add(&mut sched, i as u64, prompt(i, len));
            if i == 2 { run(&mut sched, gap1); }
            if i == 5 { run(&mut sched, gap2); }
        }
        let mut steps = 0;
        while sched.has_work() {
            run(&mut sched, 1);
            steps += 1;
            prop_assert!(steps < 2000, "stuck: {:?}", sched.stats());
        }
        add(&mut sched, 8, prompt(0, lens[0]));
        while sched.has_work() {
            run(&mut sched, 1);
            steps += 1;
            prop_assert!(steps < 4000, "stuck: {:?}", sched.stats());
        }
        prop_assert_eq!(finished, 9);
        let kv = sched.stats().kv;
        prop_assert_eq!(kv.used_blocks, 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Scheduling one step ahead of the updates keeps every invariant of the plain loop,
    /// and every token is the one the model gives for its sequence and position: a
    /// pending input is always the token the step before sampled for that sequence.
    #[test]
    fn stepping_one_ahead_gives_the_same_tokens(
        cfg in config(),
        ops in proptest::collection::vec(op(), 1..150),
        launch_choices in proptest::collection::vec(any::<bool>(), 64),
    ) {
        let mut sched = Scheduler::new(cfg.clone()).unwrap();
        let mut sent = Sent::default();
        let mut generated: HashMap<RequestId, Vec<TokenId>> = HashMap::new();
        let mut in_flight: Option<ScheduledBatch> = None;
        let mut steps = 0usize;

        let mut step = |sched: &mut Scheduler,
                        in_flight: &mut Option<ScheduledBatch>,
                        sent: &mut Sent,
                        generated: &mut HashMap<RequestId, Vec<TokenId>>|
         -> Result<(), TestCaseError> {
            steps += 1;
            let current = match in_flight.take() {
                Some(batch) => batch,
                None => {
                    let batch = sched.schedule();
                    if batch.is_empty() {
                        return Ok(());
                    }
                    batch
                }
            };
            // Scheduled while `current` is in flight; given to the model before its update
            // (`launched`) or kept until after it and completed by `resolve_pending`.
            let mut ahead = sched.schedule();
            let launched = launch_choices[steps % launch_choices.len()];
            prop_assert!(ahead.num_tokens() <= cfg.max_batched_tokens, "budget exceeded");
            prop_assert!(ahead.seqs.len() <= cfg.max_running, "too many sequences");
            for s in &ahead.seqs {
                prop_assert!(s.block_table.len() * cfg.block_size >= s.end_position(), "blocks do not cover the tokens");
                if s.last_token_pending {
                    // Its input is the token the step in flight samples for it.
                    let before = current.seqs.iter().find(|c| c.id == s.id);
                    prop_assert!(before.is_some_and(|c| c.needs_logits && c.end_position() + 1 == s.end_position()), "a pending token no step in flight samples");
                }
            }
            for event in sched.update(&fake_sample(&current)) {
                let tokens = generated.entry(event.id).or_default();
                tokens.push(event.token);
                let position = sent.lengths[&event.id].0 + tokens.len() - 1;
                prop_assert_eq!(event.token, fake_token(event.id, position), "a token the model never gave there");
                sent.check_event(&event, tokens.len())?;
            }
            if !launched {
                sched.resolve_pending(&mut ahead);
                for s in &ahead.seqs {
                    prop_assert!(!s.last_token_pending);
                    let sequence = sched.sequence_tokens(s.id);
                    prop_assert_eq!(s.tokens.last(), sequence.get(s.end_position() - 1), "a resolved token differs from the sequence's");
                }
            }
            *in_flight = (!ahead.is_empty()).then_some(ahead);
            Ok(())
        };

        for op in ops {
            match op {
                Op::Step => step(&mut sched, &mut in_flight, &mut sent, &mut generated)?,
                other => sent.apply(&mut sched, &other)?,
            }
        }
        let mut drain = 0;
        while sched.has_work() || in_flight.is_some() {
            step(&mut sched, &mut in_flight, &mut sent, &mut generated)?;
            drain += 1;
            prop_assert!(drain < 10_000, "the scheduler stopped making progress");
        }
        sent.check_all_ended()?;
        let kv = sched.stats().kv;
        prop_assert_eq!(kv.free_blocks, kv.total_blocks, "blocks leaked");
    }
}
