//! Sampling a token allocates nothing the size of the vocabulary: a sampler keeps its
//! buffers, and what it returns is only the `top_logprobs` asked for. Counted by this
//! test binary's global allocator, per thread, so that other tests running at the same
//! time are not counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use heddle_core::{SamplingParams, TokenId};
use heddle_model::sampling::Sampler;

struct CountingAllocator;

thread_local! {
    /// (allocations, bytes) made by this thread.
    static ALLOCATED: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

fn count(bytes: usize) {
    // `try_with`: the allocator also runs while thread-locals are torn down.
    let _ = ALLOCATED.try_with(|a| {
        let (count, total) = a.get();
        a.set((count + 1, total + bytes));
    });
}

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// (allocations, bytes) made by `f` on this thread.
fn allocations(f: impl FnOnce()) -> (usize, usize) {
    let before = ALLOCATED.with(Cell::get);
    f();
    let after = ALLOCATED.with(Cell::get);
    (after.0 - before.0, after.1 - before.1)
}

const VOCAB: usize = 32_000;

fn logits() -> Vec<f32> {
    (0..VOCAB)
        .map(|i| ((i * 7919) % VOCAB) as f32 / 1000.0 - 16.0)
        .collect()
}

#[test]
fn a_warm_sampler_allocates_only_the_top_logprobs_it_returns() {
    let base = SamplingParams {
        temperature: 0.8,
        seed: Some(5),
        ..SamplingParams::default()
    };
    let cases = [
        (
            "greedy",
            SamplingParams {
                temperature: 0.0,
                ..base
            },
        ),
        ("temperature", base),
        ("top_k", SamplingParams { top_k: 40, ..base }),
        (
            "large top_k",
            SamplingParams {
                top_k: 20_000,
                ..base
            },
        ),
        ("top_p", SamplingParams { top_p: 0.9, ..base }),
        // Widens the sorted prefix to the whole vocabulary.
        (
            "top_p near 1",
            SamplingParams {
                top_p: 0.999_999,
                temperature: 50.0,
                ..base
            },
        ),
        (
            "min_p",
            SamplingParams {
                min_p: 0.05,
                ..base
            },
        ),
        (
            "penalties",
            SamplingParams {
                repetition_penalty: 1.2,
                frequency_penalty: 0.5,
                presence_penalty: 0.3,
                ..base
            },
        ),
        (
            "logprobs",
            SamplingParams {
                logprobs: true,
                ..base
            },
        ),
        (
            "top_logprobs",
            SamplingParams {
                logprobs: true,
                top_logprobs: 5,
                ..base
            },
        ),
    ];
    let history: Vec<TokenId> = (0..500).map(|i| (i * 37 % VOCAB) as TokenId).collect();
    let original = logits();
    let mut row = original.clone();
    let mut sampler = Sampler::default();
    for (name, params) in cases {
        // The first calls size the sampler's buffers.
        for step in 0..2 {
            row.copy_from_slice(&original);
            sampler.sample(&mut row, &params, &history, 250, step);
        }
        for step in 2..6 {
            row.copy_from_slice(&original);
            let mut sampled = None;
            let (count, bytes) = allocations(|| {
                sampled = Some(sampler.sample(&mut row, &params, &history, 250, step));
            });
            let top = params.top_logprobs as usize;
            let returned = top * size_of::<(TokenId, f32)>();
            assert_eq!(sampled.unwrap().top_logprobs.len(), top, "{name}");
            assert_eq!(
                (count, bytes),
                (usize::from(top > 0), returned),
                "{name}: {count} allocations of {bytes} bytes in all"
            );
        }
    }
}

#[test]
fn the_counter_sees_allocations() {
    // Guards the test above against a counter that counts nothing.
    let (count, bytes) = allocations(|| drop(std::hint::black_box(vec![0u8; 4096])));
    assert_eq!((count, bytes), (1, 4096));
}
