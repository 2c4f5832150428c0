//! The handlers: validate, template and tokenize, submit, and map the engine's events to
//! OpenAI's shapes. No model logic lives here.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::distr::{Alphanumeric, SampleString};
use serde_json::json;

use heddle_core::{FinishReason, Priority, SamplingParams, StopCriteria, TokenId};
use heddle_model::chat_template::{ChatMessage, ChatTemplateError};
use heddle_model::tokenizer::Tokenizer;

use super::auth::Caller;
use super::errors::ApiError;
use super::generation::{
    self, chat_logprobs, completion_logprobs, finish_reason_name, EchoedPrompt,
};
use super::logit_bias::logit_bias;
use super::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, CommonFields, Completion,
    CompletionChoice, CompletionRequest, ModelCard, ModelList,
};
use super::params::{self, PromptInput};
use super::response_format::{self, RequestedGrammar};
use super::sse::{self, StreamHeader, StreamKind};
use super::tools::{self, ToolRequest};
use super::{unix_now, AppState, JsonBody};
use crate::engine::GenerationRequest;
use crate::metrics::EngineReport;
use crate::pool::ServedModel;
use crate::sequence_logits::SequenceLogits;

/// OpenAI's default `max_tokens` for completions; chat defaults to the rest of the context.
const COMPLETIONS_DEFAULT_MAX_TOKENS: usize = 16;

pub async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    if state.pool.is_shutting_down() {
        ApiError::unavailable("shutting_down", "The server is shutting down.").into_response()
    } else if !state.is_ready() {
        ApiError::unavailable("not_ready", "The server is still loading its models.")
            .into_response()
    } else if let Some(model) = state.pool.pinned_model_not_serving() {
        ApiError::unavailable(
            "model_not_serving",
            format!("The pinned model `{model}` is not serving: it is restarting or reloading."),
        )
        .into_response()
    } else {
        Json(json!({"status": "ready"})).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let engines: Vec<_> = state
        .pool
        .loaded_models()
        .iter()
        .map(|m| EngineReport {
            model: m.id.clone(),
            stats: m.engine.stats(),
            health: m.engine.health(),
        })
        .collect();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(&engines),
    )
        .into_response()
}

pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: state
            .pool
            .specs()
            .iter()
            .flat_map(|spec| std::iter::once(&spec.id).chain(&spec.aliases))
            .map(|name| model_card(&state, name))
            .collect(),
    })
}

pub async fn get_model(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<ModelCard>, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    match state.pool.spec(&id) {
        // Under the name asked for: every served name is a model to clients.
        Some(_) => Ok(Json(model_card(&state, &id))),
        None => Err(ApiError::model_not_found(&id)),
    }
}

fn model_card(state: &AppState, id: &str) -> ModelCard {
    ModelCard {
        id: id.to_string(),
        object: "model",
        created: state.started,
        owned_by: "heddle",
    }
}

// The admin handlers check no key themselves: the access layer lets only admin callers
// reach `/admin` routes.

pub async fn admin_list(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "object": "list",
        "data": state.pool.status(),
        "memory_budget_bytes": state.pool.memory_budget(),
        "loaded_bytes": state.pool.loaded_bytes(),
    }))
}

pub async fn admin_load(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let model = state.model(&id).await?;
    Ok(Json(json!({
        "id": model.id,
        "loaded": true,
        "memory_bytes": model.memory_bytes,
    })))
}

pub async fn admin_unload(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Path(id) = id.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let was_loaded = state
        .pool
        .unload(&id)
        .await
        .map_err(|_| ApiError::model_not_found(&id))?;
    Ok(Json(json!({"id": id, "unloaded": was_loaded})))
}

pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::route_not_found(method.as_str(), uri.path())
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

/// The fields both endpoints validate before touching a model.
struct Checked {
    model: String,
    priority: Priority,
    sampling: SamplingParams,
    stop: StopCriteria,
    max_tokens: Option<usize>,
    n: usize,
    stream: bool,
    include_usage: bool,
    grammar: Option<RequestedGrammar>,
}

fn check_common(
    caller: &Caller,
    common: &CommonFields,
    max_tokens: Option<i64>,
    logprobs: params::LogprobRequest,
    echo: bool,
) -> Result<Checked, ApiError> {
    Ok(Checked {
        model: params::model_name(common)?.to_string(),
        priority: caller.priority(params::priority(common.priority.as_ref())?)?,
        sampling: params::sampling(common, logprobs)?,
        stop: params::stop_criteria(common)?,
        max_tokens: params::requested_max_tokens(max_tokens, echo)?,
        n: params::choices(common)?,
        stream: common.stream.unwrap_or(false),
        include_usage: common
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        grammar: response_format::requested_grammar(common)?,
    })
}

/// The request's logit biases and compiled grammar, for `model`.
async fn sequence_logits(
    model: &Arc<ServedModel>,
    common: &CommonFields,
    grammar: Option<RequestedGrammar>,
) -> Result<SequenceLogits, ApiError> {
    let bias = logit_bias(common.logit_bias.as_ref(), model.vocab_size)?;
    if !bias.is_empty() {
        response_format::refuse_unless_supported(model, "logit_bias")?;
    }
    let constraint = match grammar {
        Some(grammar) => Some(response_format::compile(model, grammar).await?),
        None => None,
    };
    Ok(SequenceLogits { bias, constraint })
}

impl Checked {
    /// The engine requests for one prompt: `n` of them, seeds spread so choices differ.
    fn requests<'a>(
        &'a self,
        prompt_index: usize,
        prompt: &[TokenId],
        max_tokens: usize,
        arrived: Instant,
        logits: &'a SequenceLogits,
    ) -> impl Iterator<Item = (usize, GenerationRequest)> + 'a {
        let prompt = prompt.to_vec();
        (0..self.n).map(move |choice| {
            let sampling = SamplingParams {
                seed: self.sampling.seed.map(|s| s.wrapping_add(choice as u64)),
                ..self.sampling
            };
            let request = GenerationRequest {
                prompt: prompt.clone(),
                priority: self.priority,
                sampling,
                stop: StopCriteria {
                    max_tokens,
                    ..self.stop.clone()
                },
                arrived,
                logits: logits.clone(),
            };
            (prompt_index, request)
        })
    }
}

/// The error a finished sequence maps to, judged when it finishes.
/// A generation handed to the engine, with what both response shapes (one JSON body or
/// an SSE stream) need.
struct Started<F> {
    mux: generation::EventMux,
    id: String,
    created: u64,
    tokenizer: Arc<Tokenizer>,
    /// Turns a finish the client did not cause into the error it should see.
    failure: F,
}

/// Submits the requests of one API call (prompts × n) to the model's engine.
async fn start(
    state: &AppState,
    model: &Arc<ServedModel>,
    requests: Vec<(usize, GenerationRequest)>,
    id_prefix: &str,
) -> Result<Started<impl Fn(FinishReason) -> Option<ApiError> + Send + 'static>, ApiError> {
    let metrics = state.metrics.model(&model.id);
    let mux = generation::submit(model, requests, &metrics).await?;
    let (pool, judged) = (state.pool.clone(), model.clone());
    Ok(Started {
        mux,
        id: new_id(id_prefix),
        created: unix_now(),
        tokenizer: model.engine.tokenizer().clone(),
        failure: move |reason| generation::finish_error(reason, &judged, pool.is_shutting_down()),
    })
}

/// A fresh random id with the given prefix (`chatcmpl-`, `file-`, `batch_`, ...).
pub fn new_id(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        Alphanumeric.sample_string(&mut rand::rng(), 24)
    )
}

/// What a generation call produced: an SSE stream already under way, or a whole body.
pub enum Reply<T> {
    Stream(Response),
    Whole(T),
}

impl<T: serde::Serialize> IntoResponse for Reply<T> {
    fn into_response(self) -> Response {
        match self {
            Reply::Stream(response) => response,
            Reply::Whole(body) => Json(body).into_response(),
        }
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<ChatCompletionRequest>,
) -> Result<Reply<ChatCompletion>, ApiError> {
    chat(&state, &caller, request, Instant::now()).await
}

/// A chat completion request, from validation to its answer: what the HTTP handler and
/// each line of a batch both run.
pub async fn chat(
    state: &AppState,
    caller: &Caller,
    request: ChatCompletionRequest,
    arrived: Instant,
) -> Result<Reply<ChatCompletion>, ApiError> {
    params::check_chat_fields(&request)?;
    let logprobs = params::chat_logprobs(request.logprobs, request.top_logprobs)?;
    let requested_max = request.max_completion_tokens.or(request.common.max_tokens);
    let checked = check_common(caller, &request.common, requested_max, logprobs, false)?;
    let messages = params::chat_messages(request.messages.as_deref())?;
    let tools = tools::tool_request(
        request.tools.as_ref(),
        request.tool_choice.as_ref(),
        request.parallel_tool_calls.as_ref(),
    )?
    .map(Arc::new);
    let tool_grammar = tools.as_ref().and_then(|tools| tools.grammar());
    let grammar = match (checked.grammar.clone(), tool_grammar) {
        (Some(grammar), Some(_)) => {
            return Err(ApiError::invalid_param(
                "tool_choice",
                format!(
                    "`tool_choice` \"required\" or a named function constrains the output, and \
                     so does `{}`; give one of them.",
                    grammar.field
                ),
            ))
        }
        (Some(grammar), None) => Some(grammar),
        (None, Some(spec)) => Some(RequestedGrammar {
            field: "tools",
            spec,
        }),
        (None, None) => None,
    };
    // Answers name the model by its id, whichever of its names the request used.
    let model = state.model(&checked.model).await?;
    let logits = sequence_logits(&model, &request.common, grammar).await?;

    let prompt = tokenize_chat(&model, messages, tools.clone()).await?;
    let max_tokens = params::max_tokens(
        checked.max_tokens,
        None,
        prompt.len(),
        model.max_sequence_len,
    )?;
    let requests = checked
        .requests(0, &prompt, max_tokens, arrived, &logits)
        .collect();
    let Started {
        mux,
        id,
        created,
        tokenizer,
        failure,
    } = start(state, &model, requests, "chatcmpl-").await?;

    if checked.stream {
        let header = StreamHeader {
            kind: StreamKind::Chat,
            id,
            created,
            model: model.id.clone(),
            choice_count: checked.n,
            prompt_count: 1,
            include_usage: checked.include_usage,
            tools,
            echoes: None,
        };
        return Ok(Reply::Stream(sse::response(
            header, mux, tokenizer, failure,
        )));
    }
    let collected = generation::collect(mux, 1, failure).await?;
    let choices = collected
        .choices
        .into_iter()
        .map(|choice| {
            let logprobs = logprobs.map(|_| chat_logprobs(&tokenizer, &choice.tokens));
            let (message, finish_reason) = match &tools {
                Some(tools) => {
                    let reply = tools.reply(choice.text, choice.reason);
                    let message = AssistantMessage {
                        role: "assistant",
                        content: reply.content,
                        tool_calls: reply.tool_calls,
                    };
                    (message, reply.finish_reason)
                }
                None => {
                    let message = AssistantMessage {
                        role: "assistant",
                        content: Some(choice.text),
                        tool_calls: None,
                    };
                    (message, finish_reason_name(choice.reason))
                }
            };
            ChatChoice {
                index: choice.index,
                logprobs,
                message,
                finish_reason,
            }
        })
        .collect();
    Ok(Reply::Whole(ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: model.id.clone(),
        choices,
        usage: collected.usage,
    }))
}

/// Renders the conversation with the model's template and tokenizes it, off the async
/// threads (a long conversation takes a while). Tools go to a template that reads them,
/// or else into the system prompt (see [`tools`]).
async fn tokenize_chat(
    model: &Arc<ServedModel>,
    mut messages: Vec<ChatMessage>,
    tools: Option<Arc<ToolRequest>>,
) -> Result<Vec<TokenId>, ApiError> {
    let model = model.clone();
    tokio::task::spawn_blocking(move || {
        let template = &model.chat_template;
        let mut variables = serde_json::Map::new();
        if template.reads_tools() {
            if let Some(tools) = &tools {
                variables = tools.template_variables();
            }
        } else {
            messages = tools::inline_tool_messages(messages);
            if let Some(tools) = &tools {
                tools.add_prompt(&mut messages);
            }
        }
        let text =
            template
                .render_with(&messages, true, &variables)
                .map_err(|error| match error {
                    ChatTemplateError::Raised(message) => {
                        ApiError::invalid_param("messages", message)
                    }
                    other => ApiError::internal(other.to_string()),
                })?;
        model
            .engine
            .tokenizer()
            .encode_prompt(&text)
            .map_err(|error| ApiError::internal(error.to_string()))
    })
    .await
    .map_err(|_| ApiError::internal("Tokenizing the prompt failed."))?
}

async fn tokenize_prompts(
    model: &Arc<ServedModel>,
    prompts: Vec<PromptInput>,
) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let model = model.clone();
    let tokenized = tokio::task::spawn_blocking(move || {
        prompts
            .into_iter()
            .map(|prompt| match prompt {
                PromptInput::Tokens(ids) => Ok(ids),
                PromptInput::Text(text) => model
                    .engine
                    .tokenizer()
                    .encode_prompt(&text)
                    .map_err(|error| ApiError::internal(error.to_string())),
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|_| ApiError::internal("Tokenizing the prompt failed."))??;
    if tokenized.iter().any(Vec::is_empty) {
        return Err(ApiError::invalid_param(
            "prompt",
            "The prompt must have at least one token.",
        ));
    }
    Ok(tokenized)
}

pub async fn completions(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(request): JsonBody<CompletionRequest>,
) -> Result<Reply<Completion>, ApiError> {
    completion(&state, &caller, request, Instant::now()).await
}

/// A completions request, from validation to its answer: what the HTTP handler and each
/// line of a batch both run.
pub async fn completion(
    state: &AppState,
    caller: &Caller,
    request: CompletionRequest,
    arrived: Instant,
) -> Result<Reply<Completion>, ApiError> {
    params::check_completion_fields(&request)?;
    let logprobs = params::completion_logprobs(request.logprobs)?;
    let echo = request.echo.unwrap_or(false);
    let mut checked = check_common(
        caller,
        &request.common,
        request.common.max_tokens,
        logprobs,
        echo,
    )?;
    if echo {
        // The echoed prompt's tokens get as many alternatives as the generated ones.
        checked.sampling.prompt_logprobs = logprobs;
    }
    let model = state.model(&checked.model).await?;
    let prompts = params::prompts(request.prompt.as_ref(), model.vocab_size)?;
    if prompts.len() * checked.n > params::MAX_N {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "A request may produce at most {} choices (prompts × n).",
                params::MAX_N
            ),
        ));
    }
    let logits = sequence_logits(&model, &request.common, checked.grammar.clone()).await?;
    let prompts = tokenize_prompts(&model, prompts).await?;
    let echoes = if echo {
        let tokenizer = model.engine.tokenizer();
        let echoes = prompts
            .iter()
            .map(|prompt| EchoedPrompt::new(tokenizer, prompt))
            .collect::<Result<Vec<_>, _>>()?;
        Some(Arc::new(echoes))
    } else {
        None
    };

    let mut requests = Vec::with_capacity(prompts.len() * checked.n);
    for (prompt_index, prompt) in prompts.iter().enumerate() {
        let max_tokens = params::max_tokens(
            checked.max_tokens,
            Some(COMPLETIONS_DEFAULT_MAX_TOKENS),
            prompt.len(),
            model.max_sequence_len,
        )
        .map_err(|mut error| {
            if error.param.as_deref() == Some("messages") {
                error.param = Some("prompt".into());
            }
            error
        })?;
        requests.extend(checked.requests(prompt_index, prompt, max_tokens, arrived, &logits));
    }
    let choice_count = requests.len();
    let Started {
        mux,
        id,
        created,
        tokenizer,
        failure,
    } = start(state, &model, requests, "cmpl-").await?;

    if checked.stream {
        let header = StreamHeader {
            kind: StreamKind::Completion,
            id,
            created,
            model: model.id.clone(),
            choice_count,
            prompt_count: prompts.len(),
            include_usage: checked.include_usage,
            tools: None,
            echoes,
        };
        return Ok(Reply::Stream(sse::response(
            header, mux, tokenizer, failure,
        )));
    }
    let collected = generation::collect(mux, prompts.len(), failure).await?;
    let choices = collected
        .choices
        .into_iter()
        .map(|mut choice| {
            let echoed = echoes.as_ref().map(|e| &e[choice.prompt_index]);
            let mut text = choice.text;
            if let Some(echoed) = echoed {
                let shift = echoed.char_count();
                for record in &mut choice.tokens {
                    record.text_offset += shift;
                }
                text.insert_str(0, &echoed.text);
            }
            let prompt = echoed.zip(choice.prompt_logprobs.as_deref());
            CompletionChoice {
                index: choice.index,
                logprobs: logprobs.map(|_| completion_logprobs(&tokenizer, prompt, &choice.tokens)),
                text,
                finish_reason: Some(finish_reason_name(choice.reason)),
            }
        })
        .collect();
    Ok(Reply::Whole(Completion {
        id,
        object: "text_completion",
        created,
        model: model.id.clone(),
        choices,
        usage: Some(collected.usage),
    }))
}
