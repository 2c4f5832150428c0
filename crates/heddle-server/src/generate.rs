//! `heddle generate`: one completion from a model, streamed to stdout, through the same
//! engine (scheduler + runner) that serves HTTP requests.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use heddle_core::{Priority, SamplingParams, SchedulerConfig, StopCriteria};
use heddle_model::chat_template::ChatMessage;
use heddle_model::{embedded_model_path, load_cpu, KvSize};

use crate::engine::{Engine, EngineEvent, GenerationRequest};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A GGUF file or a Hugging Face model directory; default: the embedded model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Raw prompt text, completed as is.
    #[arg(long, conflicts_with = "chat", required_unless_present = "chat")]
    pub prompt: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long)]
    pub chat: Option<String>,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let path = match &args.model {
        Some(path) => path.clone(),
        None => embedded_model_path()?,
    };
    // Room for one sequence of the longest allowed length; the prompt is checked below.
    let block_size = 16;
    let kv_blocks = 256;
    let model = load_cpu(&path, KvSize::Blocks(kv_blocks), block_size)
        .with_context(|| format!("loading {}", path.display()))?;
    let prompt_text = match (&args.prompt, &args.chat) {
        (Some(prompt), _) => prompt.clone(),
        (None, Some(user)) => {
            let mut messages = Vec::new();
            if let Some(system) = &args.system {
                messages.push(ChatMessage::new("system", system));
            }
            messages.push(ChatMessage::new("user", user));
            model.text.chat_template.render(&messages, true)?
        }
        (None, None) => unreachable!("clap requires --prompt or --chat"),
    };
    let prompt = model.text.tokenizer.encode_prompt(&prompt_text)?;
    let config = SchedulerConfig {
        num_blocks: model.num_blocks,
        block_size,
        max_model_len: model.config().max_position_embeddings,
        ..SchedulerConfig::default()
    };
    let tokenizer = Arc::new(model.text.tokenizer);
    let (engine, _thread) = Engine::spawn("generate", Box::new(model.runner), tokenizer, config)?;

    let request = GenerationRequest {
        prompt,
        priority: Priority::Normal,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop: StopCriteria {
            stop_strings: args.stop.clone(),
            ..StopCriteria::new(args.max_tokens)
        },
        arrived: std::time::Instant::now(),
        logits: Default::default(),
    };
    let mut submitted = engine.submit_blocking(request)?;
    let mut out = std::io::stdout().lock();
    while let Some(event) = submitted.events.blocking_recv() {
        match event {
            EngineEvent::Token { text, .. } => {
                out.write_all(text.as_bytes())?;
                out.flush()?;
            }
            // Never asked for here.
            EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Finished {
                reason,
                text,
                usage,
            } => {
                writeln!(out, "{text}")?;
                tracing::info!(
                    finish_reason = %reason,
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    "done"
                );
                break;
            }
        }
    }
    Ok(())
}
