//! Tool calling against the real server and the embedded model: constrained calls for
//! `required` and named choices, detection for `auto`, none for `none`, streamed deltas,
//! multi-turn conversations with tool results, and refusals.

mod api_support;

use std::sync::OnceLock;

use api_support::{model, post_json, shared_server, test_config, SharedServer, SseReader};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";

fn server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    shared_server(&SERVER, || test_config(vec![model(MODEL)]))
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]}
            }, "required": ["city", "unit"], "additionalProperties": false}
        }},
        {"type": "function", "function": {
            "name": "add",
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer"}, "b": {"type": "integer"}
            }, "required": ["a", "b"], "additionalProperties": false}
        }}
    ])
}

fn request(fields: Value) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": tools(),
        "max_tokens": 120,
        "temperature": 0,
    });
    body.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    body
}

async fn chat(body: &Value) -> Value {
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/v1/chat/completions"),
        body,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The function name and parsed arguments of each call, checking ids and types.
fn calls(message: &Value) -> Vec<(String, Value)> {
    message["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("no tool_calls in {message}"))
        .iter()
        .map(|call| {
            assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
            assert_eq!(call["type"], "function");
            let arguments = call["function"]["arguments"].as_str().unwrap();
            (
                call["function"]["name"].as_str().unwrap().to_string(),
                serde_json::from_str(arguments).expect("arguments are JSON"),
            )
        })
        .collect()
}

fn assert_valid_call((name, arguments): &(String, Value)) {
    match name.as_str() {
        "get_weather" => {
            let object = arguments.as_object().unwrap();
            assert_eq!(object.len(), 2, "{arguments}");
            assert!(arguments["city"].as_str().unwrap().chars().count() <= 24);
            assert!(["celsius", "fahrenheit"].contains(&arguments["unit"].as_str().unwrap()));
        }
        "add" => {
            assert_eq!(arguments.as_object().unwrap().len(), 2, "{arguments}");
            assert!(
                arguments["a"].is_i64() && arguments["b"].is_i64(),
                "{arguments}"
            );
        }
        other => panic!("a call to {other}"),
    }
}

#[tokio::test]
async fn required_and_named_choices_make_valid_calls() {
    let body = chat(&request(
        json!({"tool_choice": "required", "parallel_tool_calls": false}),
    ))
    .await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    let made = calls(&choice["message"]);
    assert_eq!(made.len(), 1);
    assert_valid_call(&made[0]);

    let named = json!({"type": "function", "function": {"name": "add"}});
    let mut sampled = request(json!({"tool_choice": named, "temperature": 1.0, "seed": 4}));
    sampled["messages"][0]["content"] = json!("Add two numbers.");
    let body = chat(&sampled).await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    assert!(choice["message"]["content"].is_null(), "{body}");
    let made = calls(&choice["message"]);
    assert_eq!(made.len(), 1);
    assert_eq!(made[0].0, "add");
    assert_valid_call(&made[0]);
}

#[tokio::test]
async fn auto_detects_calls_and_none_shows_no_tools() {
    // The output is forced to a call in the Hermes format: `auto` must recognise it.
    let forced = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}\n</tool_call>";
    let body = chat(&request(json!({
        "tool_choice": "auto",
        "guided_regex": regex::escape(forced),
    })))
    .await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
    let made = calls(&choice["message"]);
    assert_eq!(
        made,
        [(
            "get_weather".to_string(),
            json!({"city": "Paris", "unit": "celsius"})
        )]
    );

    // The same text with `tool_choice: "none"` is plain content.
    let body = chat(&request(json!({
        "tool_choice": "none",
        "guided_regex": regex::escape(forced),
    })))
    .await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{body}");
    assert_eq!(choice["message"]["content"], forced);
    assert!(choice["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn a_cut_call_ends_with_length_and_no_calls() {
    let body = chat(&request(
        json!({"tool_choice": "required", "max_tokens": 5}),
    ))
    .await;
    let choice = &body["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{body}");
    assert!(choice["message"].get("tool_calls").is_none());
    assert!(choice["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("<tool_call>"));
}

#[tokio::test]
async fn streamed_calls_arrive_as_tool_call_deltas() {
    let mut body = request(json!({"tool_choice": "required", "parallel_tool_calls": false}));
    let whole = chat(&body).await;
    body["stream"] = json!(true);
    let response = reqwest::Client::new()
        .post(server().url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut deltas = Vec::new();
    let mut finish = None;
    for event in SseReader::new(response).collect().await {
        if event == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&event).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(calls) = choice["delta"]["tool_calls"].as_array() {
            deltas.extend(calls.iter().cloned());
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = Some(reason.to_string());
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(deltas.len(), 1, "{deltas:?}");
    assert_eq!(deltas[0]["index"], 0);
    let streamed = calls(&json!({"tool_calls": deltas}));
    assert_eq!(streamed, calls(&whole["choices"][0]["message"]));
}

#[tokio::test]
async fn a_conversation_carries_calls_and_results() {
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]);
    let body = chat(&request(json!({"messages": messages, "max_tokens": 24}))).await;
    let choice = &body["choices"][0];
    assert!(
        ["stop", "length", "tool_calls"].contains(&choice["finish_reason"].as_str().unwrap()),
        "{body}"
    );
    // The prompt holds the call and the result: it is longer than without them.
    let short = chat(&request(json!({"max_tokens": 1}))).await;
    assert!(
        body["usage"]["prompt_tokens"].as_u64().unwrap()
            > short["usage"]["prompt_tokens"].as_u64().unwrap() + 20
    );

    let bad = [
        (
            json!([{"role": "tool", "content": "18"}]),
            "messages[0].tool_call_id",
        ),
        (
            json!([{"role": "user", "content": "x", "tool_calls": []}]),
            "messages[0].tool_calls",
        ),
        (
            json!([{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{"}}]}]),
            "messages[0].tool_calls",
        ),
    ];
    for (messages, param) in bad {
        let (status, body) = post_json(
            &reqwest::Client::new(),
            &server().url("/v1/chat/completions"),
            &request(json!({ "messages": messages })),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/v1/chat/completions"),
        &request(json!({"tool_choice": "required", "response_format": {"type": "json_object"}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "tool_choice");
}
