use super::*;
use crate::request::{SamplingParams, StopCriteria};

const EOS: TokenId = 2;

fn config(num_blocks: usize, block_size: usize) -> SchedulerConfig {
    SchedulerConfig {
        max_running: 4,
        max_batched_tokens: 64,
        prefill_chunk: 32,
        num_blocks,
        block_size,
        watermark: 0.0,
        ..SchedulerConfig::default()
    }
}

fn req(
    id: RequestId,
    prompt_len: usize,
    max_tokens: usize,
    priority: Priority,
    arrival: f64,
) -> Request {
    Request {
        id,
        prompt: (0..prompt_len as TokenId)
            .map(|t| 100 + t + id as TokenId * 1000)
            .collect(),
        priority,
        sampling: SamplingParams::greedy(),
        stop: StopCriteria {
            eos_token_ids: vec![EOS],
            ..StopCriteria::new(max_tokens)
        },
        arrival,
    }
}

/// A fake model: the next token depends only on the sequence and its position.
fn fake_sample(batch: &ScheduledBatch) -> Vec<SampledToken> {
    batch
        .seqs
        .iter()
        .filter(|s| s.needs_logits)
        .map(|s| SampledToken {
            id: s.id,
            token: 10 + (s.id as TokenId * 7 + s.end_position() as TokenId) % 50,
        })
        .collect()
}

fn step(sched: &mut Scheduler) -> (ScheduledBatch, Vec<StepEvent>) {
    let batch = sched.schedule();
    let events = sched.update(&fake_sample(&batch));
    (batch, events)
}

fn ids(batch: &ScheduledBatch) -> Vec<RequestId> {
    batch.seqs.iter().map(|s| s.id).collect()
}

fn assert_no_leak(sched: &Scheduler) {
    let kv = sched.stats().kv;
    assert_eq!(kv.free_blocks, kv.total_blocks, "blocks leaked: {kv:?}");
    assert_eq!(kv.used_blocks, 0);
}

#[test]
fn a_request_prefills_decodes_and_ends_by_length() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    sched.add(req(1, 6, 3, Priority::Normal, 0.0)).unwrap();
    let (batch, events) = step(&mut sched);
    let s = &batch.seqs[0];
    assert_eq!(
        (s.start_position, s.tokens.len(), s.needs_logits),
        (0, 6, true)
    );
    assert_eq!(s.block_table.len(), 2);
    assert_eq!(events.len(), 1);
    assert_eq!(sched.status(1), Some(RequestStatus::Running));

    let (batch, _) = step(&mut sched);
    let s = &batch.seqs[0];
    assert_eq!(
        (s.start_position, s.tokens.len(), s.num_generated),
        (6, 1, 1)
    );
    let (_, events) = step(&mut sched);
    assert_eq!(events[0].finish, Some(FinishReason::Length));
    assert_eq!(sched.status(1), None);
    assert!(!sched.has_work());
    assert_no_leak(&sched);
}

#[test]
fn long_prompts_are_prefilled_in_chunks_and_share_the_budget_with_decodes() {
    let mut cfg = config(64, 4);
    cfg.prefill_chunk = 16;
    cfg.max_batched_tokens = 20;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 3, 10, Priority::Normal, 0.0)).unwrap();
    step(&mut sched);
    sched.add(req(2, 40, 10, Priority::Normal, 1.0)).unwrap();
    // Step 2: one decode token for 1, a 16-token chunk for 2 (chunk limit).
    let (batch, events) = step(&mut sched);
    assert_eq!(ids(&batch), vec![1, 2]);
    assert_eq!(batch.seqs[1].tokens.len(), 16);
    assert!(!batch.seqs[1].needs_logits);
    assert_eq!(events.len(), 1, "only the decode produced a token");
    assert_eq!(sched.status(2), Some(RequestStatus::Prefilling));
    // Step 3: 1 + 16; step 4: 1 + the last 8 tokens, with logits.
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.seqs[1].start_position, 16);
    let (batch, events) = step(&mut sched);
    assert_eq!(
        (batch.seqs[1].start_position, batch.seqs[1].tokens.len()),
        (32, 8)
    );
    assert!(batch.seqs[1].needs_logits);
    assert_eq!(events.len(), 2);
    assert!(batch.num_tokens() <= 20);
    assert_eq!(sched.status(2), Some(RequestStatus::Running));
}

#[test]
fn the_token_budget_limits_a_prefill() {
    let mut cfg = config(64, 4);
    cfg.max_batched_tokens = 10;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 25, 2, Priority::Normal, 0.0)).unwrap();
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.num_tokens(), 10);
}

#[test]
fn eos_and_stop_tokens_end_a_request_unless_eos_is_ignored() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    let mut r = req(1, 2, 10, Priority::Normal, 0.0);
    r.stop.stop_token_ids = vec![42];
    sched.add(r).unwrap();
    let mut r = req(2, 2, 10, Priority::Normal, 0.0);
    r.stop.ignore_eos = true;
    sched.add(r).unwrap();
    sched.schedule();
    let events = sched.update(&[
        SampledToken { id: 1, token: 42 },
        SampledToken { id: 2, token: EOS },
    ]);
    assert_eq!(events[0].finish, Some(FinishReason::Stop));
    assert_eq!(events[1].finish, None);
    sched.schedule();
    let events = sched.update(&[SampledToken { id: 2, token: 5 }]);
    assert_eq!(events[0].finish, None);
    let mut r = req(3, 2, 10, Priority::Normal, 0.0);
    r.stop.ignore_eos = false;
    sched.add(r).unwrap();
    sched.schedule();
    let events = sched.update(&[
        SampledToken { id: 2, token: 6 },
        SampledToken { id: 3, token: EOS },
    ]);
    assert_eq!(events[1].finish, Some(FinishReason::Stop));
}

#[test]
fn admission_follows_effective_priority() {
    let mut cfg = config(64, 4);
    cfg.max_running = 1;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 2, 1, Priority::Low, 0.0)).unwrap();
    sched.add(req(2, 2, 1, Priority::Normal, 5.0)).unwrap();
    sched.add(req(3, 2, 1, Priority::High, 6.0)).unwrap();
    sched.add(req(4, 2, 1, Priority::Normal, 15.0)).unwrap();
    // Keys: 1 → 2.0, 2 → 1.5, 3 → 0.6, 4 → 2.5.
    let order: Vec<_> = (0..4).map(|_| ids(&step(&mut sched).0)).collect();
    assert_eq!(order, vec![vec![3], vec![2], vec![1], vec![4]]);
}

#[test]
fn a_shared_prefix_is_reused_from_the_cache() {
    let mut sched = Scheduler::new(config(32, 4)).unwrap();
    let a = req(1, 10, 1, Priority::Normal, 0.0);
    let mut b = req(2, 10, 1, Priority::Normal, 1.0);
    b.prompt = a.prompt.clone();
    b.prompt[9] = 7;
    sched.add(a).unwrap();
    step(&mut sched);
    assert_eq!(
        sched.cached_prompt_tokens(1),
        None,
        "finished requests are gone"
    );
    sched.add(b).unwrap();
    let batch = sched.schedule();
    assert_eq!(
        batch.seqs[0].start_position, 8,
        "two full blocks were cached"
    );
    assert_eq!(batch.seqs[0].tokens.len(), 2);
    assert_eq!(sched.cached_prompt_tokens(2), Some(8));
    let kv = sched.stats().kv;
    assert_eq!((kv.prefix_hit_tokens, kv.prefix_miss_tokens), (8, 12));
    sched.update(&fake_sample(&batch));
    assert_no_leak(&sched);
}

#[test]
fn kv_events_report_the_blocks_a_prompt_cached() {
    let mut sched = Scheduler::new(config(32, 4)).unwrap();
    sched.enable_kv_events();
    let a = req(1, 10, 1, Priority::Normal, 0.0);
    let prompt = a.prompt.clone();
    sched.add(a).unwrap();
    step(&mut sched);
    let first = crate::kv::block_hash(None, &prompt[..4]);
    let second = crate::kv::block_hash(Some(first), &prompt[4..8]);
    assert_eq!(
        sched.drain_kv_events(),
        vec![
            KvCacheEvent::AllBlocksCleared,
            KvCacheEvent::BlockStored {
                block_hashes: vec![first, second],
                parent_block_hash: None,
                token_ids: prompt[..8].to_vec(),
                block_size: 4,
            },
        ]
    );
    assert!(sched.drain_kv_events().is_empty());
}

#[test]
fn a_prompt_to_score_is_computed_in_full_and_scored_in_every_chunk() {
    let mut cfg = config(32, 4);
    cfg.prefill_chunk = 4;
    let mut sched = Scheduler::new(cfg).unwrap();
    let a = req(1, 10, 1, Priority::Normal, 0.0);
    let mut b = req(2, 10, 2, Priority::Normal, 1.0);
    b.prompt = a.prompt.clone();
    b.sampling.prompt_logprobs = Some(3);
    sched.add(a).unwrap();
    while sched.has_work() {
        step(&mut sched);
    }
    assert!(sched.stats().kv.cached_blocks >= 2, "the prompt is cached");
    sched.add(b).unwrap();
    let mut chunks = Vec::new();
    while sched.has_work() {
        let (batch, _) = step(&mut sched);
        let s = &batch.seqs[0];
        chunks.push((s.start_position, s.tokens.len(), s.prompt_logprobs));
    }
    assert_eq!(
        chunks,
        [
            (0, 4, Some(3)),
            (4, 4, Some(3)),
            (8, 2, Some(3)),
            (10, 1, None)
        ],
        "computed from the start despite the cache, scored until the first token"
    );
    assert_eq!(sched.stats().kv.prefix_hit_tokens, 0);
    assert_no_leak(&sched);
}

#[test]
fn a_scored_prompt_is_not_scored_again_after_preemption() {
    // As in the preemption test below: 3 is preempted after its first token.
    let mut cfg = config(6, 4);
    cfg.max_running = 3;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 8, 8, Priority::Normal, 0.0)).unwrap();
    sched.add(req(2, 8, 8, Priority::Normal, 1.0)).unwrap();
    let mut scored = req(3, 8, 8, Priority::Normal, 2.0);
    scored.sampling.prompt_logprobs = Some(0);
    sched.add(scored).unwrap();
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.seqs[2].prompt_logprobs, Some(0));
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.preempted, vec![3]);
    while sched.status(1).is_some() || sched.status(2).is_some() {
        step(&mut sched);
    }
    // Its prompt was scored and delivered with its first token: the recompute reuses
    // the cached prompt and scores nothing.
    let batch = sched.schedule();
    let s = &batch.seqs[0];
    assert_eq!((s.id, s.start_position, s.prompt_logprobs), (3, 8, None));
    sched.update(&fake_sample(&batch));
    while sched.has_work() {
        step(&mut sched);
    }
    assert_no_leak(&sched);
}

#[test]
fn a_scored_prompt_preempted_during_its_prefill_is_scored_from_the_start() {
    // 5 blocks of 4: the 16-token prompt's fourth chunk needs a fourth block while
    // the other sequence holds two.
    let mut cfg = config(5, 4);
    cfg.max_running = 2;
    cfg.prefill_chunk = 4;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 4, 8, Priority::Normal, 0.0)).unwrap();
    let mut scored = req(2, 16, 1, Priority::Normal, 1.0);
    scored.sampling.prompt_logprobs = Some(1);
    sched.add(scored).unwrap();
    let mut starts = Vec::new();
    while sched.has_work() {
        let (batch, _) = step(&mut sched);
        if !batch.preempted.is_empty() {
            starts.push(None);
        }
        for s in batch.seqs.iter().filter(|s| s.id == 2) {
            assert_eq!(s.prompt_logprobs, Some(1), "scored in every chunk");
            starts.push(Some(s.start_position));
        }
    }
    let preempted_at = starts
        .iter()
        .position(Option::is_none)
        .expect("the long prompt ran out of blocks");
    assert_eq!(
        starts[preempted_at + 1],
        Some(0),
        "recomputed from the start: {starts:?}"
    );
    assert_no_leak(&sched);
}

#[test]
fn a_request_that_needs_the_whole_pool_is_admitted_despite_the_watermark() {
    // 8 blocks of 5 tokens; the watermark keeps one block back while others run.
    let mut cfg = config(8, 5);
    cfg.watermark = 0.05;
    cfg.prefill_chunk = 40;
    let mut sched = Scheduler::new(cfg).unwrap();
    // The first 20 tokens get cached, so the whole rest fits in one chunk.
    let mut warm = req(1, 20, 1, Priority::Normal, 0.0);
    let long = req(2, 39, 1, Priority::Normal, 1.0);
    warm.prompt = long.prompt[..20].to_vec();
    sched.add(warm).unwrap();
    step(&mut sched);
    sched.add(long).unwrap();
    let (batch, events) = step(&mut sched);
    assert_eq!(ids(&batch), vec![2]);
    assert_eq!(batch.seqs[0].start_position, 20);
    assert_eq!(events.len(), 1);
    assert_no_leak(&sched);
}

#[test]
fn the_first_chunk_is_cut_to_the_blocks_above_the_watermark() {
    let mut cfg = config(8, 4);
    cfg.watermark = 0.25; // two blocks
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 12, 8, Priority::Normal, 0.0)).unwrap();
    sched.add(req(2, 20, 1, Priority::Normal, 1.0)).unwrap();
    let (batch, _) = step(&mut sched);
    // Request 1 holds 3 blocks, 2 are kept back: request 2 starts with 3 blocks.
    assert_eq!(ids(&batch), vec![1, 2]);
    assert_eq!(batch.seqs[1].tokens.len(), 12);
    while sched.has_work() {
        step(&mut sched);
    }
    assert_no_leak(&sched);
}

#[test]
fn running_out_of_blocks_preempts_the_least_urgent_latest_arrival() {
    // 6 blocks of 4 tokens; three sequences of 8-token prompts take 2 blocks each.
    let mut cfg = config(6, 4);
    cfg.max_running = 3;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 8, 8, Priority::Normal, 0.0)).unwrap();
    sched.add(req(2, 8, 8, Priority::Normal, 1.0)).unwrap();
    sched.add(req(3, 8, 8, Priority::Normal, 2.0)).unwrap();
    let (batch, _) = step(&mut sched);
    assert_eq!(ids(&batch), vec![1, 2, 3]);
    // Every sequence now needs a third block: the latest arrival (3) goes first.
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.preempted, vec![3]);
    assert_eq!(ids(&batch), vec![1, 2]);
    assert_eq!(sched.status(3), Some(RequestStatus::Preempted));
    assert_eq!(sched.stats().preemptions, 1);
    // Its generated token is kept: recompute covers prompt + output.
    assert_eq!(sched.sequence_tokens(3).len(), 9);
    while sched.status(1).is_some() || sched.status(2).is_some() {
        step(&mut sched);
    }
    let batch = sched.schedule();
    let s = &batch.seqs[0];
    assert_eq!(s.id, 3);
    assert_eq!(s.start_position + s.tokens.len(), 9);
    assert!(s.needs_logits);
    assert_eq!(s.num_generated, 1);
    sched.update(&fake_sample(&batch));
    while sched.has_work() {
        step(&mut sched);
    }
    assert_no_leak(&sched);
}

#[test]
fn a_less_urgent_victim_is_preempted_before_an_older_more_urgent_one() {
    let mut cfg = config(6, 4);
    cfg.max_running = 3;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 8, 8, Priority::Low, 0.0)).unwrap();
    sched.add(req(2, 8, 8, Priority::High, 1.0)).unwrap();
    sched.add(req(3, 8, 8, Priority::Normal, 2.0)).unwrap();
    step(&mut sched);
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.preempted, vec![1], "LOW has the largest key");
}

#[test]
fn a_strictly_more_urgent_request_takes_a_seat_but_only_after_progress() {
    let mut cfg = config(64, 4);
    cfg.max_running = 2;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 4, 20, Priority::Low, 0.0)).unwrap();
    sched.add(req(2, 4, 20, Priority::Normal, 0.0)).unwrap();
    step(&mut sched);
    // An equally urgent request does not preempt.
    sched.add(req(3, 4, 20, Priority::Low, 0.0)).unwrap();
    let (batch, _) = step(&mut sched);
    assert!(batch.preempted.is_empty());
    // A HIGH one takes the LOW one's seat.
    sched.add(req(4, 4, 20, Priority::High, 1.0)).unwrap();
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.preempted, vec![1]);
    assert_eq!(ids(&batch), vec![2, 4]);
    // 4's prefill already sampled a token; still, a second HIGH takes the NORMAL
    // seat, never the equally urgent HIGH one.
    sched.add(req(5, 4, 20, Priority::High, 1.0)).unwrap();
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.preempted, vec![2]);
    assert_eq!(ids(&batch), vec![4, 5]);
}

#[test]
fn priority_preemption_waits_for_progress_during_a_long_prefill() {
    let mut cfg = config(64, 4);
    cfg.max_running = 1;
    cfg.prefill_chunk = 8;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 30, 4, Priority::Low, 0.0)).unwrap();
    step(&mut sched);
    sched.add(req(2, 4, 4, Priority::High, 1.0)).unwrap();
    // The LOW prefill is mid-way: it keeps its seat until it has produced a token.
    for _ in 0..3 {
        let (batch, _) = step(&mut sched);
        assert_eq!(ids(&batch), vec![1]);
    }
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.preempted, vec![1]);
    assert_eq!(ids(&batch), vec![2]);
}

#[test]
fn cancellation_works_in_every_stage_and_frees_blocks() {
    let mut cfg = config(64, 4);
    cfg.max_running = 2;
    cfg.prefill_chunk = 4;
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 3, 10, Priority::Normal, 0.0)).unwrap(); // will run
    sched.add(req(2, 20, 10, Priority::Normal, 1.0)).unwrap(); // will prefill
    sched.add(req(3, 3, 10, Priority::Normal, 2.0)).unwrap(); // will wait
    step(&mut sched);
    assert_eq!(sched.status(1), Some(RequestStatus::Running));
    assert_eq!(sched.status(2), Some(RequestStatus::Prefilling));
    assert_eq!(sched.status(3), Some(RequestStatus::Waiting));
    assert!(sched.stats().kv.used_blocks > 0);
    assert!(sched.cancel(3));
    assert!(sched.cancel(2));
    assert!(sched.cancel(1));
    assert!(!sched.cancel(1), "a second cancel finds nothing");
    assert!(!sched.has_work());
    assert_eq!(sched.stats().waiting, [0, 0, 0]);
    assert_no_leak(&sched);
}

#[test]
fn cancelling_between_schedule_and_update_drops_the_output() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    sched.add(req(1, 3, 10, Priority::Normal, 0.0)).unwrap();
    let batch = sched.schedule();
    assert!(sched.cancel(1));
    assert!(sched.update(&fake_sample(&batch)).is_empty());
    assert_no_leak(&sched);
}

#[test]
fn an_aborted_step_credits_nothing_and_caches_nothing() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    sched.add(req(1, 10, 5, Priority::Normal, 0.0)).unwrap();
    sched.add(req(2, 3, 5, Priority::Normal, 0.0)).unwrap();
    let batch = sched.schedule();
    assert_eq!(ids(&batch), vec![1, 2]);
    assert_eq!(sched.abort_step(), vec![1, 2]);
    assert_eq!(sched.status(1), None);
    assert!(!sched.has_work());
    assert_eq!(
        sched.stats().kv.cached_blocks,
        0,
        "unwritten blocks were cached"
    );
    assert_no_leak(&sched);

    // The same prompt again starts from nothing and computes it all.
    let mut again = req(3, 10, 5, Priority::Normal, 1.0);
    again.prompt = req(1, 10, 5, Priority::Normal, 0.0).prompt;
    sched.add(again).unwrap();
    let (batch, _) = step(&mut sched);
    assert_eq!(batch.seqs[0].start_position, 0);
    assert_eq!(sched.cached_prompt_tokens(3), Some(0));
}

#[test]
fn aborting_a_later_step_keeps_what_earlier_steps_computed() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    sched.add(req(1, 8, 5, Priority::Normal, 0.0)).unwrap();
    step(&mut sched); // the 8 prompt tokens: two full blocks, written and cached
    sched.schedule();
    assert_eq!(sched.abort_step(), vec![1]);
    assert_eq!(sched.stats().kv.cached_blocks, 2);
    assert_no_leak(&sched);
    let mut again = req(2, 8, 5, Priority::Normal, 1.0);
    again.prompt = req(1, 8, 5, Priority::Normal, 0.0).prompt;
    sched.add(again).unwrap();
    step(&mut sched);
    // All but the last token come from the cache (one is recomputed for its logits).
    assert_eq!(sched.cached_prompt_tokens(2), Some(4));
}

#[test]
fn finish_ends_a_running_request_on_a_stop_string() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    sched.add(req(1, 3, 10, Priority::Normal, 0.0)).unwrap();
    step(&mut sched);
    sched.finish(1, FinishReason::Stop).unwrap();
    assert!(sched.finish(1, FinishReason::Stop).is_err());
    assert_no_leak(&sched);
}

#[test]
fn a_full_queue_refuses_or_displaces() {
    let mut cfg = config(16, 4);
    cfg.queue_capacity = Some(2);
    let mut sched = Scheduler::new(cfg).unwrap();
    sched.add(req(1, 3, 1, Priority::Normal, 0.0)).unwrap();
    sched.add(req(2, 3, 1, Priority::Low, 0.0)).unwrap();
    assert_eq!(
        sched.add(req(3, 3, 1, Priority::Low, 0.0)),
        Err(AddError::QueueFull)
    );
    assert_eq!(
        sched.add(req(4, 3, 1, Priority::High, 0.0)),
        Ok(AddOutcome::QueuedDisplacing(2))
    );
    assert_eq!(sched.status(2), None);
    let stats = sched.stats();
    assert_eq!(
        (stats.refused, stats.displaced, stats.waiting),
        (1, 1, [1, 1, 0])
    );
}

#[test]
fn invalid_and_oversized_requests_are_refused() {
    let mut cfg = config(4, 4);
    cfg.max_model_len = 100;
    let mut sched = Scheduler::new(cfg).unwrap();
    let err = sched.add(req(1, 10, 7, Priority::Normal, 0.0)).unwrap_err();
    assert_eq!(
        err,
        AddError::Invalid(CoreError::ContextTooLong {
            needed: 17,
            limit: 16
        })
    );
    sched.add(req(1, 10, 6, Priority::Normal, 0.0)).unwrap();
    assert!(matches!(
        sched.add(req(1, 2, 2, Priority::Normal, 0.0)),
        Err(AddError::Invalid(CoreError::DuplicateRequest(1)))
    ));
    let mut bad = req(2, 2, 2, Priority::Normal, 0.0);
    bad.sampling.top_p = 0.0;
    assert!(sched.add(bad).is_err());
    assert!(Scheduler::new(SchedulerConfig {
        max_running: 0,
        ..config(4, 4)
    })
    .is_err());
}

#[test]
fn a_low_request_is_not_starved_by_a_stream_of_high_ones() {
    // One seat, one step per request (1-token prompt, 1 output token): 10 requests/s at
    // 0.1 s per step. HIGH requests arrive at 20/s, twice what is served.
    let mut cfg = config(64, 4);
    cfg.max_running = 1;
    let mut sched = Scheduler::new(cfg).unwrap();
    let (dt, high_per_step, low_arrival) = (0.1, 2, 1.0);
    let mut next_id = 10;
    let mut now = 0.0;
    let mut low_admitted_at = None;
    let mut highs_admitted_before_low = Vec::new();
    for _ in 0..2000 {
        for _ in 0..high_per_step {
            sched.add(req(next_id, 1, 1, Priority::High, now)).unwrap();
            next_id += 1;
        }
        if (now - low_arrival).abs() < 1e-9 {
            sched.add(req(1, 1, 1, Priority::Low, now)).unwrap();
        }
        let batch = sched.schedule();
        for s in &batch.seqs {
            if s.id == 1 {
                low_admitted_at.get_or_insert(now);
            } else if low_admitted_at.is_none() {
                highs_admitted_before_low.push((s.id - 10) / high_per_step as u64);
            }
        }
        sched.update(&fake_sample(&batch));
        now += dt;
        if low_admitted_at.is_some() {
            break;
        }
    }
    let admitted = low_admitted_at.expect("the LOW request was starved");
    // Aging makes LOW as urgent as HIGH after (2 − 0) / 0.1 = 20 s of waiting, so no
    // HIGH request that arrived later than 21 s can go first...
    let aging_crossover = low_arrival + 2.0 / DEFAULT_AGING_RATE;
    let latest_high_arrival = *highs_admitted_before_low.iter().max().unwrap() as f64 * dt;
    assert!(
        latest_high_arrival <= aging_crossover + 1e-9,
        "{latest_high_arrival}"
    );
    // ...so the LOW request waits at most for the HIGH ones that arrived before then,
    // served at one per step.
    let ahead = (aging_crossover / dt + 1.0) * high_per_step as f64;
    let bound = ahead * dt + dt;
    assert!(
        admitted <= bound,
        "admitted at {admitted} s, bound {bound} s"
    );
    assert!(
        admitted > aging_crossover,
        "saturated: it cannot go before the crossover"
    );
}

#[test]
fn one_step_ahead_decodes_the_pending_token_and_skips_what_ends_by_length() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    sched.add(req(1, 6, 3, Priority::Normal, 0.0)).unwrap();
    sched.add(req(2, 5, 1, Priority::Normal, 0.0)).unwrap();
    let prefill = sched.schedule();
    assert!(prefill.seqs.iter().all(|s| s.needs_logits));
    // Scheduled while the prefill is in flight: request 1 decodes the token the prefill
    // samples for it (pending, at position 6); request 2's one token ends it by length.
    let ahead = sched.schedule();
    assert_eq!(ids(&ahead), vec![1]);
    let decode = &ahead.seqs[0];
    assert!(decode.last_token_pending && decode.needs_logits);
    assert_eq!((decode.start_position, decode.tokens.len()), (6, 1));
    assert_eq!(decode.num_generated, 1);
    let events = sched.update(&fake_sample(&prefill));
    assert_eq!(events.len(), 2);
    assert_eq!(events[1].finish, Some(FinishReason::Length));
    // The pending token is the one the prefill sampled.
    assert_eq!(sched.sequence_tokens(1)[6], events[0].token);
    // Request 1 now has two pending samples' worth of scheduling; the next step ahead
    // decodes position 7, and after its third token nothing more is scheduled.
    let next = sched.schedule();
    assert_eq!(next.seqs[0].start_position, 7);
    sched.update(&fake_sample(&ahead));
    assert!(
        sched.schedule().is_empty(),
        "the third token ends it by length"
    );
    let events = sched.update(&fake_sample(&next));
    assert_eq!(events[0].finish, Some(FinishReason::Length));
    assert!(!sched.has_work());
    assert_eq!(sched.stats().kv.used_blocks, 0);
}

#[test]
fn a_failure_one_step_ahead_ends_each_sequence_once() {
    let mut sched = Scheduler::new(config(16, 4)).unwrap();
    sched.add(req(1, 6, 8, Priority::Normal, 0.0)).unwrap();
    sched.add(req(2, 5, 8, Priority::Normal, 0.0)).unwrap();
    let _prefill = sched.schedule();
    let ahead = sched.schedule();
    assert_eq!(ids(&ahead), vec![1, 2]);
    // Both steps are abandoned: each sequence ends once, with all its blocks.
    assert_eq!(sched.abort_step(), vec![1, 2]);
    assert!(!sched.has_work());
    assert_eq!(sched.stats().kv.used_blocks, 0);
    // Nothing of them is left to credit.
    assert!(sched.update(&fake_sample(&ahead)).is_empty());
}
