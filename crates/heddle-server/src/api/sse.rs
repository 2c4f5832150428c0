//! Streaming responses as server-sent events, in OpenAI's chunk shapes.
//!
//! Chat: one chunk per choice with `delta.role = "assistant"` first, then content deltas,
//! then a chunk with an empty delta and the finish_reason. Completions: text chunks, then
//! one with empty text and the finish_reason. With `stream_options.include_usage`, a last
//! chunk has `choices: []` and the usage. Then `data: [DONE]`.
//!
//! A sequence that ends abnormally (see `generation::finish_error`) ends the stream with
//! `data: {"error": {...}}` and `data: [DONE]`; the other choices are cancelled.
//!
//! Completions with `echo`: each choice's first chunk is its prompt (with the prompt's
//! log-probabilities when asked for), sent when the choice's first event arrives.
//!
//! Log-probabilities ride on the chunk that carries their token's text; tokens whose text
//! is still held back (a partial character, a possible stop string) wait for it.
//!
//! A stream with nothing to send for [`KEEP_ALIVE_INTERVAL`] (its request still waits in
//! the queue, or a long prefill runs) sends a `: keep-alive` comment, which clients skip,
//! so that proxies do not cut a quiet connection.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use heddle_core::FinishReason;
use heddle_model::tokenizer::Tokenizer;

use super::errors::ApiError;
use super::generation::{
    chat_logprobs, completion_logprobs, finish_reason_name, EchoedPrompt, EventMux, SequenceEvent,
    TokenRecord, UsageTally,
};
use super::openai::{
    ChatChunkChoice, ChatCompletionChunk, Completion, CompletionChoice, Delta, Usage,
};
use super::tools::ToolRequest;
use crate::engine::EngineEvent;

/// Well below the idle timeouts of common proxies and load balancers (60 s and more).
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// Which API the stream answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Chat,
    Completion,
}

/// What every chunk of a stream repeats, and what the stream must add.
pub struct StreamHeader {
    pub kind: StreamKind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub choice_count: usize,
    pub prompt_count: usize,
    pub include_usage: bool,
    /// A chat request's tools: each choice's text is held back until it ends, then sent
    /// as one content delta, or as `tool_calls` deltas when it made calls.
    pub tools: Option<Arc<ToolRequest>>,
    /// A completions request's prompts, by prompt index, when it asked for `echo`.
    pub echoes: Option<Arc<Vec<EchoedPrompt>>>,
}

/// The SSE response for a request's sequences. `failure` maps abnormal finishes to the
/// error the stream ends with.
pub fn response<F>(
    header: StreamHeader,
    mux: EventMux,
    tokenizer: Arc<Tokenizer>,
    failure: F,
) -> Response
where
    F: Fn(FinishReason) -> Option<ApiError> + Send + 'static,
{
    Sse::new(chunks(header, mux, tokenizer, failure))
        .keep_alive(
            KeepAlive::new()
                .interval(KEEP_ALIVE_INTERVAL)
                .text("keep-alive"),
        )
        .into_response()
}

struct ChunkStream<F> {
    header: StreamHeader,
    mux: EventMux,
    tokenizer: Arc<Tokenizer>,
    failure: F,
    /// Per choice: tokens whose text has not been sent yet.
    pending: Vec<Vec<TokenRecord>>,
    /// Per choice: characters of text sent so far.
    sent_chars: Vec<usize>,
    /// Per choice: text held back while tool calls may be in it.
    held: Vec<String>,
    /// Per choice: whether its echoed prompt was sent.
    echoed: Vec<bool>,
    usage: UsageTally,
    out: VecDeque<Event>,
    started: bool,
    done: bool,
}

fn chunks<F>(
    header: StreamHeader,
    mux: EventMux,
    tokenizer: Arc<Tokenizer>,
    failure: F,
) -> impl Stream<Item = Result<Event, Infallible>> + Send
where
    F: Fn(FinishReason) -> Option<ApiError> + Send + 'static,
{
    let state = ChunkStream {
        pending: vec![Vec::new(); header.choice_count],
        sent_chars: vec![0; header.choice_count],
        held: vec![String::new(); header.choice_count],
        echoed: vec![false; header.choice_count],
        usage: UsageTally::new(header.prompt_count),
        header,
        mux,
        tokenizer,
        failure,
        out: VecDeque::new(),
        started: false,
        done: false,
    };
    stream::unfold(state, |mut state| async move {
        loop {
            if let Some(event) = state.out.pop_front() {
                return Some((Ok(event), state));
            }
            if state.done {
                return None;
            }
            state.advance().await;
        }
    })
}

impl<F> ChunkStream<F>
where
    F: Fn(FinishReason) -> Option<ApiError>,
{
    /// Waits for the next engine event and queues the chunks it makes.
    async fn advance(&mut self) {
        if !self.started {
            self.started = true;
            if self.header.kind == StreamKind::Chat {
                for index in 0..self.header.choice_count {
                    let delta = Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                        tool_calls: None,
                    };
                    self.push_chat(index, delta, Vec::new(), None);
                }
            }
            return;
        }
        let Some(SequenceEvent {
            index,
            prompt_index,
            event,
        }) = self.mux.next().await
        else {
            if self.header.include_usage {
                let usage = self.usage.total();
                self.push_usage(usage);
            }
            self.out.push_back(Event::default().data("[DONE]"));
            self.done = true;
            return;
        };
        if let Some(echoes) = self.header.echoes.clone() {
            if !self.echoed[index] {
                self.echoed[index] = true;
                let prompt_logprobs = match &event {
                    EngineEvent::PromptLogprobs(logprobs) => Some(logprobs.as_slice()),
                    _ => None,
                };
                self.push_echo(index, &echoes[prompt_index], prompt_logprobs);
            }
        }
        match event {
            // Sent with the echoed prompt, the only place they are asked for.
            EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Token {
                token,
                text,
                logprobs,
            } => {
                if let Some(logprobs) = logprobs {
                    let offset = self.sent_chars[index];
                    self.pending[index].push(TokenRecord::new(token, logprobs, offset));
                }
                if !text.is_empty() {
                    self.push_text(index, text);
                }
            }
            EngineEvent::Finished {
                reason,
                text,
                usage,
            } => {
                if let Some(error) = (self.failure)(reason) {
                    self.out.push_back(Event::default().data(error.body_json()));
                    self.out.push_back(Event::default().data("[DONE]"));
                    self.done = true;
                    return;
                }
                self.usage.add(prompt_index, &usage);
                if let Some(tools) = self.header.tools.clone() {
                    self.finish_with_tools(&tools, index, text, reason);
                    return;
                }
                if !text.is_empty() || !self.pending[index].is_empty() {
                    self.push_text(index, text);
                }
                let reason = Some(finish_reason_name(reason));
                match self.header.kind {
                    StreamKind::Chat => self.push_chat(index, Delta::default(), Vec::new(), reason),
                    StreamKind::Completion => {
                        self.push_completion(index, String::new(), Vec::new(), reason)
                    }
                }
            }
        }
    }

    /// Ends a choice of a request with tools: its calls, or its held-back text.
    fn finish_with_tools(
        &mut self,
        tools: &ToolRequest,
        index: usize,
        text: String,
        reason: FinishReason,
    ) {
        let mut whole = std::mem::take(&mut self.held[index]);
        whole.push_str(&text);
        let reply = tools.reply(whole, reason);
        let tokens = std::mem::take(&mut self.pending[index]);
        let delta = match reply.tool_calls {
            Some(mut calls) => {
                for (position, call) in calls.iter_mut().enumerate() {
                    call.index = Some(position);
                }
                Delta {
                    role: None,
                    content: reply.content,
                    tool_calls: Some(calls),
                }
            }
            None => Delta {
                role: None,
                content: reply.content.filter(|text| !text.is_empty()),
                tool_calls: None,
            },
        };
        if delta.content.is_some() || delta.tool_calls.is_some() || !tokens.is_empty() {
            self.push_chat(index, delta, tokens, None);
        }
        self.push_chat(
            index,
            Delta::default(),
            Vec::new(),
            Some(reply.finish_reason),
        );
    }

    /// A choice's echoed prompt, with its log-probabilities when the request has them.
    fn push_echo(
        &mut self,
        index: usize,
        echoed: &EchoedPrompt,
        prompt_logprobs: Option<&[Option<crate::engine::TokenLogprobs>]>,
    ) {
        self.sent_chars[index] += echoed.char_count();
        let logprobs = prompt_logprobs
            .map(|scored| completion_logprobs(&self.tokenizer, Some((echoed, scored)), &[]));
        let chunk = Completion {
            id: self.header.id.clone(),
            object: "text_completion",
            created: self.header.created,
            model: self.header.model.clone(),
            choices: vec![CompletionChoice {
                index,
                text: echoed.text.clone(),
                logprobs,
                finish_reason: None,
            }],
            usage: None,
        };
        self.push_json(&chunk);
    }

    fn push_text(&mut self, index: usize, text: String) {
        if self.header.tools.is_some() {
            // Sent when the choice ends (see `finish_with_tools`); logprobs wait with it.
            self.held[index].push_str(&text);
            return;
        }
        self.sent_chars[index] += text.chars().count();
        let tokens = std::mem::take(&mut self.pending[index]);
        match self.header.kind {
            StreamKind::Chat => {
                let delta = Delta {
                    role: None,
                    content: Some(text),
                    tool_calls: None,
                };
                self.push_chat(index, delta, tokens, None);
            }
            StreamKind::Completion => self.push_completion(index, text, tokens, None),
        }
    }

    fn push_chat(
        &mut self,
        index: usize,
        delta: Delta,
        tokens: Vec<TokenRecord>,
        finish_reason: Option<&'static str>,
    ) {
        let logprobs = (!tokens.is_empty()).then(|| chat_logprobs(&self.tokenizer, &tokens));
        let chunk = ChatCompletionChunk {
            id: self.header.id.clone(),
            object: "chat.completion.chunk",
            created: self.header.created,
            model: self.header.model.clone(),
            choices: vec![ChatChunkChoice {
                index,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: None,
        };
        self.push_json(&chunk);
    }

    fn push_completion(
        &mut self,
        index: usize,
        text: String,
        tokens: Vec<TokenRecord>,
        finish_reason: Option<&'static str>,
    ) {
        let logprobs =
            (!tokens.is_empty()).then(|| completion_logprobs(&self.tokenizer, None, &tokens));
        let chunk = Completion {
            id: self.header.id.clone(),
            object: "text_completion",
            created: self.header.created,
            model: self.header.model.clone(),
            choices: vec![CompletionChoice {
                index,
                text,
                logprobs,
                finish_reason,
            }],
            usage: None,
        };
        self.push_json(&chunk);
    }

    fn push_usage(&mut self, usage: Usage) {
        match self.header.kind {
            StreamKind::Chat => {
                let chunk = ChatCompletionChunk {
                    id: self.header.id.clone(),
                    object: "chat.completion.chunk",
                    created: self.header.created,
                    model: self.header.model.clone(),
                    choices: Vec::new(),
                    usage: Some(usage),
                };
                self.push_json(&chunk);
            }
            StreamKind::Completion => {
                let chunk = Completion {
                    id: self.header.id.clone(),
                    object: "text_completion",
                    created: self.header.created,
                    model: self.header.model.clone(),
                    choices: Vec::new(),
                    usage: Some(usage),
                };
                self.push_json(&chunk);
            }
        }
    }

    fn push_json(&mut self, chunk: &impl serde::Serialize) {
        // These types always serialize; an empty object would still keep the stream valid.
        let json = serde_json::to_string(chunk).unwrap_or_else(|_| "{}".into());
        self.out.push_back(Event::default().data(json));
    }
}
