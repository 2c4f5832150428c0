//! Grammar constraints through the engine, with the real scheduler and CPU runner: a
//! completed grammar ends the output even when end-of-sequence is ignored, and a runner
//! that cannot apply masks refuses constrained requests instead of ignoring them (and one
//! that cannot score prompts refuses requests for prompt log-probabilities).

use std::sync::Arc;

use heddle_core::{
    FinishReason, Priority, SamplingParams, ScheduledBatch, SchedulerConfig, SequenceTokens,
    StopCriteria,
};
use heddle_model::grammar::GrammarSpec;
use heddle_model::runner::{ModelRunner, SampledOutput};
use heddle_model::{embedded_model_path, load_cpu, CpuRunner, KvSize, ModelConfig, ModelError};
use heddle_server::engine::{Engine, EngineEvent, EngineHandle, GenerationRequest, SubmitError};
use heddle_server::sequence_logits::SequenceLogits;

const BLOCK_SIZE: usize = 16;

/// The CPU runner seen only through [`ModelRunner::step`]: a runner that applies no
/// logits adjustments, as the GPU runner is today.
struct WithoutAdjustments(CpuRunner);

impl ModelRunner for WithoutAdjustments {
    fn config(&self) -> &ModelConfig {
        self.0.config()
    }

    fn step(
        &mut self,
        batch: &ScheduledBatch,
        history: &dyn SequenceTokens,
    ) -> Result<Vec<SampledOutput>, ModelError> {
        self.0.step(batch, history)
    }
}

fn engine(wrap: impl FnOnce(CpuRunner) -> Box<dyn ModelRunner>) -> EngineHandle {
    let path = embedded_model_path().expect("the embedded model (run scripts/fetch-model.sh)");
    let model = load_cpu(&path, KvSize::Blocks(32), BLOCK_SIZE).unwrap();
    let config = SchedulerConfig {
        num_blocks: 32,
        block_size: BLOCK_SIZE,
        max_model_len: 512,
        ..SchedulerConfig::default()
    };
    let tokenizer = Arc::new(model.text.tokenizer);
    Engine::spawn("test", wrap(model.runner), tokenizer, config)
        .unwrap()
        .0
}

fn request(handle: &EngineHandle, spec: &GrammarSpec, ignore_eos: bool) -> GenerationRequest {
    let constraint = handle.grammar_compiler().unwrap().compile(spec).unwrap();
    GenerationRequest {
        prompt: handle.tokenizer().encode_prompt("Pick a colour:").unwrap(),
        priority: Priority::Normal,
        sampling: SamplingParams::greedy(),
        stop: StopCriteria {
            ignore_eos,
            ..StopCriteria::new(50)
        },
        arrived: std::time::Instant::now(),
        logits: SequenceLogits {
            constraint: Some(constraint),
            ..SequenceLogits::default()
        },
    }
}

#[test]
fn a_completed_grammar_ends_the_output_even_past_ignored_eos() {
    let handle = engine(|runner| Box::new(runner));
    assert!(handle.applies_logits_adjustments());
    let spec = GrammarSpec::Choice(vec!["red".into(), "green".into(), "blue".into()]);
    for ignore_eos in [false, true] {
        let mut submitted = handle
            .submit_blocking(request(&handle, &spec, ignore_eos))
            .unwrap();
        let mut text = String::new();
        let finish = loop {
            match submitted.events.blocking_recv().expect("an event") {
                EngineEvent::Token { text: piece, .. } => text.push_str(&piece),
                EngineEvent::PromptLogprobs(_) => panic!("prompt log-probabilities not asked for"),
                EngineEvent::Finished {
                    reason,
                    text: rest,
                    usage,
                } => {
                    text.push_str(&rest);
                    assert!(usage.completion_tokens <= 3, "{usage:?}");
                    break reason;
                }
            }
        };
        assert_eq!(finish, FinishReason::Stop);
        assert!(
            ["red", "green", "blue"].contains(&text.as_str()),
            "{text:?}"
        );
    }
}

#[test]
fn a_runner_without_masks_refuses_constrained_requests() {
    let handle = engine(|runner| Box::new(WithoutAdjustments(runner)));
    assert!(!handle.applies_logits_adjustments());
    let spec = GrammarSpec::Regex("[0-9]+".into());
    match handle.submit_blocking(request(&handle, &spec, false)) {
        Err(SubmitError::Invalid(message)) => {
            assert!(message.contains("response_format"), "{message}")
        }
        other => panic!("a constrained request was taken: {other:?}"),
    }
    let mut biased = request(&handle, &spec, false);
    biased.logits = SequenceLogits {
        bias: Arc::from([(5, 1.0)]),
        constraint: None,
    };
    assert!(matches!(
        handle.submit_blocking(biased),
        Err(SubmitError::Invalid(_))
    ));
}

#[test]
fn a_runner_that_cannot_score_prompts_refuses_prompt_logprobs() {
    let handle = engine(|runner| Box::new(WithoutAdjustments(runner)));
    let request = GenerationRequest {
        prompt: handle.tokenizer().encode_prompt("Score me").unwrap(),
        priority: Priority::Normal,
        sampling: SamplingParams {
            prompt_logprobs: Some(1),
            ..SamplingParams::greedy()
        },
        stop: StopCriteria::new(0),
        arrived: std::time::Instant::now(),
        logits: SequenceLogits::default(),
    };
    match handle.submit_blocking(request.clone()) {
        Err(SubmitError::Unsupported { param, message }) => {
            assert_eq!(param, "echo");
            assert!(message.contains("echo"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The CPU runner scores it: the prompt's log-probabilities, then the end, no token.
    let handle = engine(|runner| Box::new(runner));
    let prompt_len = request.prompt.len();
    let mut submitted = handle.submit_blocking(request).unwrap();
    match submitted.events.blocking_recv() {
        Some(EngineEvent::PromptLogprobs(scored)) => {
            assert_eq!(scored.len(), prompt_len);
            assert!(scored[0].is_none());
            assert!(scored[1..]
                .iter()
                .all(|s| s.as_ref().is_some_and(|s| s.top.len() == 1)));
        }
        other => panic!("expected the prompt's log-probabilities, got {other:?}"),
    }
    match submitted.events.blocking_recv() {
        Some(EngineEvent::Finished { reason, usage, .. }) => {
            assert_eq!(reason, FinishReason::Length);
            assert_eq!(usage.completion_tokens, 0);
        }
        other => panic!("expected the end, got {other:?}"),
    }
}

/// The prompt log-probabilities of `prompt`, with `busy` requests running alongside.
fn score_among(handle: &EngineHandle, prompt: &[u32], busy: usize) -> Vec<Option<f32>> {
    let others: Vec<_> = (0..busy)
        .map(|i| {
            let filler = format!("Request {i} tells a long story about ships. ").repeat(8);
            let request = GenerationRequest {
                prompt: handle.tokenizer().encode_prompt(&filler).unwrap(),
                priority: Priority::Normal,
                sampling: SamplingParams::greedy(),
                stop: StopCriteria {
                    ignore_eos: true,
                    ..StopCriteria::new(120)
                },
                arrived: std::time::Instant::now(),
                logits: SequenceLogits::default(),
            };
            handle.submit_blocking(request).unwrap()
        })
        .collect();
    let request = GenerationRequest {
        prompt: prompt.to_vec(),
        priority: Priority::Low,
        sampling: SamplingParams {
            prompt_logprobs: Some(0),
            ..SamplingParams::greedy()
        },
        stop: StopCriteria {
            ignore_eos: true,
            ..StopCriteria::new(40)
        },
        arrived: std::time::Instant::now(),
        logits: SequenceLogits::default(),
    };
    let mut submitted = handle.submit_blocking(request).unwrap();
    let mut scored = None;
    while let Some(event) = submitted.events.blocking_recv() {
        match event {
            EngineEvent::PromptLogprobs(logprobs) => {
                assert!(scored.is_none(), "sent once");
                scored = Some(logprobs);
            }
            EngineEvent::Token { .. } => assert!(scored.is_some(), "sent before the first token"),
            EngineEvent::Finished { reason, .. } => {
                assert_eq!(reason, FinishReason::Length);
                break;
            }
        }
    }
    for mut other in others {
        while other.events.blocking_recv().is_some() {}
    }
    scored
        .expect("the prompt's log-probabilities")
        .into_iter()
        .map(|s| s.map(|s| s.logprob))
        .collect()
}

#[test]
fn preemption_neither_loses_nor_repeats_prompt_logprobs() {
    let handle = engine(|runner| Box::new(runner));
    let prompt = handle
        .tokenizer()
        .encode_prompt(&"The quick brown fox jumps over the lazy dog. ".repeat(12))
        .unwrap();
    let alone = score_among(&handle, &prompt, 0);
    let before = handle.stats().preemptions;
    // Five sequences of ~200 tokens each do not fit 32 blocks of 16: the least urgent,
    // the scored one, is preempted and recomputed.
    let crowded = score_among(&handle, &prompt, 4);
    assert!(
        handle.stats().preemptions > before,
        "the test needs a preemption"
    );
    assert_eq!(alone.len(), prompt.len());
    for (i, (a, b)) in alone.iter().zip(&crowded).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-4, "position {i}: {a} vs {b}"),
            (None, None) => assert_eq!(i, 0),
            _ => panic!("position {i}: {a:?} vs {b:?}"),
        }
    }
}
