//! Batch invariance through the whole engine: the real scheduler drives the real CPU
//! runner on the embedded model. Each prompt's greedy output must be identical whether
//! it runs alone or with the others — arriving at different times, sharing a cached
//! prefix, and after being preempted — and whether the engine runs one step at a time
//! or queues each behind the one in flight (overlapped steps).

use std::sync::Arc;
use std::time::Duration;

use heddle_core::{FinishReason, Priority, SamplingParams, SchedulerConfig, StopCriteria, TokenId};
use heddle_model::chat_template::ChatMessage;
use heddle_model::computed_at_launch::ComputedAtLaunch;
use heddle_model::{embedded_model_path, load_cpu, KvSize, ModelRunner};
use heddle_server::engine::{Engine, EngineEvent, EngineHandle, GenerationRequest, Submitted};

const OUTPUT_TOKENS: usize = 24;
const BLOCK_SIZE: usize = 16;

const QUESTIONS: [&str; 8] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "How do I reverse a string in Python?",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Name a famous painter.",
];

fn prompts(
    handle: &EngineHandle,
    template: &heddle_model::chat_template::ChatTemplate,
) -> Vec<Vec<TokenId>> {
    QUESTIONS
        .iter()
        .map(|q| {
            // A shared system prompt longer than a block gives prefix-cache hits.
            let messages = [
                ChatMessage::new("system", "You are a concise assistant. Answer in one or two sentences, plainly, without lists."),
                ChatMessage::new("user", *q),
            ];
            let text = template.render(&messages, true).unwrap();
            handle.tokenizer().encode_prompt(&text).unwrap()
        })
        .collect()
}

fn request(prompt: &[TokenId]) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.to_vec(),
        priority: Priority::Normal,
        sampling: SamplingParams::greedy(),
        stop: StopCriteria {
            ignore_eos: true,
            ..StopCriteria::new(OUTPUT_TOKENS)
        },
        arrived: std::time::Instant::now(),
        logits: Default::default(),
    }
}

fn collect(mut submitted: Submitted) -> Vec<TokenId> {
    let mut tokens = Vec::new();
    while let Some(event) = submitted.events.blocking_recv() {
        match event {
            EngineEvent::Token { token, .. } => tokens.push(token),
            EngineEvent::PromptLogprobs(_) => panic!("prompt log-probabilities not asked for"),
            EngineEvent::Finished { reason, usage, .. } => {
                assert_eq!(reason, FinishReason::Length);
                assert_eq!(usage.completion_tokens, OUTPUT_TOKENS);
                return tokens;
            }
        }
    }
    panic!("the engine dropped a request");
}

fn engine(
    num_blocks: usize,
    max_running: usize,
) -> (EngineHandle, heddle_model::chat_template::ChatTemplate) {
    engine_with(num_blocks, max_running, false)
}

/// An engine on the embedded model; with `overlapped`, its runner offers overlapped steps
/// (computed at launch), so the engine queues each step behind the one in flight.
fn engine_with(
    num_blocks: usize,
    max_running: usize,
    overlapped: bool,
) -> (EngineHandle, heddle_model::chat_template::ChatTemplate) {
    let path = embedded_model_path().expect("the embedded model (run scripts/fetch-model.sh)");
    let model = load_cpu(&path, KvSize::Blocks(num_blocks), BLOCK_SIZE).unwrap();
    let config = SchedulerConfig {
        num_blocks,
        block_size: BLOCK_SIZE,
        max_running,
        max_batched_tokens: 256,
        prefill_chunk: 64,
        max_model_len: 2048,
        ..SchedulerConfig::default()
    };
    let template = model.text.chat_template;
    let tokenizer = Arc::new(model.text.tokenizer);
    let runner: Box<dyn ModelRunner> = if overlapped {
        Box::new(ComputedAtLaunch::new(model.runner))
    } else {
        Box::new(model.runner)
    };
    let (handle, _thread) = Engine::spawn("test", runner, tokenizer, config).unwrap();
    (handle, template)
}

#[test]
fn greedy_outputs_do_not_depend_on_the_batch() {
    // Alone: a roomy cache and one request at a time.
    let (alone_engine, template) = engine(64, 8);
    let prompts = prompts(&alone_engine, &template);
    let alone: Vec<Vec<TokenId>> = prompts
        .iter()
        .map(|p| collect(alone_engine.submit_blocking(request(p)).unwrap()))
        .collect();

    // Together, in a cache too small for all of them at once: arrivals are staggered,
    // the system prompt's blocks are shared, and some sequences get preempted.
    let prompt_blocks: usize = prompts
        .iter()
        .map(|p| (p.len() + OUTPUT_TOKENS).div_ceil(BLOCK_SIZE))
        .sum();
    let num_blocks = prompt_blocks * 2 / 3;
    let (busy, _) = engine(num_blocks, 8);
    let mut pending = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        pending.push(busy.submit_blocking(request(p)).unwrap());
        if i % 3 == 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let together: Vec<Vec<TokenId>> = pending.into_iter().map(collect).collect();
    let stats = busy.stats();
    assert!(
        stats.preemptions > 0,
        "the test must exercise preemption: {stats:?}"
    );
    assert!(
        stats.kv.prefix_hit_tokens > 0,
        "the test must exercise prefix hits: {stats:?}"
    );

    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a, t,
            "prompt {i} ({:?}) changed inside a busy batch",
            QUESTIONS[i]
        );
    }

    // A repeat of the first prompt is served mostly from the cache, with the same output.
    let again = collect(busy.submit_blocking(request(&prompts[0])).unwrap());
    assert_eq!(again, alone[0]);
    let stats = busy.stats();
    assert_eq!(stats.kv.used_blocks, 0, "blocks leaked: {stats:?}");
}

/// What a request produced: its tokens, text, prompt log-probabilities (how many, and
/// the first finite one) and how it ended.
#[derive(Debug, PartialEq)]
struct Outcome {
    tokens: Vec<TokenId>,
    text: String,
    prompt_logprobs: Option<(usize, Option<f32>)>,
    reason: FinishReason,
}

fn outcome(mut submitted: Submitted) -> Outcome {
    let (mut tokens, mut text, mut prompt_logprobs) = (Vec::new(), String::new(), None);
    while let Some(event) = submitted.events.blocking_recv() {
        match event {
            EngineEvent::Token { token, text: t, .. } => {
                tokens.push(token);
                text.push_str(&t);
            }
            EngineEvent::PromptLogprobs(scores) => {
                let first = scores.iter().flatten().next().map(|s| s.logprob);
                prompt_logprobs = Some((scores.len(), first));
            }
            EngineEvent::Finished {
                reason, text: t, ..
            } => {
                text.push_str(&t);
                return Outcome {
                    tokens,
                    text,
                    prompt_logprobs,
                    reason,
                };
            }
        }
    }
    panic!("the engine dropped a request");
}

#[test]
fn overlapped_steps_give_the_outputs_of_single_steps() {
    let (plain, template) = engine_with(48, 8, false);
    let prompts = prompts(&plain, &template);
    // Prompt 0 alone says where a stop string will cut it.
    let alone = outcome(plain.submit_blocking(request(&prompts[0])).unwrap());
    let stop = alone
        .text
        .chars()
        .skip(alone.text.chars().count() / 2)
        .take(3)
        .collect::<String>();
    // The stepping paths the engine can take: pending tokens decoded ahead, a stop string
    // (an end the scheduler cannot foresee), EOS, prompt scoring (launched only after the
    // step before is collected), penalties (the same), a logit bias (one step at a time),
    // and seeded sampling.
    let variants: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = request(p);
            match i {
                0 => r.stop.stop_strings = vec![stop.clone()],
                1 => r.stop.ignore_eos = false,
                2 => r.sampling.prompt_logprobs = Some(2),
                3 => r.sampling.frequency_penalty = 0.5,
                // Short, so that the engine goes back to overlapped steps after it.
                4 => {
                    r.logits.bias = vec![(13, 3.0)].into();
                    r.stop.max_tokens = 4;
                }
                5 => {
                    r.sampling = SamplingParams {
                        temperature: 0.9,
                        seed: Some(11),
                        ..SamplingParams::default()
                    };
                }
                _ => {}
            }
            r
        })
        .collect();
    let run = |engine: &EngineHandle| -> Vec<Outcome> {
        let mut pending = Vec::new();
        for (i, r) in variants.iter().enumerate() {
            pending.push(engine.submit_blocking(r.clone()).unwrap());
            if i % 3 == 2 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        pending.into_iter().map(outcome).collect()
    };
    let single = run(&plain);
    let (overlapped, _) = engine_with(48, 8, true);
    let queued = run(&overlapped);
    assert_eq!(
        single[0].reason,
        FinishReason::Stop,
        "the stop string {stop:?} must end prompt 0"
    );
    assert!(single[2]
        .prompt_logprobs
        .is_some_and(|(n, first)| n == prompts[2].len() && first.is_some()));
    for (i, (s, q)) in single.iter().zip(&queued).enumerate() {
        assert_eq!(s, q, "request {i} differs with overlapped steps");
    }
    let stats = overlapped.stats();
    assert_eq!(stats.kv.used_blocks, 0, "blocks leaked: {stats:?}");
}
