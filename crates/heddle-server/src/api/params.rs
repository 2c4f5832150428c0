//! Request fields → validated engine parameters, with OpenAI-style 400 errors that name
//! the field at fault.

use serde_json::{json, Map, Value};

use heddle_core::request::MAX_TOP_LOGPROBS;
use heddle_core::{Priority, SamplingParams, StopCriteria, TokenId};
use heddle_model::chat_template::ChatMessage;

use super::errors::ApiError;
use super::openai::{ChatCompletionRequest, ChatMessageIn, CommonFields, CompletionRequest};
use super::tools::message_tool_calls;

/// The most choices one request may produce (n, or prompts × n), as OpenAI's `n` limit.
pub const MAX_N: usize = 128;

/// What heddle does with the fields of one JSON object of a request that its request
/// types do not read. A field set to null counts as left out. Any other field is refused
/// with a 400 naming it, as OpenAI refuses an unknown one ("Unrecognized request argument
/// supplied"): a server that dropped it would answer something other than what was asked.
pub struct UnreadFields {
    /// Fields that only label, route or bill a request: accepted and ignored.
    informational: &'static [&'static str],
    /// OpenAI's fields that change the output and that heddle does not implement, with
    /// what they ask for. Refused, unless their value asks for nothing heddle does not
    /// do anyway (see [`asks_for_nothing_new`]).
    unsupported: &'static [(&'static str, &'static str)],
}

/// Both endpoints accept the same informational fields (OpenAI's chat completions has all
/// of them, its legacy completions only `user`).
const INFORMATIONAL: &[&str] = &[
    "user",
    "safety_identifier",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
];

/// The fields of a `/v1/chat/completions` request.
const CHAT_REQUEST: UnreadFields = UnreadFields {
    informational: INFORMATIONAL,
    unsupported: &[
        ("functions", "function calling (use `tools`)"),
        ("function_call", "function calling"),
        ("audio", "audio output"),
        ("modalities", "output other than text"),
        ("prediction", "predicted outputs"),
        ("web_search_options", "web search"),
        ("reasoning_effort", "reasoning effort"),
        ("verbosity", "verbosity control"),
        SGLANG_SKIP_SPECIAL_TOKENS,
        SGLANG_NO_STOP_TRIM,
        SGLANG_RETURN_HIDDEN_STATES,
        (
            "continue_final_message",
            "continuing the last assistant message",
        ),
        ("separate_reasoning", "a reasoning parser"),
        ("stream_reasoning", "a reasoning parser"),
    ],
};

// SGLang's extensions, which sglang-router writes into every request it forwards, at
// their defaults; heddle does what those defaults ask.
const SGLANG_SKIP_SPECIAL_TOKENS: (&str, &str) =
    ("skip_special_tokens", "keeping special tokens in the text");
const SGLANG_NO_STOP_TRIM: (&str, &str) = ("no_stop_trim", "keeping stop strings in the text");
const SGLANG_RETURN_HIDDEN_STATES: (&str, &str) = ("return_hidden_states", "hidden states");

/// The fields of a `/v1/completions` request.
const COMPLETION_REQUEST: UnreadFields = UnreadFields {
    informational: INFORMATIONAL,
    unsupported: &[
        ("best_of", "best-of sampling"),
        ("suffix", "insertion before a suffix"),
        SGLANG_SKIP_SPECIAL_TOKENS,
        SGLANG_NO_STOP_TRIM,
        SGLANG_RETURN_HIDDEN_STATES,
    ],
};

/// The fields of a chat message besides `role` and `content`.
const CHAT_MESSAGE: UnreadFields = UnreadFields {
    informational: &[],
    unsupported: &[
        ("name", "participant names"),
        ("function_call", "function calling (use `tool_calls`)"),
        ("audio", "audio"),
        ("refusal", "refusals"),
    ],
};

/// The fields of `stream_options` besides `include_usage`. heddle's chunks have no
/// `obfuscation` padding, whichever way `include_obfuscation` is set: it guards against
/// a side channel and does not change the text.
const STREAM_OPTIONS: UnreadFields = UnreadFields {
    informational: &["include_obfuscation"],
    unsupported: &[],
};

/// Whether an unsupported field's value asks only for what heddle does anyway: its
/// default, or an empty list of tools.
fn asks_for_nothing_new(field: &str, value: &Value) -> bool {
    match field {
        "best_of" => value.as_i64() == Some(1),
        "suffix" => value == "",
        "functions" => value.as_array().is_some_and(Vec::is_empty),
        "modalities" => *value == json!(["text"]),
        "skip_special_tokens" => value == true,
        "no_stop_trim" | "return_hidden_states" | "continue_final_message" => value == false,
        // SGLang separates reasoning only with a reasoning parser, which heddle, like an
        // SGLang server started without `--reasoning-parser`, does not have: either value
        // leaves the text as it is.
        "separate_reasoning" | "stream_reasoning" => value.is_boolean(),
        _ => false,
    }
}

impl UnreadFields {
    /// Accepts `unread`, or refuses its first field heddle cannot honour; `prefix` places
    /// the object in the request (e.g. `messages[2].`).
    fn check(&self, prefix: &str, unread: &Map<String, Value>) -> Result<(), ApiError> {
        for (field, value) in unread {
            if value.is_null() || self.informational.contains(&field.as_str()) {
                continue;
            }
            let param = format!("{prefix}{field}");
            match self.unsupported.iter().find(|(name, _)| name == field) {
                Some(_) if asks_for_nothing_new(field, value) => {}
                Some((_, feature)) => {
                    let mut error = ApiError::invalid_param(
                        &param,
                        format!("`{param}` is not supported: heddle does not implement {feature}."),
                    );
                    error.code = Some("unsupported_parameter");
                    return Err(error);
                }
                None => {
                    return Err(ApiError::invalid_param(
                        &param,
                        format!("Unrecognized request argument supplied: {param}"),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// A chat request's fields outside its messages: see [`UnreadFields`].
pub fn check_chat_fields(request: &ChatCompletionRequest) -> Result<(), ApiError> {
    CHAT_REQUEST.check("", &request.unread)?;
    check_stream_options(&request.common)
}

/// A completions request's fields: see [`UnreadFields`].
pub fn check_completion_fields(request: &CompletionRequest) -> Result<(), ApiError> {
    COMPLETION_REQUEST.check("", &request.unread)?;
    check_stream_options(&request.common)
}

fn check_stream_options(common: &CommonFields) -> Result<(), ApiError> {
    match &common.stream_options {
        // As OpenAI: options for a stream that is not asked for are a mistake.
        Some(_) if common.stream != Some(true) => Err(ApiError::invalid_param(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true.",
        )),
        Some(options) => STREAM_OPTIONS.check("stream_options.", &options.unread),
        None => Ok(()),
    }
}

/// The model the request names.
pub fn model_name(common: &CommonFields) -> Result<&str, ApiError> {
    match common.model.as_deref() {
        Some(model) if !model.is_empty() => Ok(model),
        _ => Err(ApiError::invalid_param(
            "model",
            "You must provide a model parameter.",
        )),
    }
}

/// The `priority` field: "high", "normal", "low" or 0, 1, 2.
pub fn priority(value: Option<&Value>) -> Result<Option<Priority>, ApiError> {
    let parsed = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => text.parse(),
        Some(Value::Number(number)) => match number.as_i64() {
            Some(n) => Priority::from_value(n),
            None => invalid_priority(number),
        },
        Some(other) => invalid_priority(other),
    };
    parsed.map(Some).map_err(ApiError::from)
}

fn invalid_priority(value: impl ToString) -> Result<Priority, heddle_core::CoreError> {
    Err(heddle_core::CoreError::InvalidPriority(value.to_string()))
}

/// The `stop` field: a string or a list of strings.
pub fn stop_strings(value: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let invalid =
        || ApiError::invalid_param("stop", "`stop` must be a string or a list of strings.");
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(stop)) => Ok(vec![stop.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_string).ok_or_else(invalid))
            .collect(),
        Some(_) => Err(invalid()),
    }
}

/// `n`: how many choices per prompt.
pub fn choices(common: &CommonFields) -> Result<usize, ApiError> {
    match common.n {
        None => Ok(1),
        Some(n) if (1..=MAX_N as i64).contains(&n) => Ok(n as usize),
        Some(n) => Err(ApiError::invalid_param(
            "n",
            format!("`n` must be between 1 and {MAX_N}, got {n}."),
        )),
    }
}

/// How many log-probability alternatives a request wants: None for no log-probabilities,
/// Some(k) for the chosen token's plus `k` alternatives.
pub type LogprobRequest = Option<u32>;

/// Chat: `logprobs` (bool) and `top_logprobs` (0..=20, needs `logprobs`).
pub fn chat_logprobs(logprobs: Option<bool>, top: Option<i64>) -> Result<LogprobRequest, ApiError> {
    let top = match top {
        None => 0,
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => k as u32,
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}."),
            ))
        }
    };
    match logprobs {
        Some(true) => Ok(Some(top)),
        _ if top > 0 => Err(ApiError::invalid_param(
            "top_logprobs",
            "`top_logprobs` needs `logprobs` set to true.",
        )),
        _ => Ok(None),
    }
}

/// Completions: `logprobs` is the number of alternatives (0 for the chosen token only).
pub fn completion_logprobs(logprobs: Option<i64>) -> Result<LogprobRequest, ApiError> {
    match logprobs {
        None => Ok(None),
        Some(k) if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Ok(Some(k as u32)),
        Some(k) => Err(ApiError::invalid_param(
            "logprobs",
            format!("`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}."),
        )),
    }
}

/// The sampling fields, validated by heddle-core's rules (temperature >= 0, top_p in
/// (0, 1], penalties in range, ...).
pub fn sampling(
    common: &CommonFields,
    logprobs: LogprobRequest,
) -> Result<SamplingParams, ApiError> {
    let defaults = SamplingParams::default();
    let top_k = match common.top_k {
        None | Some(-1) => 0,
        Some(k) if k >= 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("`top_k` must be >= 0 (or -1 to disable it), got {k}."),
            ))
        }
    };
    let params = SamplingParams {
        temperature: common.temperature.unwrap_or(defaults.temperature),
        top_p: common.top_p.unwrap_or(defaults.top_p),
        top_k,
        min_p: common.min_p.unwrap_or(defaults.min_p),
        repetition_penalty: common
            .repetition_penalty
            .unwrap_or(defaults.repetition_penalty),
        frequency_penalty: common
            .frequency_penalty
            .unwrap_or(defaults.frequency_penalty),
        presence_penalty: common.presence_penalty.unwrap_or(defaults.presence_penalty),
        // Any integer is a valid seed; negative ones are reinterpreted bit for bit.
        seed: common.seed.map(|s| s as u64),
        logprobs: logprobs.is_some(),
        top_logprobs: logprobs.unwrap_or(0),
        // Set by the completions endpoint for `echo`.
        prompt_logprobs: None,
    };
    params.validate()?;
    Ok(params)
}

/// Stop strings, the request's stop token ids and `ignore_eos`; `max_tokens` is set
/// later, once the prompt's length is known.
pub fn stop_criteria(common: &CommonFields) -> Result<StopCriteria, ApiError> {
    let stop_token_ids = common
        .stop_token_ids
        .iter()
        .flatten()
        .map(|&id| {
            TokenId::try_from(id).map_err(|_| {
                ApiError::invalid_param("stop_token_ids", format!("{id} is not a token id."))
            })
        })
        .collect::<Result<_, _>>()?;
    let stop = StopCriteria {
        max_tokens: 1,
        stop_token_ids,
        stop_strings: stop_strings(common.stop.as_ref())?,
        ignore_eos: common.ignore_eos.unwrap_or(false),
        ..StopCriteria::default()
    };
    stop.validate()?;
    Ok(stop)
}

/// `max_tokens` (or `max_completion_tokens`) as asked, before the prompt is known: >= 1,
/// or 0 with `echo` (to score the prompt and generate nothing).
pub fn requested_max_tokens(requested: Option<i64>, echo: bool) -> Result<Option<usize>, ApiError> {
    match requested {
        None => Ok(None),
        Some(n) if n >= 1 || (n == 0 && echo) => Ok(Some(usize::try_from(n).unwrap_or(usize::MAX))),
        Some(0) => Err(ApiError::invalid_param(
            "max_tokens",
            "`max_tokens` must be at least 1, got 0 (0 is allowed only with `echo`, to \
             score the prompt).",
        )),
        Some(n) => Err(ApiError::invalid_param(
            "max_tokens",
            format!("`max_tokens` must be at least 1, got {n}."),
        )),
    }
}

/// The output length, checked against the context: `requested` when given, else
/// `default` (capped by what is left), else all that is left.
pub fn max_tokens(
    requested: Option<usize>,
    default: Option<usize>,
    prompt_len: usize,
    max_sequence_len: usize,
) -> Result<usize, ApiError> {
    if prompt_len >= max_sequence_len {
        return Err(context_exceeded(
            "messages",
            format!(
                "This model's maximum context length is {max_sequence_len} tokens, but the \
                 prompt has {prompt_len} tokens."
            ),
        ));
    }
    let left = max_sequence_len - prompt_len;
    match requested {
        Some(n) if n > left => Err(context_exceeded(
            "max_tokens",
            format!(
                "This model's maximum context length is {max_sequence_len} tokens. However, \
                 you requested {} tokens ({prompt_len} in the prompt, {n} for the \
                 completion). Please reduce the prompt or the completion length.",
                prompt_len.saturating_add(n)
            ),
        )),
        Some(n) => Ok(n),
        None => Ok(default.map_or(left, |d| d.min(left))),
    }
}

fn context_exceeded(param: &str, message: String) -> ApiError {
    let mut error = ApiError::invalid_param(param, message);
    error.code = Some("context_length_exceeded");
    error
}

/// Chat messages → the template's messages. Content is a string, a list of text parts,
/// or null (an assistant turn with no text); roles are system, developer (OpenAI's newer
/// name for system), user, assistant (with `tool_calls`, see [`super::tools`]) and tool
/// (with `tool_call_id`).
pub fn chat_messages(messages: Option<&[ChatMessageIn]>) -> Result<Vec<ChatMessage>, ApiError> {
    let messages = match messages {
        Some(messages) if !messages.is_empty() => messages,
        _ => {
            return Err(ApiError::invalid_param(
                "messages",
                "`messages` must be a non-empty list.",
            ))
        }
    };
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(ApiError::invalid_param(
                        format!("messages[{i}].role"),
                        format!(
                            "Unsupported role {other:?}: expected system, developer, user, \
                             assistant or tool."
                        ),
                    ))
                }
            };
            CHAT_MESSAGE.check(&format!("messages[{i}]."), &message.unread)?;
            let content = message_text(&message.content).map_err(|reason| {
                ApiError::invalid_param(format!("messages[{i}].content"), reason)
            })?;
            let mut chat_message = ChatMessage::new(role, &content);
            match (role, &message.tool_calls) {
                (_, None | Some(Value::Null)) => {}
                ("assistant", Some(calls)) => {
                    let param = format!("messages[{i}].tool_calls");
                    let calls = message_tool_calls(&param, calls)?;
                    chat_message.tool_calls = (!calls.is_empty()).then_some(calls);
                }
                (_, Some(_)) => {
                    return Err(ApiError::invalid_param(
                        format!("messages[{i}].tool_calls"),
                        "Only assistant messages have `tool_calls`.",
                    ))
                }
            }
            match (role, &message.tool_call_id) {
                ("tool", Some(Value::String(id))) => chat_message.tool_call_id = Some(id.clone()),
                ("tool", _) => {
                    return Err(ApiError::invalid_param(
                        format!("messages[{i}].tool_call_id"),
                        "A tool message needs the `tool_call_id` (a string) of the call it \
                         answers.",
                    ))
                }
                (_, None | Some(Value::Null)) => {}
                (_, Some(_)) => {
                    return Err(ApiError::invalid_param(
                        format!("messages[{i}].tool_call_id"),
                        "Only tool messages have a `tool_call_id`.",
                    ))
                }
            }
            Ok(chat_message)
        })
        .collect()
}

fn message_text(content: &Value) -> Result<String, String> {
    match content {
        Value::Null => Ok(String::new()),
        Value::String(text) => Ok(text.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(piece))) => text.push_str(piece),
                    (Some(kind), _) if kind != "text" => {
                        return Err(format!("Content parts of type {kind:?} are not supported."))
                    }
                    _ => {
                        return Err(
                            "A content part must be {\"type\": \"text\", \"text\": ...}.".into(),
                        )
                    }
                }
            }
            Ok(text)
        }
        _ => Err("`content` must be a string or a list of text parts.".into()),
    }
}

/// One prompt of a completions request.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<TokenId>),
}

/// The `prompt` field: a string, a list of strings, a list of token ids or a list of
/// token id lists. Token ids must be below `vocab_size`.
pub fn prompts(value: Option<&Value>, vocab_size: usize) -> Result<Vec<PromptInput>, ApiError> {
    let invalid = |message: &str| ApiError::invalid_param("prompt", message);
    let shape = "`prompt` must be a string, a list of strings, a list of token ids or a list \
                 of lists of token ids.";
    let tokens = |items: &[Value]| -> Result<Vec<TokenId>, ApiError> {
        items
            .iter()
            .map(|item| match item.as_u64() {
                Some(id) if id < vocab_size as u64 => Ok(id as TokenId),
                Some(id) => Err(invalid(&format!(
                    "Token id {id} is outside the model's vocabulary of {vocab_size} tokens."
                ))),
                None => Err(invalid(shape)),
            })
            .collect()
    };
    let prompts = match value {
        None | Some(Value::Null) => return Err(invalid("You must provide a prompt.")),
        Some(Value::String(text)) => vec![PromptInput::Text(text.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(invalid("`prompt` must not be empty."))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|item| match item {
                    Value::String(text) => Ok(PromptInput::Text(text.clone())),
                    _ => Err(invalid(shape)),
                })
                .collect::<Result<_, _>>()?,
            Value::Number(_) => vec![PromptInput::Tokens(tokens(items)?)],
            Value::Array(_) => items
                .iter()
                .map(|item| match item {
                    Value::Array(ids) if !ids.is_empty() => Ok(PromptInput::Tokens(tokens(ids)?)),
                    Value::Array(_) => Err(invalid("A token id list must not be empty.")),
                    _ => Err(invalid(shape)),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(invalid(shape)),
        },
        Some(_) => return Err(invalid(shape)),
    };
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use serde_json::json;

    fn common(value: Value) -> CommonFields {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn priorities_parse_from_names_and_numbers() {
        assert_eq!(
            priority(Some(&json!("high"))).unwrap(),
            Some(Priority::High)
        );
        assert_eq!(priority(Some(&json!(2))).unwrap(), Some(Priority::Low));
        assert_eq!(priority(None).unwrap(), None);
        for bad in [json!("urgent"), json!(7), json!(1.5), json!([1])] {
            let error = priority(Some(&bad)).unwrap_err();
            assert_eq!(error.param.as_deref(), Some("priority"), "{bad}");
        }
    }

    #[test]
    fn sampling_values_are_checked() {
        for (field, value) in [
            ("temperature", json!(-0.5)),
            ("top_p", json!(0)),
            ("top_p", json!(1.5)),
            ("top_k", json!(-2)),
            ("frequency_penalty", json!(3)),
        ] {
            let fields = common(json!({ field: value }));
            let error = sampling(&fields, None).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert_eq!(error.param.as_deref(), Some(field));
        }
        let fields = common(json!({"temperature": 0, "top_k": -1, "seed": -1}));
        let params = sampling(&fields, Some(3)).unwrap();
        assert!(params.is_greedy());
        assert_eq!(params.top_k, 0);
        assert_eq!(params.seed, Some(u64::MAX));
        assert!(params.logprobs && params.top_logprobs == 3);
    }

    #[test]
    fn stop_is_a_string_or_a_bounded_list() {
        let one = stop_criteria(&common(json!({"stop": "\n"}))).unwrap();
        assert_eq!(one.stop_strings, ["\n"]);
        let many = stop_criteria(&common(json!({"stop": ["a", "b"], "ignore_eos": true}))).unwrap();
        assert_eq!(many.stop_strings, ["a", "b"]);
        assert!(many.ignore_eos);
        let sixteen = vec!["x".repeat(256); 16];
        assert!(stop_criteria(&common(json!({ "stop": sixteen }))).is_ok());
        for bad in [
            json!(vec!["x"; 17]),
            json!(["x".repeat(257)]),
            json!([""]),
            json!(5),
            json!([1]),
        ] {
            let error = stop_criteria(&common(json!({ "stop": bad }))).unwrap_err();
            assert_eq!(error.param.as_deref(), Some("stop"));
        }
        let ids = common(json!({"stop_token_ids": vec![1; 256]}));
        assert_eq!(stop_criteria(&ids).unwrap().stop_token_ids.len(), 256);
        let error = stop_criteria(&common(json!({"stop_token_ids": vec![1; 257]}))).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("stop_token_ids"));
    }

    /// The check of a chat request made of `fields` plus a model and a message.
    fn chat_fields(fields: Value) -> Result<(), ApiError> {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        let request: ChatCompletionRequest = serde_json::from_value(body).unwrap();
        check_chat_fields(&request)?;
        chat_messages(request.messages.as_deref()).map(drop)
    }

    fn refused_param(result: Result<(), ApiError>) -> String {
        let error = result.unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        error.param.expect("the field at fault")
    }

    #[test]
    fn fields_heddle_does_not_read_are_refused_by_name() {
        for field in ["functions", "frobnicate"] {
            let result = chat_fields(json!({ field: {"x": 1} }));
            assert_eq!(refused_param(result), field);
        }
        let unsupported = chat_fields(json!({"reasoning_effort": "low"})).unwrap_err();
        assert_eq!(unsupported.code, Some("unsupported_parameter"));
        assert!(unsupported.message.contains("`reasoning_effort`"));
        let unknown = chat_fields(json!({"min_tokens": 3})).unwrap_err();
        assert_eq!(
            unknown.message,
            "Unrecognized request argument supplied: min_tokens"
        );
        let message = chat_fields(json!({
            "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "name": "bob"}]
        }));
        assert_eq!(refused_param(message), "messages[1].name");
        let options =
            chat_fields(json!({"stream": true, "stream_options": {"include_usage": true, "x": 1}}));
        assert_eq!(refused_param(options), "stream_options.x");
        let without_stream = chat_fields(json!({"stream_options": {"include_usage": true}}));
        assert_eq!(refused_param(without_stream), "stream_options");
        // A completions-only field is unknown to chat, and the other way round.
        assert_eq!(refused_param(chat_fields(json!({"echo": true}))), "echo");
        let completion: CompletionRequest =
            serde_json::from_value(json!({"prompt": "x", "tools": [{"type": "function"}]}))
                .unwrap();
        let error = check_completion_fields(&completion).unwrap_err();
        assert!(error.message.starts_with("Unrecognized"), "{error:?}");
    }

    #[test]
    fn informational_null_and_default_values_are_accepted() {
        chat_fields(json!({
            "user": "u", "metadata": {"k": "v"}, "store": false, "service_tier": "auto",
            "prompt_cache_key": "k", "safety_identifier": "s",
            "web_search_options": null, "frobnicate": null, "tool_choice": "none", "tools": [],
            "logit_bias": {}, "response_format": {"type": "text"}, "modalities": ["text"],
            "stream": true, "stream_options": {"include_obfuscation": false},
            "messages": [{"role": "assistant", "content": "a", "refusal": null, "tool_calls": []}]
        }))
        .unwrap();
        let completion: CompletionRequest = serde_json::from_value(json!({
            "prompt": "x", "echo": true, "best_of": 1, "suffix": "", "user": "u"
        }))
        .unwrap();
        check_completion_fields(&completion).unwrap();
        for (field, value) in [("best_of", json!(2)), ("suffix", json!("end"))] {
            let completion: CompletionRequest =
                serde_json::from_value(json!({"prompt": "x", field: value})).unwrap();
            let error = check_completion_fields(&completion).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(field));
        }
    }

    #[test]
    fn sglang_router_defaults_are_accepted_and_other_values_refused() {
        // What sglang-router 0.3 adds to every chat request it forwards.
        chat_fields(json!({
            "no_stop_trim": false, "ignore_eos": false, "continue_final_message": false,
            "skip_special_tokens": true, "separate_reasoning": true, "stream_reasoning": true,
            "return_hidden_states": false
        }))
        .unwrap();
        let completion: CompletionRequest = serde_json::from_value(json!({
            "prompt": "x", "echo": false, "no_stop_trim": false, "ignore_eos": false,
            "skip_special_tokens": true, "return_hidden_states": false
        }))
        .unwrap();
        check_completion_fields(&completion).unwrap();
        for (field, value) in [
            ("skip_special_tokens", json!(false)),
            ("no_stop_trim", json!(true)),
            ("return_hidden_states", json!(true)),
            ("continue_final_message", json!(true)),
            ("separate_reasoning", json!("yes")),
        ] {
            let error = chat_fields(json!({ field: value })).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(field));
            assert_eq!(error.code, Some("unsupported_parameter"));
        }
    }

    #[test]
    fn max_tokens_respects_the_context() {
        assert_eq!(requested_max_tokens(Some(5), false).unwrap(), Some(5));
        assert_eq!(requested_max_tokens(None, false).unwrap(), None);
        assert_eq!(requested_max_tokens(Some(0), true).unwrap(), Some(0));
        assert!(requested_max_tokens(Some(-1), true).is_err());
        for bad in [0, -3] {
            let error = requested_max_tokens(Some(bad), false).unwrap_err();
            assert_eq!(error.param.as_deref(), Some("max_tokens"));
        }
        assert_eq!(max_tokens(Some(5), None, 10, 100).unwrap(), 5);
        assert_eq!(max_tokens(None, Some(16), 10, 100).unwrap(), 16);
        assert_eq!(max_tokens(None, Some(16), 95, 100).unwrap(), 5);
        assert_eq!(max_tokens(None, None, 10, 100).unwrap(), 90);
        let too_long = max_tokens(Some(91), None, 10, 100).unwrap_err();
        assert_eq!(too_long.code, Some("context_length_exceeded"));
        assert!(max_tokens(None, None, 100, 100).is_err());
    }

    #[test]
    fn logprob_fields_follow_openai() {
        assert_eq!(chat_logprobs(Some(true), Some(2)).unwrap(), Some(2));
        assert_eq!(chat_logprobs(Some(true), None).unwrap(), Some(0));
        assert_eq!(chat_logprobs(None, None).unwrap(), None);
        assert!(chat_logprobs(Some(false), Some(2)).is_err());
        assert!(chat_logprobs(Some(true), Some(21)).is_err());
        assert_eq!(completion_logprobs(Some(0)).unwrap(), Some(0));
        assert!(completion_logprobs(Some(-1)).is_err());
    }

    #[test]
    fn messages_take_strings_text_parts_and_known_roles() {
        let messages: Vec<ChatMessageIn> = serde_json::from_value(json!([
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": null}
        ]))
        .unwrap();
        let converted = chat_messages(Some(&messages)).unwrap();
        assert_eq!(
            converted,
            [
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "hi there"),
                ChatMessage::new("assistant", ""),
            ]
        );
        assert!(chat_messages(Some(&[])).is_err());
        assert!(chat_messages(None).is_err());
        let image: Vec<ChatMessageIn> = serde_json::from_value(
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        )
        .unwrap();
        assert_eq!(
            chat_messages(Some(&image)).unwrap_err().param.as_deref(),
            Some("messages[0].content")
        );
        let tool: Vec<ChatMessageIn> =
            serde_json::from_value(json!([{"role": "tool", "content": "x"}])).unwrap();
        assert!(chat_messages(Some(&tool)).is_err());
    }

    #[test]
    fn prompts_come_in_four_shapes() {
        assert_eq!(
            prompts(Some(&json!("hi")), 10).unwrap(),
            [PromptInput::Text("hi".into())]
        );
        assert_eq!(prompts(Some(&json!(["a", "b"])), 10).unwrap().len(), 2);
        assert_eq!(
            prompts(Some(&json!([1, 2])), 10).unwrap(),
            [PromptInput::Tokens(vec![1, 2])]
        );
        assert_eq!(
            prompts(Some(&json!([[1], [2, 3]])), 10).unwrap(),
            [
                PromptInput::Tokens(vec![1]),
                PromptInput::Tokens(vec![2, 3])
            ]
        );
        for bad in [
            json!([]),
            json!([10]),
            json!([-1]),
            json!(["a", 1]),
            json!([[]]),
            json!({}),
            json!(null),
        ] {
            assert!(prompts(Some(&bad), 10).is_err(), "{bad}");
        }
    }
}
