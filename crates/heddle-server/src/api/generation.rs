//! Submitting a request's sequences (n per prompt) to the engine and reading their events.
//!
//! Nothing here spawns a task: the events are read by the handler's future (non-streaming)
//! or by the response body stream (streaming), so when the client leaves and hyper drops
//! either, the receivers and the [`InFlight`] guards go with them and the engine cancels
//! the sequences at once.

use std::sync::Arc;
use std::task::{Context, Poll};

use heddle_core::{FinishReason, TokenId};
use heddle_model::detokenizer::IncrementalDetokenizer;
use heddle_model::tokenizer::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

use super::errors::ApiError;
use super::openai::{
    ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TokenLogprobMap, TopLogprob, Usage,
};
use crate::engine::{
    EngineEvent, GenerationRequest, SubmitError, Submitted, TokenCounts, TokenLogprobs,
};
use crate::metrics::ModelMetrics;
use crate::pool::{InFlight, ServedModel};

/// One submitted sequence: choice `index` of prompt `prompt_index`.
struct SubmittedSequence {
    index: usize,
    prompt_index: usize,
    events: UnboundedReceiver<EngineEvent>,
    in_flight: InFlight,
}

/// An event of one of a request's sequences.
#[derive(Debug)]
pub struct SequenceEvent {
    pub index: usize,
    pub prompt_index: usize,
    pub event: EngineEvent,
}

/// The events of all of a request's sequences, in arrival order.
pub struct EventMux {
    sequences: Vec<Option<SubmittedSequence>>,
    /// Where the next poll starts, so that no sequence is always served last.
    cursor: usize,
}

/// Submits `requests` (each with its prompt's index), in order; choice indices follow
/// that order. If one is refused, the ones already accepted are cancelled.
pub async fn submit(
    model: &Arc<ServedModel>,
    requests: Vec<(usize, GenerationRequest)>,
    metrics: &ModelMetrics,
) -> Result<EventMux, ApiError> {
    let mut sequences = Vec::with_capacity(requests.len());
    for (index, (prompt_index, request)) in requests.into_iter().enumerate() {
        let Submitted { id, events } = match model.engine.submit(request).await {
            Ok(submitted) => submitted,
            Err(SubmitError::QueueFull) => {
                metrics.record_queue_full();
                return Err(ApiError::queue_full(&model.id, 1));
            }
            Err(SubmitError::Invalid(message)) => return Err(ApiError::bad_request(message)),
            Err(SubmitError::Unsupported { param, message }) => {
                let mut error = ApiError::invalid_param(param, message);
                error.code = Some("unsupported_parameter");
                return Err(error);
            }
            Err(SubmitError::Stopped) => return Err(unloaded(&model.id)),
        };
        sequences.push(Some(SubmittedSequence {
            index,
            prompt_index,
            events,
            in_flight: model.track(id),
        }));
    }
    Ok(EventMux {
        sequences,
        cursor: 0,
    })
}

fn unloaded(model: &str) -> ApiError {
    ApiError::unavailable(
        "model_unloaded",
        format!("The model `{model}` was unloaded while the request ran; retry."),
    )
}

/// The error a client gets for a sequence that ended without finishing normally, or None
/// for "stop" and "length".
///
/// A cancellation the client did not cause comes from the server: shutdown or an unloaded
/// model (503), or else a full waiting queue that a more urgent request displaced it from
/// (429, like a refusal at the door).
pub fn finish_error(
    reason: FinishReason,
    model: &ServedModel,
    shutting_down: bool,
) -> Option<ApiError> {
    match reason {
        FinishReason::Stop | FinishReason::Length => None,
        FinishReason::Cancelled if shutting_down => Some(ApiError::unavailable(
            "shutting_down",
            "The server is shutting down; the request was cancelled.",
        )),
        FinishReason::Cancelled if model.is_unloading() => Some(unloaded(&model.id)),
        FinishReason::Cancelled => {
            let mut error = ApiError::queue_full(&model.id, 1);
            error.message = format!(
                "The request was displaced from the full waiting queue of model `{}` by more \
                 urgent requests; retry later.",
                model.id
            );
            error.code = Some("displaced");
            Some(error)
        }
        FinishReason::Error => Some(ApiError::internal(
            "The model failed while generating; see the server log.",
        )),
    }
}

/// OpenAI's finish_reason of a normal finish.
pub fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

impl EventMux {
    /// The next event of any sequence; None once all have finished. A sequence whose
    /// engine went away without finishing it ends with an error finish.
    pub async fn next(&mut self) -> Option<SequenceEvent> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<SequenceEvent>> {
        let count = self.sequences.len();
        let mut any_live = false;
        for step in 0..count {
            let slot = (self.cursor + step) % count;
            let Some(sequence) = self.sequences[slot].as_mut() else {
                continue;
            };
            any_live = true;
            if let Poll::Ready(event) = sequence.events.poll_recv(cx) {
                self.cursor = (slot + 1) % count;
                let event = event.unwrap_or(EngineEvent::Finished {
                    reason: FinishReason::Error,
                    text: String::new(),
                    usage: TokenCounts::default(),
                });
                return Poll::Ready(Some(self.account(slot, event)));
            }
        }
        if any_live {
            Poll::Pending
        } else {
            Poll::Ready(None)
        }
    }

    /// Retires a sequence on its last event.
    fn account(&mut self, slot: usize, event: EngineEvent) -> SequenceEvent {
        let finished = matches!(event, EngineEvent::Finished { .. });
        let sequence = self.sequences[slot]
            .as_mut()
            .expect("only live sequences are polled");
        if finished {
            sequence.in_flight.finish();
        }
        let (index, prompt_index) = (sequence.index, sequence.prompt_index);
        if finished {
            self.sequences[slot] = None;
        }
        SequenceEvent {
            index,
            prompt_index,
            event,
        }
    }
}

/// A generated token with its log-probabilities and where its text starts (in characters)
/// in the choice's text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRecord {
    pub token: TokenId,
    pub logprob: f32,
    pub top: Vec<(TokenId, f32)>,
    pub text_offset: usize,
}

impl TokenRecord {
    /// The record of a token whose text starts `text_offset` characters into the choice.
    pub fn new(token: TokenId, logprobs: TokenLogprobs, text_offset: usize) -> Self {
        TokenRecord {
            token,
            logprob: logprobs.logprob,
            top: logprobs.top,
            text_offset,
        }
    }
}

/// A prompt returned before its completion (`echo`): its tokens, its text (the tokens
/// decoded as generated text is) and where each token's text starts in it, in characters.
#[derive(Debug, Clone, PartialEq)]
pub struct EchoedPrompt {
    pub tokens: Vec<TokenId>,
    pub text: String,
    pub text_offsets: Vec<usize>,
}

impl EchoedPrompt {
    /// Decodes `tokens` one by one, as the engine decodes generated tokens, so that a
    /// token's offset is where the text it completes starts.
    pub fn new(tokenizer: &Arc<Tokenizer>, tokens: &[TokenId]) -> Result<Self, ApiError> {
        let mut detokenizer = IncrementalDetokenizer::new(tokenizer.clone(), true);
        let decode_error = |error: heddle_model::tokenizer::TokenizerError| {
            ApiError::internal(format!("the prompt could not be decoded: {error}"))
        };
        let mut text = String::new();
        let mut chars = 0;
        let mut text_offsets = Vec::with_capacity(tokens.len());
        for &token in tokens {
            text_offsets.push(chars);
            let piece = detokenizer.push(token).map_err(decode_error)?;
            chars += piece.chars().count();
            text.push_str(&piece);
        }
        text.push_str(&detokenizer.finish().map_err(decode_error)?);
        Ok(EchoedPrompt {
            tokens: tokens.to_vec(),
            text,
            text_offsets,
        })
    }

    /// Characters of the echoed text: where the completion's text starts.
    pub fn char_count(&self) -> usize {
        self.text.chars().count()
    }
}

/// A finished choice of a non-streaming request.
#[derive(Debug)]
pub struct FinishedChoice {
    pub index: usize,
    pub prompt_index: usize,
    pub text: String,
    pub tokens: Vec<TokenRecord>,
    /// The prompt's log-probabilities, when asked for (see [`EngineEvent::PromptLogprobs`]).
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    pub reason: FinishReason,
}

/// Everything a non-streaming request produced.
pub struct Collected {
    pub choices: Vec<FinishedChoice>,
    pub usage: Usage,
}

/// Reads every sequence to its end. The first abnormal finish (see [`finish_error`]) ends
/// the request with that error, cancelling the other sequences.
pub async fn collect(
    mut mux: EventMux,
    prompt_count: usize,
    failure: impl Fn(FinishReason) -> Option<ApiError>,
) -> Result<Collected, ApiError> {
    let count = mux.sequences.len();
    let mut choices: Vec<FinishedChoice> = (0..count)
        .map(|index| FinishedChoice {
            index,
            prompt_index: 0,
            text: String::new(),
            tokens: Vec::new(),
            prompt_logprobs: None,
            reason: FinishReason::Stop,
        })
        .collect();
    // Characters of each choice's text so far: offsets without recounting the text.
    let mut chars = vec![0; count];
    let mut usage = UsageTally::new(prompt_count);
    while let Some(SequenceEvent {
        index,
        prompt_index,
        event,
    }) = mux.next().await
    {
        let choice = &mut choices[index];
        choice.prompt_index = prompt_index;
        match event {
            EngineEvent::PromptLogprobs(logprobs) => choice.prompt_logprobs = Some(logprobs),
            EngineEvent::Token {
                token,
                text,
                logprobs,
            } => {
                if let Some(logprobs) = logprobs {
                    choice
                        .tokens
                        .push(TokenRecord::new(token, logprobs, chars[index]));
                }
                chars[index] += text.chars().count();
                choice.text.push_str(&text);
            }
            EngineEvent::Finished {
                reason,
                text,
                usage: counts,
            } => {
                if let Some(error) = failure(reason) {
                    return Err(error);
                }
                choice.text.push_str(&text);
                choice.reason = reason;
                usage.add(prompt_index, &counts);
            }
        }
    }
    Ok(Collected {
        choices,
        usage: usage.total(),
    })
}

/// Sums usage over sequences: each prompt's tokens (and cache hits) once, however many
/// choices it has, and every choice's generated tokens.
#[derive(Debug)]
pub struct UsageTally {
    prompts: Vec<Option<(usize, usize)>>,
    completion_tokens: usize,
}

impl UsageTally {
    pub fn new(prompt_count: usize) -> Self {
        UsageTally {
            prompts: vec![None; prompt_count],
            completion_tokens: 0,
        }
    }

    pub fn add(&mut self, prompt_index: usize, usage: &TokenCounts) {
        self.completion_tokens += usage.completion_tokens;
        if let Some(slot) = self.prompts.get_mut(prompt_index) {
            slot.get_or_insert((usage.prompt_tokens, usage.cached_tokens));
        }
    }

    pub fn total(&self) -> Usage {
        let (prompt, cached) = self
            .prompts
            .iter()
            .flatten()
            .fold((0, 0), |(p, c), (prompt, cached)| (p + prompt, c + cached));
        Usage::new(prompt, self.completion_tokens, cached)
    }
}

/// A token's text and raw bytes for OpenAI's log-probability objects. A token that holds
/// only part of a multi-byte character shows U+FFFD in its text; its bytes are exact, so
/// a client can join them into the real characters.
fn token_piece(tokenizer: &Tokenizer, token: TokenId) -> (String, Vec<u8>) {
    let text = tokenizer.token_to_piece(token).unwrap_or_default();
    let bytes = tokenizer
        .token_bytes(token)
        .unwrap_or_else(|| text.as_bytes().to_vec());
    (text, bytes)
}

/// Chat's `logprobs.content`.
pub fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[TokenRecord]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|record| {
                let (token, bytes) = token_piece(tokenizer, record.token);
                ChatTokenLogprob {
                    token,
                    logprob: record.logprob,
                    bytes,
                    top_logprobs: record
                        .top
                        .iter()
                        .map(|&(id, logprob)| {
                            let (token, bytes) = token_piece(tokenizer, id);
                            TopLogprob {
                                token,
                                logprob,
                                bytes,
                            }
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

/// Completions' parallel lists: the echoed prompt's tokens first, when given with their
/// log-probabilities (the first token's are null), then the generated `tokens`.
pub fn completion_logprobs(
    tokenizer: &Tokenizer,
    prompt: Option<(&EchoedPrompt, &[Option<TokenLogprobs>])>,
    tokens: &[TokenRecord],
) -> CompletionLogprobs {
    let mut logprobs = CompletionLogprobs::default();
    let alternatives = |top: &[(TokenId, f32)]| {
        TokenLogprobMap(
            top.iter()
                .map(|&(id, logprob)| (token_piece(tokenizer, id).0, logprob))
                .collect(),
        )
    };
    if let Some((echoed, prompt_logprobs)) = prompt {
        for (position, &token) in echoed.tokens.iter().enumerate() {
            let scored = prompt_logprobs.get(position).and_then(Option::as_ref);
            logprobs.tokens.push(token_piece(tokenizer, token).0);
            logprobs.token_logprobs.push(scored.map(|s| s.logprob));
            logprobs
                .top_logprobs
                .push(scored.map(|s| alternatives(&s.top)));
            logprobs.text_offset.push(echoed.text_offsets[position]);
        }
    }
    for record in tokens {
        logprobs.tokens.push(token_piece(tokenizer, record.token).0);
        logprobs.token_logprobs.push(Some(record.logprob));
        logprobs.top_logprobs.push(Some(alternatives(&record.top)));
        logprobs.text_offset.push(record.text_offset);
    }
    logprobs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_each_prompt_once_and_every_choice() {
        let mut tally = UsageTally::new(2);
        let usage = |prompt_tokens, completion_tokens, cached_tokens| TokenCounts {
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        };
        tally.add(0, &usage(10, 3, 0));
        tally.add(0, &usage(10, 4, 10));
        tally.add(1, &usage(7, 5, 2));
        assert_eq!(tally.total(), Usage::new(17, 12, 2));
    }
}
