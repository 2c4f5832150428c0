//! Engine throughput on CPU, with no HTTP in the way: N concurrent requests of about 128
//! random prompt tokens and 128 output tokens (ignore_eos, greedy) on a model, for each
//! N given. Prints output tokens per second and the speedup over N = 1.
//!
//! With `--json-schema`, each level runs twice, without and with a JSON schema that the
//! 128 tokens cannot complete (an array of at least 200 integers), so both runs generate
//! the same number of tokens; it prints both rates, their ratio, and the mean time per
//! step to compute the grammar masks and the part of it sampling waited for.
//!
//! cargo run --release --example engine_throughput -- [MODEL] [--concurrency 1,4,16] [--json-schema]

use std::sync::Arc;
use std::time::Instant;

use heddle_core::{Priority, SamplingParams, SchedulerConfig, StopCriteria, TokenId};
use heddle_model::grammar::{GrammarSpec, TokenConstraint};
use heddle_model::{embedded_model_path, load_cpu, KvSize};
use heddle_server::engine::{Engine, EngineEvent, EngineHandle, EngineOptions, GenerationRequest};
use heddle_server::metrics::ModelMetrics;
use heddle_server::sequence_logits::SequenceLogits;
use rand::{Rng, SeedableRng};

const PROMPT_TOKENS: usize = 128;
const OUTPUT_TOKENS: usize = 128;
const BLOCK_SIZE: usize = 16;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut model = None;
    let mut levels = vec![1, 4, 16];
    let mut with_schema = false;
    while let Some(arg) = args.next() {
        if arg == "--json-schema" {
            with_schema = true;
        } else if arg == "--concurrency" {
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
    let metrics = Arc::new(ModelMetrics::default());
    let options = EngineOptions {
        metrics: metrics.clone(),
        ..EngineOptions::default()
    };
    let (engine, _thread) = Engine::spawn_with(
        "bench",
        Box::new(loaded.runner),
        Arc::new(loaded.text.tokenizer),
        config,
        options,
    )?;
    let constraint = if with_schema {
        let schema = serde_json::json!({
            "type": "array", "items": {"type": "integer"}, "minItems": 200
        });
        Some(
            engine
                .grammar_compiler()?
                .compile(&GrammarSpec::JsonSchema(schema))?,
        )
    } else {
        None
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut single = None;
    if with_schema {
        println!(
            "| concurrency | free tok/s | schema tok/s | ratio | mask ms/step | wait ms/step |"
        );
        println!("|---|---|---|---|---|---|");
    } else {
        println!("| concurrency | output tok/s | seconds | speedup over 1 |");
        println!("|---|---|---|---|");
    }
    for &n in &levels {
        let prompts: Vec<Vec<TokenId>> = (0..n)
            // Ids below 17 are control tokens; random ordinary ones make a valid prompt.
            .map(|_| {
                (0..PROMPT_TOKENS)
                    .map(|_| rng.random_range(17..vocab))
                    .collect()
            })
            .collect();
        let (free, seconds) = run(&engine, &prompts, None)?;
        if let Some(constraint) = &constraint {
            let before = metrics.grammar_mask.count_and_sum();
            let waited_before = metrics.grammar_mask_wait.count_and_sum();
            let (constrained, _) = run(&engine, &prompts, Some(constraint))?;
            let (steps, mask) = delta(metrics.grammar_mask.count_and_sum(), before);
            let (_, wait) = delta(metrics.grammar_mask_wait.count_and_sum(), waited_before);
            println!(
                "| {n} | {free:.1} | {constrained:.1} | {:.3} | {:.3} | {:.3} |",
                constrained / free,
                mask * 1e3 / steps,
                wait * 1e3 / steps
            );
        } else {
            let base = *single.get_or_insert(free);
            println!("| {n} | {free:.1} | {seconds:.2} | {:.2}x |", free / base);
        }
    }
    Ok(())
}

fn delta(after: (u64, f64), before: (u64, f64)) -> (f64, f64) {
    ((after.0 - before.0).max(1) as f64, after.1 - before.1)
}

/// Generates for every prompt at once; returns output tokens per second and seconds.
fn run(
    engine: &EngineHandle,
    prompts: &[Vec<TokenId>],
    constraint: Option<&TokenConstraint>,
) -> anyhow::Result<(f64, f64)> {
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .map(|prompt| GenerationRequest {
            prompt: prompt.clone(),
            priority: Priority::Normal,
            sampling: SamplingParams::greedy(),
            stop: StopCriteria {
                ignore_eos: true,
                ..StopCriteria::new(OUTPUT_TOKENS)
            },
            arrived: Instant::now(),
            logits: SequenceLogits {
                constraint: constraint.cloned(),
                ..SequenceLogits::default()
            },
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
    Ok((generated as f64 / seconds, seconds))
}
