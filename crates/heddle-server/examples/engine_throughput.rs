//! Engine throughput on CPU, with no HTTP in the way: N concurrent requests of about 128
//! random prompt tokens and 128 output tokens (ignore_eos, greedy) on a model, for each
//! N given. Prints output tokens per second and the speedup over N = 1.
//!
//! With `--json-schema`, each level runs twice, without and with a JSON schema that the
//! 128 tokens cannot complete (an array of at least 200 integers), so both runs generate
//! the same number of tokens; it prints both rates, their ratio, and the mean time per
//! step to compute the grammar masks and the part of it sampling waited for.
//!
//! With `--cuda-shape CONFIG` (built with `--features cuda`), the model runs on the GPU
//! with random weights at CONFIG's shape (an HF config.json) and MODEL's tokenizer (its
//! vocabulary replaces CONFIG's): on random weights only the grammar can make the output
//! valid. With `--check-valid N`, N requests at once then sample (temperature 1) under a
//! schema the output can complete, and every output must be a JSON document valid under
//! it, ended by the grammar (`stop`), not by the token limit.
//!
//! cargo run --release --example engine_throughput -- [MODEL] [--concurrency 1,4,16]
//!     [--json-schema] [--cuda-shape CONFIG] [--check-valid N]

use std::sync::Arc;
use std::time::Instant;

use heddle_core::{FinishReason, Priority, SamplingParams, SchedulerConfig, StopCriteria, TokenId};
use heddle_model::grammar::{GrammarSpec, TokenConstraint};
use heddle_model::runner::ModelRunner;
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
    let mut cuda_shape: Option<std::path::PathBuf> = None;
    let mut check_valid = 0usize;
    while let Some(arg) = args.next() {
        if arg == "--json-schema" {
            with_schema = true;
        } else if arg == "--cuda-shape" {
            let config = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--cuda-shape needs a config.json"))?;
            cuda_shape = Some(config.into());
        } else if arg == "--check-valid" {
            let n = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--check-valid needs a number"))?;
            check_valid = n.parse()?;
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
    let max_level = *levels.iter().max().unwrap_or(&1).max(&check_valid);
    let needed_blocks = max_level * (PROMPT_TOKENS + VALID_MAX_TOKENS).div_ceil(BLOCK_SIZE) + 8;
    let warm_up = cuda_shape.is_some();
    let (runner, tokenizer, num_blocks) = match cuda_shape {
        Some(config) => cuda_runner(&path, &config, max_level)?,
        None => {
            let loaded = load_cpu(&path, KvSize::Blocks(needed_blocks), BLOCK_SIZE)?;
            let runner: Box<dyn ModelRunner> = Box::new(loaded.runner);
            (runner, loaded.text.tokenizer, needed_blocks)
        }
    };
    let vocab = runner.config().vocab_size as TokenId;
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
    let tokenizer = Arc::new(tokenizer);
    let (engine, _thread) =
        Engine::spawn_with("bench", runner, tokenizer.clone(), config, options)?;
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
            "| concurrency | free tok/s | schema tok/s | ratio | mask ms/step | wait ms/step \
             | free steps: n, model + engine ms | schema steps: n, model + engine ms |"
        );
        println!("|---|---|---|---|---|---|---|---|");
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
        if warm_up {
            // The GPU captures a CUDA graph per padded batch size (and per kind of step)
            // on first use; time only steady steps.
            run(&engine, &prompts, None)?;
            if let Some(constraint) = &constraint {
                run(&engine, &prompts, Some(constraint))?;
            }
        }
        let step_times = StepTimes::start(&metrics);
        let (free, seconds) = run(&engine, &prompts, None)?;
        let free_steps = step_times.finish(&metrics);
        if let Some(constraint) = &constraint {
            let before = metrics.grammar_mask.count_and_sum();
            let waited_before = metrics.grammar_mask_wait.count_and_sum();
            let step_times = StepTimes::start(&metrics);
            let (constrained, _) = run(&engine, &prompts, Some(constraint))?;
            let schema_steps = step_times.finish(&metrics);
            let (steps, mask) = delta(metrics.grammar_mask.count_and_sum(), before);
            let (_, wait) = delta(metrics.grammar_mask_wait.count_and_sum(), waited_before);
            println!(
                "| {n} | {free:.1} | {constrained:.1} | {:.3} | {:.3} | {:.3} | {free_steps} | {schema_steps} |",
                constrained / free,
                mask * 1e3 / steps,
                wait * 1e3 / steps
            );
        } else {
            let base = *single.get_or_insert(free);
            println!("| {n} | {free:.1} | {seconds:.2} | {:.2}x |", free / base);
        }
    }
    if check_valid > 0 {
        let before = metrics.grammar_mask.count_and_sum();
        check_outputs_valid(&engine, &tokenizer, check_valid, vocab, &mut rng)?;
        let (steps, mask) = delta(metrics.grammar_mask.count_and_sum(), before);
        println!(
            "RESULT structured_valid mask_ms_per_step={:.3}",
            mask * 1e3 / steps
        );
    }
    Ok(())
}

/// Most tokens a `--check-valid` request may take; the schema's documents need far fewer.
const VALID_MAX_TOKENS: usize = 256;

/// A schema whose documents are short (bounded strings, numbers and arrays), with the
/// kinds of constraint a client uses: nesting, enums, bounds, optional null.
fn completable_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 99999},
            "name": {"type": "string", "maxLength": 12},
            "colour": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "minItems": 1, "maxItems": 3},
            "owner": {"anyOf": [{"type": "null"}, {
                "type": "object",
                "properties": {"active": {"type": "boolean"}},
                "required": ["active"], "additionalProperties": false
            }]}
        },
        "required": ["id", "name", "colour", "tags", "owner"],
        "additionalProperties": false
    })
}

/// Why `text` is not a document of [`completable_schema`], or None.
fn schema_violation(text: &str) -> Option<String> {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return Some(format!("not JSON ({e})")),
    };
    let object = value.as_object()?;
    let keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut expected = vec!["colour", "id", "name", "owner", "tags"];
    let mut sorted = keys.clone();
    sorted.sort_unstable();
    expected.sort_unstable();
    if sorted != expected {
        return Some(format!("keys {keys:?}"));
    }
    let id_ok = object["id"].as_u64().is_some_and(|id| id <= 99999);
    let name_ok = object["name"]
        .as_str()
        .is_some_and(|n| n.chars().count() <= 12);
    let colour_ok = matches!(object["colour"].as_str(), Some("red" | "green" | "blue"));
    let tags_ok = object["tags"].as_array().is_some_and(|tags| {
        (1..=3).contains(&tags.len())
            && tags
                .iter()
                .all(|t| t.as_str().is_some_and(|t| t.chars().count() <= 6))
    });
    let owner = &object["owner"];
    let owner_ok = owner.is_null()
        || owner.as_object().is_some_and(|o| {
            o.len() == 1 && o.get("active").is_some_and(serde_json::Value::is_boolean)
        });
    match (id_ok, name_ok, colour_ok, tags_ok, owner_ok) {
        (true, true, true, true, true) => None,
        flags => Some(format!(
            "bad values (id, name, colour, tags, owner ok: {flags:?})"
        )),
    }
}

/// `n` requests at once under [`completable_schema`], sampled at temperature 1: every
/// output must be a valid document that the grammar ended.
fn check_outputs_valid(
    engine: &EngineHandle,
    tokenizer: &heddle_model::tokenizer::Tokenizer,
    n: usize,
    vocab: TokenId,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> anyhow::Result<()> {
    let constraint = engine
        .grammar_compiler()?
        .compile(&GrammarSpec::JsonSchema(completable_schema()))?;
    let started = Instant::now();
    let submitted: Vec<_> = (0..n)
        .map(|i| {
            let prompt = (0..PROMPT_TOKENS)
                .map(|_| rng.random_range(17..vocab))
                .collect();
            engine.submit_blocking(GenerationRequest {
                prompt,
                priority: Priority::Normal,
                sampling: SamplingParams {
                    temperature: 1.0,
                    seed: Some(i as u64),
                    ..SamplingParams::default()
                },
                stop: StopCriteria::new(VALID_MAX_TOKENS),
                arrived: Instant::now(),
                logits: SequenceLogits {
                    constraint: Some(constraint.clone()),
                    ..SequenceLogits::default()
                },
            })
        })
        .collect::<Result<_, _>>()?;
    let (mut valid, mut generated) = (0usize, 0usize);
    let mut first_failure = None;
    for mut s in submitted {
        let mut tokens = Vec::new();
        let mut reason = None;
        while let Some(event) = s.events.blocking_recv() {
            match event {
                EngineEvent::Token { token, .. } => tokens.push(token),
                EngineEvent::PromptLogprobs(_) => {}
                EngineEvent::Finished { reason: r, .. } => {
                    reason = Some(r);
                    break;
                }
            }
        }
        generated += tokens.len();
        let text = tokenizer.decode(&tokens, true)?;
        let failure = match reason {
            Some(FinishReason::Stop) => schema_violation(&text),
            other => Some(format!("finished with {other:?}")),
        };
        match failure {
            None => valid += 1,
            Some(why) => {
                first_failure.get_or_insert(format!("{why}: {text:?}"));
            }
        }
    }
    println!(
        "RESULT structured_valid requests={n} valid={valid} output_tokens={generated} seconds={:.2}",
        started.elapsed().as_secs_f64()
    );
    if let Some(failure) = first_failure {
        anyhow::bail!(
            "{} of {n} outputs are not valid; first: {failure}",
            n - valid
        );
    }
    Ok(())
}

/// A CUDA runner with random weights at `shape`'s geometry and the vocabulary of
/// `tokenizer_model`'s tokenizer, its KV cache sized for `max_running` requests.
#[cfg(feature = "cuda")]
fn cuda_runner(
    tokenizer_model: &std::path::Path,
    shape: &std::path::Path,
    max_running: usize,
) -> anyhow::Result<(
    Box<dyn ModelRunner>,
    heddle_model::tokenizer::Tokenizer,
    usize,
)> {
    use heddle_cuda::{dummy, CudaOptions, CudaRunner, WeightSource};
    // Only the header and metadata are read: the file may be a GGUF cut after them.
    let text = heddle_model::tokenizer::TokenizerBundle::from_gguf_file(tokenizer_model)?;
    let mut config = dummy::read_config(shape)?;
    config.vocab_size = text.tokenizer.vocab_size();
    let runner = CudaRunner::new(
        config,
        &WeightSource::Dummy { seed: 0 },
        CudaOptions {
            block_size: BLOCK_SIZE,
            max_running: max_running.next_power_of_two(),
            ..CudaOptions::default()
        },
    )?;
    let num_blocks = runner.num_blocks();
    Ok((Box::new(runner), text.tokenizer, num_blocks))
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner(
    _: &std::path::Path,
    _: &std::path::Path,
    _: usize,
) -> anyhow::Result<(
    Box<dyn ModelRunner>,
    heddle_model::tokenizer::Tokenizer,
    usize,
)> {
    anyhow::bail!("--cuda-shape needs a build with `--features cuda`")
}

/// The engine's steps over a run: how many, and the mean time in the model runner and
/// in the engine's own work around it.
struct StepTimes {
    model: (u64, f64),
    whole: (u64, f64),
}

impl StepTimes {
    fn start(metrics: &ModelMetrics) -> StepTimes {
        StepTimes {
            model: metrics.model_step.count_and_sum(),
            whole: metrics.engine_step.count_and_sum(),
        }
    }

    fn finish(&self, metrics: &ModelMetrics) -> String {
        let (steps, model) = delta(metrics.model_step.count_and_sum(), self.model);
        let (_, whole) = delta(metrics.engine_step.count_and_sum(), self.whole);
        format!(
            "{steps}, {:.3} + {:.3}",
            model * 1e3 / steps,
            (whole - model) * 1e3 / steps
        )
    }
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
                EngineEvent::PromptLogprobs(_) => {}
                EngineEvent::Finished { .. } => break,
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok((generated as f64 / seconds, seconds))
}
