//! Cost of one scheduler step (`schedule()` + `update()`) with 256 running and 10,000
//! waiting sequences, in steady state: requests finish after 128 tokens and new ones
//! arrive to keep the queue at 10,000.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use heddle_core::{Priority, Request, SampledToken, Scheduler, SchedulerConfig};

const RUNNING: usize = 256;
const WAITING: usize = 10_000;
const PROMPT: usize = 64;
const OUTPUT: usize = 128;

fn request(id: u64) -> Request {
    let mut r = Request::new(
        id,
        (0..PROMPT as u32).map(|t| t + id as u32).collect(),
        OUTPUT,
        id as f64 * 1e-3,
    );
    r.priority = Priority::ALL[(id % 3) as usize];
    r
}

fn step(c: &mut Criterion) {
    let config = SchedulerConfig {
        max_running: RUNNING,
        max_batched_tokens: 2048,
        num_blocks: RUNNING * (PROMPT + OUTPUT).div_ceil(16) + 64,
        ..SchedulerConfig::default()
    };
    let mut sched = Scheduler::new(config).unwrap();
    let mut next_id = 0;
    for _ in 0..RUNNING + WAITING {
        sched.add(request(next_id)).unwrap();
        next_id += 1;
    }
    // Warm up until every seat is taken.
    for _ in 0..64 {
        let batch = sched.schedule();
        let sampled: Vec<_> = batch
            .seqs
            .iter()
            .filter(|s| s.needs_logits)
            .map(|s| SampledToken { id: s.id, token: 1 })
            .collect();
        sched.update(&sampled);
    }
    assert_eq!(sched.stats().running, RUNNING);

    let mut sampled = Vec::with_capacity(RUNNING);
    let mut batch = heddle_core::ScheduledBatch::default();
    c.bench_function("schedule+update, 256 running, 10k waiting", |b| {
        b.iter(|| {
            sched.schedule_into(&mut batch);
            sampled.clear();
            sampled.extend(
                batch
                    .seqs
                    .iter()
                    .filter(|s| s.needs_logits)
                    .map(|s| SampledToken { id: s.id, token: 1 }),
            );
            let events = sched.update(black_box(&sampled));
            for e in &events {
                if e.finish.is_some() {
                    sched.add(request(next_id)).unwrap();
                    next_id += 1;
                }
            }
            black_box(events.len())
        })
    });
}

criterion_group!(benches, step);
criterion_main!(benches);
