//! Every field of OpenAI's chat-completions and completions request objects, and every
//! heddle extension, against the real server: each is honoured (the request succeeds and,
//! where it is cheap to see, so does its effect), accepted as purely informational, or
//! refused with a 400 naming it. Never silently dropped.
//!
//! The tables are data: when heddle implements a field (`response_format`, `tools`, ...),
//! its entry flips from `Refused` to `Honoured`.

mod api_support;

use std::sync::OnceLock;

use api_support::{model, shared_server, test_config, SharedServer, SseReader};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";

fn server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    shared_server(&SERVER, || test_config(vec![model(MODEL)]))
}

/// The fields of OpenAI's chat-completions request object.
const OPENAI_CHAT_FIELDS: &[&str] = &[
    "messages",
    "model",
    "audio",
    "frequency_penalty",
    "function_call",
    "functions",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "metadata",
    "modalities",
    "n",
    "parallel_tool_calls",
    "prediction",
    "presence_penalty",
    "prompt_cache_key",
    "reasoning_effort",
    "response_format",
    "safety_identifier",
    "seed",
    "service_tier",
    "stop",
    "store",
    "stream",
    "stream_options",
    "temperature",
    "tool_choice",
    "tools",
    "top_logprobs",
    "top_p",
    "user",
    "verbosity",
    "web_search_options",
];

/// The fields of OpenAI's (legacy) completions request object.
const OPENAI_COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
];

/// heddle's own fields (some shared with vLLM), on both endpoints.
const HEDDLE_EXTENSIONS: &[&str] = &[
    "priority",
    "ignore_eos",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop_token_ids",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];

/// What heddle must do with a request.
enum Expect {
    /// The request succeeds and the response passes the check (its effect, where it is
    /// cheap to see). A streamed response is given as `{"chunks": [...]}`.
    Honoured(Box<dyn Fn(&Value) -> bool>),
    /// The request succeeds: the field only labels the request, or its value asks for
    /// nothing heddle does not do anyway (null, a default, an empty list).
    Accepted,
    /// 400 `invalid_request_error` with `param` naming the field.
    Refused,
}

/// One request: the base request with `fields` set, and the field it is about (the
/// `param` a refusal must name).
struct Case {
    param: &'static str,
    fields: Value,
    expect: Expect,
}

fn case(param: &'static str, value: Value, expect: Expect) -> Case {
    Case {
        param,
        fields: json!({ param: value }),
        expect,
    }
}

/// A case that needs other fields along with its own.
fn case_with(param: &'static str, fields: Value, expect: Expect) -> Case {
    Case {
        param,
        fields,
        expect,
    }
}

fn honoured(check: impl Fn(&Value) -> bool + 'static) -> Expect {
    Expect::Honoured(Box::new(check))
}

/// Honoured, with no effect that one short request shows.
fn honoured_quietly() -> Expect {
    honoured(|_| true)
}

fn completion_tokens(body: &Value) -> u64 {
    body["usage"]["completion_tokens"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

fn choice_count(body: &Value) -> usize {
    body["choices"].as_array().map_or(0, Vec::len)
}

fn stream_ended_with_usage(body: &Value) -> bool {
    let chunks = body["chunks"].as_array().expect("a stream");
    chunks.len() > 1 && chunks.last().unwrap()["usage"]["completion_tokens"].as_u64() > Some(0)
}

/// A schema whose only valid documents are `{"ok":true}` and `{"ok":false}`.
fn ok_schema() -> Value {
    json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
           "additionalProperties": false})
}

fn ok_json(text: &str) -> bool {
    text == r#"{"ok":true}"# || text == r#"{"ok":false}"#
}

/// A function taking one integer.
fn one_tool() -> Value {
    json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        "properties": {"x": {"type": "integer"}}, "required": ["x"], "additionalProperties": false}}}])
}

/// The cases both endpoints share: sampling, stopping, streaming, heddle's extensions,
/// informational fields and unknown ones. The base request asks for 4 tokens.
fn shared_cases(text: fn(&Value) -> String) -> Vec<Case> {
    use Expect::*;
    vec![
        case("model", json!(MODEL), honoured(|b| b["model"] == MODEL)),
        case(
            "max_tokens",
            json!(2),
            honoured(|b| completion_tokens(b) <= 2),
        ),
        case("n", json!(3), honoured(|b| choice_count(b) == 3)),
        case("temperature", json!(0), honoured_quietly()),
        case("top_p", json!(0.9), honoured_quietly()),
        case("frequency_penalty", json!(0.5), honoured_quietly()),
        case("presence_penalty", json!(0.5), honoured_quietly()),
        case_with(
            "seed",
            json!({"seed": 7, "temperature": 1.0}),
            honoured_quietly(),
        ),
        case(
            "stream",
            json!(true),
            honoured(|b| !b["chunks"].as_array().unwrap().is_empty()),
        ),
        case_with(
            "stream_options",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
            honoured(stream_ended_with_usage),
        ),
        case_with(
            "stream_options",
            json!({"stream": true, "stream_options": {"include_usage": true, "include_obfuscation": false}}),
            honoured(stream_ended_with_usage),
        ),
        case_with(
            "stream_options.frobnicate",
            json!({"stream": true, "stream_options": {"frobnicate": null}}),
            Accepted,
        ),
        case_with(
            "stream_options.frobnicate",
            json!({"stream": true, "stream_options": {"frobnicate": true}}),
            Refused,
        ),
        // Options for a stream nobody asked for, as OpenAI answers them.
        case_with(
            "stream_options",
            json!({"stream_options": {"include_usage": true}}),
            Refused,
        ),
        // heddle's extensions.
        case("priority", json!("low"), honoured_quietly()),
        case(
            "ignore_eos",
            json!(true),
            honoured(|b| completion_tokens(b) == 4 && b["choices"][0]["finish_reason"] == "length"),
        ),
        case("top_k", json!(5), honoured_quietly()),
        case("min_p", json!(0.1), honoured_quietly()),
        case("repetition_penalty", json!(1.2), honoured_quietly()),
        case("stop_token_ids", json!([0, 1]), honoured_quietly()),
        case_with(
            "guided_json",
            json!({"guided_json": ok_schema(), "max_tokens": 16}),
            honoured(move |b| ok_json(&text(b))),
        ),
        case_with(
            "guided_regex",
            json!({"guided_regex": "[0-9]{3}", "max_tokens": 16}),
            honoured(move |b| text(b).len() == 3 && text(b).chars().all(|c| c.is_ascii_digit())),
        ),
        case_with(
            "guided_choice",
            json!({"guided_choice": ["red", "green"], "max_tokens": 16}),
            honoured(move |b| ["red", "green"].contains(&text(b).as_str())),
        ),
        case_with(
            "guided_grammar",
            json!({"guided_grammar": "start: \"yes\" | \"no\"", "max_tokens": 16}),
            honoured(move |b| ["yes", "no"].contains(&text(b).as_str())),
        ),
        case("guided_regex", json!("(["), Refused),
        case("logit_bias", json!({"99999999": 1}), Refused),
        // Informational.
        case("user", json!("user-1234"), Accepted),
        // Unknown fields, OpenAI's answer: "Unrecognized request argument supplied".
        case("frobnicate", json!(1), Refused),
        case("skip_special_tokens", json!(false), Refused),
        // A null field is a field left out, known or not.
        case("frobnicate", json!(null), Accepted),
        case("logit_bias", json!(null), Accepted),
        // Over the limits on stop conditions.
        case("stop", json!(vec!["#"; 17]), Refused),
        case("stop", json!(["#".repeat(257)]), Refused),
        case("stop_token_ids", json!(vec![0; 257]), Refused),
        // A stop string is never part of the text.
        case_with(
            "stop",
            json!({"stop": [" ", "\n"], "ignore_eos": true}),
            honoured(move |b| !text(b).contains([' ', '\n'])),
        ),
    ]
}

fn chat_text(body: &Value) -> String {
    body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn completion_text(body: &Value) -> String {
    body["choices"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn chat_cases() -> Vec<Case> {
    use Expect::*;
    let mut cases = shared_cases(chat_text);
    cases.extend([
        case(
            "messages",
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]),
            honoured(|b| b["choices"][0]["message"]["role"] == "assistant"),
        ),
        case(
            "max_completion_tokens",
            json!(2),
            honoured(|b| completion_tokens(b) <= 2),
        ),
        case(
            "logprobs",
            json!(true),
            honoured(|b| b["choices"][0]["logprobs"]["content"].as_array().is_some_and(|c| !c.is_empty())),
        ),
        case_with(
            "top_logprobs",
            json!({"logprobs": true, "top_logprobs": 2}),
            honoured(|b| {
                b["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
                    .as_array()
                    .is_some_and(|top| top.len() == 2)
            }),
        ),
        // Informational.
        case("metadata", json!({"team": "search"}), Accepted),
        case("store", json!(false), Accepted),
        case("service_tier", json!("auto"), Accepted),
        case("prompt_cache_key", json!("conversation-7"), Accepted),
        case("safety_identifier", json!("hashed-user"), Accepted),
        case_with(
            "response_format",
            json!({"response_format": {"type": "json_object"}, "max_tokens": 64}),
            honoured(|b| {
                let text = chat_text(b);
                match b["choices"][0]["finish_reason"].as_str() {
                    Some("stop") => serde_json::from_str::<Value>(&text).is_ok_and(|v| v.is_object()),
                    _ => text.starts_with('{'),
                }
            }),
        ),
        case_with(
            "response_format",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ok_schema()}}, "max_tokens": 16}),
            honoured(|b| ok_json(&chat_text(b))),
        ),
        case("response_format", json!({"type": "text"}), Accepted),
        case_with(
            "response_format.type",
            json!({"response_format": {"type": "xml"}}),
            Refused,
        ),
        case("logit_bias", json!({"15": -100}), honoured_quietly()),
        // Not implemented: refused until they are.
        case_with(
            "tools",
            json!({"tools": one_tool(), "tool_choice": "required", "parallel_tool_calls": false, "max_tokens": 40}),
            honoured(|b| b["choices"][0]["finish_reason"] == "tool_calls"),
        ),
        case("tools", json!([]), Accepted),
        case_with(
            "tool_choice",
            json!({"tools": one_tool(), "tool_choice": {"type": "function", "function": {"name": "f"}}, "max_tokens": 40}),
            honoured(|b| b["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"),
        ),
        case("tool_choice", json!("auto"), Refused),
        case("tool_choice", json!("none"), Accepted),
        case_with(
            "parallel_tool_calls",
            json!({"tools": one_tool(), "tool_choice": "required", "parallel_tool_calls": true, "max_tokens": 40}),
            // Calls until the model stops, or max_tokens cuts the list: then no calls.
            honoured(|b| {
                let choice = &b["choices"][0];
                match choice["finish_reason"].as_str() {
                    Some("tool_calls") => choice["message"]["tool_calls"].as_array().is_some_and(|c| !c.is_empty()),
                    Some("length") => choice["message"].get("tool_calls").is_none(),
                    _ => false,
                }
            }),
        ),
        case("functions", json!([{"name": "f", "parameters": {"type": "object"}}]), Refused),
        case("function_call", json!("auto"), Refused),
        case("logit_bias", json!({}), Accepted),
        case("audio", json!({"voice": "alloy", "format": "wav"}), Refused),
        case("modalities", json!(["text", "audio"]), Refused),
        case("modalities", json!(["text"]), Accepted),
        case("prediction", json!({"type": "content", "content": "Hello"}), Refused),
        case("web_search_options", json!({}), Refused),
        case("reasoning_effort", json!("low"), Refused),
        case("verbosity", json!("low"), Refused),
        // Completions-only fields are unknown here.
        case("echo", json!(true), Refused),
        case("suffix", json!("x"), Refused),
        // The fields of a message besides role and content, and non-text content.
        message_case("messages[0].name", json!({"name": "bob"})),
        message_case("messages[0].tool_calls", json!({"tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]})),
        message_case("messages[0].tool_call_id", json!({"tool_call_id": "c"})),
        message_case("messages[0].function_call", json!({"function_call": {"name": "f", "arguments": "{}"}})),
        message_case("messages[0].audio", json!({"audio": {"id": "a"}})),
        message_case("messages[0].refusal", json!({"refusal": "no"})),
        message_case("messages[0].frobnicate", json!({"frobnicate": 1})),
        content_case(json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}})),
        content_case(json!({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}})),
        content_case(json!({"type": "file", "file": {"file_id": "file-1"}})),
        case_with(
            "messages[0].refusal",
            json!({"messages": [{"role": "user", "content": "Hi.", "refusal": null, "name": null}]}),
            Accepted,
        ),
    ]);
    cases
}

/// A one-message conversation whose message has `extra` fields.
fn message_case(param: &'static str, extra: Value) -> Case {
    let mut message = json!({"role": "user", "content": "Hi."});
    message
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    case_with(param, json!({ "messages": [message] }), Expect::Refused)
}

/// A message with a text part and a part of another kind.
fn content_case(part: Value) -> Case {
    let content = json!([{"type": "text", "text": "What is this?"}, part]);
    case_with(
        "messages[0].content",
        json!({"messages": [{"role": "user", "content": content}]}),
        Expect::Refused,
    )
}

fn completion_cases() -> Vec<Case> {
    use Expect::*;
    let mut cases = shared_cases(completion_text);
    cases.extend([
        case(
            "prompt",
            json!(["One", "Two"]),
            honoured(|b| choice_count(b) == 2),
        ),
        case(
            "logprobs",
            json!(2),
            honoured(|b| {
                b["choices"][0]["logprobs"]["top_logprobs"][0]
                    .as_object()
                    .is_some_and(|top| top.len() == 2)
            }),
        ),
        case("best_of", json!(3), Refused),
        case("best_of", json!(1), Accepted),
        case(
            "echo",
            json!(true),
            honoured(|b| {
                b["choices"][0]["text"]
                    .as_str()
                    .is_some_and(|text| text.starts_with("The three primary colours are"))
            }),
        ),
        case("echo", json!(false), Accepted),
        case("suffix", json!(" and that was all."), Refused),
        case("suffix", json!(""), Accepted),
        case("logit_bias", json!({"15": -100}), honoured_quietly()),
        case("logit_bias", json!({}), Accepted),
        // Chat-only fields are unknown here.
        case("max_completion_tokens", json!(2), Refused),
        case(
            "messages",
            json!([{"role": "user", "content": "Hi."}]),
            Refused,
        ),
        case("tools", json!([]), Refused),
        case("metadata", json!({"team": "search"}), Accepted),
    ]);
    cases
}

/// Posts a request; a streamed answer comes back as `{"chunks": [...]}`.
async fn send(path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(server().url(path))
        .json(body)
        .send()
        .await
        .expect("answered");
    let status = response.status().as_u16();
    let streamed = response
        .headers()
        .get("content-type")
        .is_some_and(|t| t.to_str().unwrap_or("").starts_with("text/event-stream"));
    if !streamed {
        return (status, response.json().await.expect("a JSON body"));
    }
    let events = SseReader::new(response).collect().await;
    let chunks: Vec<Value> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).expect("a JSON chunk"))
        .collect();
    (status, json!({ "chunks": chunks }))
}

/// Runs every case on top of `base` and lists the ones heddle got wrong.
async fn run(path: &str, base: Value, cases: Vec<Case>) -> Vec<String> {
    let mut wrong = Vec::new();
    for case in cases {
        let mut body = base.clone();
        let fields = case
            .fields
            .as_object()
            .expect("fields are an object")
            .clone();
        body.as_object_mut().unwrap().extend(fields);
        let (status, answer) = send(path, &body).await;
        let error = &answer["error"];
        let verdict = match case.expect {
            Expect::Honoured(check) if status == 200 && check(&answer) => None,
            Expect::Honoured(_) => Some("to be honoured"),
            Expect::Accepted if status == 200 => None,
            Expect::Accepted => Some("to be accepted"),
            Expect::Refused => {
                let message = error["message"].as_str().unwrap_or_default().to_lowercase();
                let last_part = case.param.rsplit('.').next().unwrap();
                let refused = status == 400
                    && error["type"] == "invalid_request_error"
                    && error["param"] == case.param
                    && message.contains(last_part);
                (!refused).then_some("a 400 naming it")
            }
        };
        if let Some(expected) = verdict {
            wrong.push(format!(
                "{path} {}: expected {expected}, got {status} {answer} for {}",
                case.param, case.fields
            ));
        }
    }
    wrong
}

fn missing_fields(cases: &[Case], fields: &[&str]) -> Vec<String> {
    fields
        .iter()
        .chain(HEDDLE_EXTENSIONS)
        .filter(|field| !cases.iter().any(|c| c.param == **field))
        .map(|field| field.to_string())
        .collect()
}

#[tokio::test]
async fn every_chat_completions_field_is_honoured_or_refused_by_name() {
    let cases = chat_cases();
    let missing = missing_fields(&cases, OPENAI_CHAT_FIELDS);
    assert!(missing.is_empty(), "fields without a case: {missing:?}");
    let base = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello to the team."}],
        "max_tokens": 4,
        "temperature": 0,
    });
    let wrong = run("/v1/chat/completions", base, cases).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn every_completions_field_is_honoured_or_refused_by_name() {
    let cases = completion_cases();
    let missing = missing_fields(&cases, OPENAI_COMPLETION_FIELDS);
    assert!(missing.is_empty(), "fields without a case: {missing:?}");
    let base = json!({
        "model": MODEL,
        "prompt": "The three primary colours are",
        "max_tokens": 4,
        "temperature": 0,
    });
    let wrong = run("/v1/completions", base, cases).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
