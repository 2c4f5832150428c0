//! Engine throughput on CPU, with no HTTP in the way: N concurrent requests of about 128
//! random prompt tokens and 128 output tokens (ignore_eos, greedy) on a model, for each
//! N given. Prints output tokens per second and the speedup over N = 1.
//!
//! cargo run --release --example engine_throughput -- [MODEL] [--concurrency 1,4,16]

use std::sync::Arc;
use std::time::Instant;

use heddle_core::{Priority, SamplingParams, SchedulerConfig, StopCriteria, TokenId};
use heddle_model::{embedded_model_path, load_cpu, KvSize};
use heddle_server::engine::{Engine, EngineEvent, GenerationRequest};
use rand::{Rng, SeedableRng};

const PROMPT_TOKENS: usize = 128;
const OUTPUT_TOKENS: usize = 128;
const BLOCK_SIZE: usize = 16;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let mut levels = vec![1, 4, 16];
    while let Some(arg) = args.next() {
        if arg == "--concurrency" {
            let list = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--concurrency needs a list"))?;
            levels = list.split(',').map(str::parse).collect::<Result<_, _>>()?;
        } else {
            model = Some(std::path::PathBuf::from(arg));
        }
    }
    let path = match model {
        Some(path) => path,
        None => embedded_model_path()?,
    };
    let max_level = *levels.iter().max().unwrap_or(&1);
    let num_blocks = max_level * (PROMPT_TOKENS + OUTPUT_TOKENS).div_ceil(BLOCK_SIZE) + 8;
    let loaded = load_cpu(&path, KvSize::Blocks(num_blocks), BLOCK_SIZE)?;
    let vocab = loaded.config().vocab_size as TokenId;
    let config = SchedulerConfig {
        num_blocks,
        block_size: BLOCK_SIZE,
        max_running: max_level,
        max_model_len: 4096,
        // No prefix sharing between random prompts; keep the cache from helping anyway.
        enable_prefix_cache: false,
        ..SchedulerConfig::default()
    };
    let (engine, _thread) = Engine::spawn(
        "bench",
        Box::new(loaded.runner),
        Arc::new(loaded.text.tokenizer),
        config,
    )?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut single = None;
    println!("| concurrency | output tok/s | seconds | speedup over 1 |");
    println!("|---|---|---|---|");
    for &n in &levels {
        let requests: Vec<GenerationRequest> = (0..n)
            .map(|_| GenerationRequest {
                // Ids below 17 are control tokens; random ordinary ones make a valid prompt.
                prompt: (0..PROMPT_TOKENS)
                    .map(|_| rng.random_range(17..vocab))
                    .collect(),
                priority: Priority::Normal,
                sampling: SamplingParams::greedy(),
                stop: StopCriteria {
                    ignore_eos: true,
                    ..StopCriteria::new(OUTPUT_TOKENS)
                },
                arrived: Instant::now(),
                logits: Default::default(),
            })
            .collect();
        let started = Instant::now();
        let submitted: Vec<_> = requests
            .into_iter()
            .map(|r| engine.submit_blocking(r))
            .collect::<Result<_, _>>()?;
        let mut generated = 0;
        for mut s in submitted {
            while let Some(event) = s.events.blocking_recv() {
                match event {
                    EngineEvent::Token { .. } => generated += 1,
                    EngineEvent::Finished { .. } => break,
                }
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let rate = generated as f64 / seconds;
        let base = *single.get_or_insert(rate);
        println!("| {n} | {rate:.1} | {seconds:.2} | {:.2}x |", rate / base);
    }
    Ok(())
}
