//! The OpenAI endpoints end to end: the real server on a loopback port with the embedded
//! model, through a real HTTP client.

mod api_support;

use std::sync::OnceLock;

use api_support::{
    fetch_metrics, get_json, model, model_path, post_json, shared_server, test_config,
    SharedServer, SseReader,
};
use heddle_model::chat_template::ChatMessage;
use heddle_model::tokenizer::TokenizerBundle;
use serde_json::{json, Value};

const MODEL: &str = "smollm2";

fn server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    shared_server(&SERVER, || test_config(vec![model(MODEL)]))
}

fn text_side() -> &'static TokenizerBundle {
    static TEXT: OnceLock<TokenizerBundle> = OnceLock::new();
    TEXT.get_or_init(|| TokenizerBundle::from_gguf_file(model_path()).expect("the tokenizer"))
}

/// Prompt tokens of a one-user-message chat, computed here independently of the server.
fn chat_prompt_tokens(user: &str) -> usize {
    let text = text_side()
        .chat_template
        .render(&[ChatMessage::new("user", user)], true)
        .unwrap();
    text_side().tokenizer.encode_prompt(&text).unwrap().len()
}

async fn chat(body: Value) -> (reqwest::StatusCode, Value) {
    post_json(
        &reqwest::Client::new(),
        &server().url("/v1/chat/completions"),
        &body,
    )
    .await
}

async fn complete(body: Value) -> (reqwest::StatusCode, Value) {
    post_json(
        &reqwest::Client::new(),
        &server().url("/v1/completions"),
        &body,
    )
    .await
}

async fn stream(path: &str, body: Value) -> Vec<String> {
    let response = reqwest::Client::new()
        .post(server().url(path))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    SseReader::new(response).collect().await
}

fn chunks(events: &[String]) -> Vec<Value> {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

#[tokio::test]
async fn chat_answers_in_openai_shape_with_true_usage() {
    let user = "Tell me a long story about a dragon.";
    let (status, body) = chat(json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": user}],
        "max_tokens": 6,
        "temperature": 0,
        "user": "reader-1"
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], MODEL);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert!(choice["logprobs"].is_null());
    assert_eq!(choice["finish_reason"], "length");
    let usage = &body["usage"];
    assert_eq!(usage["prompt_tokens"], chat_prompt_tokens(user));
    assert_eq!(usage["completion_tokens"], 6);
    assert_eq!(usage["total_tokens"], chat_prompt_tokens(user) + 6);
    assert!(usage["prompt_tokens_details"]["cached_tokens"].is_u64());
}

#[tokio::test]
async fn chat_streams_role_content_finish_usage_and_done() {
    let events = stream(
        "/v1/chat/completions",
        json!({
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Name three colors."}]}
            ],
            "max_completion_tokens": 5,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true}
        }),
    )
    .await;
    let chunks = chunks(&events);
    let first = &chunks[0];
    assert!(first["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let ids: Vec<&Value> = chunks.iter().map(|c| &c["id"]).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "one id per stream");

    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 5);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let content: String = chunks[1..chunks.len() - 2]
        .iter()
        .map(|c| {
            assert!(c["choices"][0]["finish_reason"].is_null());
            assert!(c.get("usage").is_none());
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!content.is_empty());
}

#[tokio::test]
async fn completions_take_every_prompt_shape_and_n() {
    let token_ids: Vec<u32> = text_side()
        .tokenizer
        .encode_prompt("The capital of France is")
        .unwrap();
    let (status, body) = complete(json!({
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": 3, "temperature": 0
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert!(body["choices"][0]["text"].is_string());

    let (status, body) = complete(json!({
        "model": MODEL, "prompt": token_ids, "max_tokens": 2, "temperature": 0
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], token_ids.len());
    assert_eq!(body["usage"]["completion_tokens"], 2);

    let (status, body) = complete(json!({
        "model": MODEL, "prompt": [token_ids, [1, 2, 3]], "max_tokens": 2, "n": 2,
        "temperature": 0.8, "seed": 7
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    let indices: Vec<u64> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2, 3]);
    assert_eq!(body["usage"]["prompt_tokens"], token_ids.len() + 3);
    assert_eq!(body["usage"]["completion_tokens"], 8);

    let (status, body) = complete(json!({
        "model": MODEL, "prompt": ["Hello", "Goodbye"], "max_tokens": 1
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn completions_stream_text_then_finish() {
    let events = stream(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "1, 2, 3, 4,", "max_tokens": 4, "temperature": 0,
               "stream": true}),
    )
    .await;
    let chunks = chunks(&events);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["choices"][0]["text"], "");
    let text: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert!(!text.is_empty());
}

#[tokio::test]
async fn stop_strings_end_the_output_before_them() {
    let request = |stop: Value| {
        json!({"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 12,
               "temperature": 0, "stop": stop})
    };
    let (_, free) = complete(request(Value::Null)).await;
    let free_text = free["choices"][0]["text"].as_str().unwrap().to_string();
    // The model counts on; stop at the third number it writes.
    let third = free_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .nth(2)
        .unwrap_or_else(|| panic!("a continuation with three items: {free_text:?}"))
        .to_string();
    let (status, stopped) = complete(request(json!([third, "never appears"]))).await;
    assert_eq!(status, 200, "{stopped}");
    let choice = &stopped["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    let text = choice["text"].as_str().unwrap();
    assert!(!text.contains(&third), "{text:?} contains {third:?}");
    assert!(free_text.starts_with(text), "{text:?} vs {free_text:?}");

    let events = stream(
        "/v1/completions",
        json!({"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 12,
               "temperature": 0, "stop": third, "stream": true}),
    )
    .await;
    let chunks = chunks(&events);
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn a_repeated_long_prompt_is_served_from_the_prefix_cache() {
    let long = "The loom weaves threads through heddles, one pass after another. ".repeat(12);
    let request = json!({"model": MODEL, "messages": [{"role": "user", "content": long}],
                         "max_tokens": 1});
    let (status, first) = chat(request.clone()).await;
    assert_eq!(status, 200, "{first}");
    let (_, second) = chat(request).await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 100, "{second}");
    assert!(cached > 0 && cached <= prompt, "{second}");
    let metrics = fetch_metrics(&reqwest::Client::new(), &server().base).await;
    let hits = metrics.model_value("heddle_prefix_cache_hit_tokens_total", MODEL);
    assert!(hits >= cached as f64, "{hits} hit tokens < {cached}");
}

#[tokio::test]
async fn logprobs_come_in_chat_and_completions_formats() {
    let (status, body) = chat(json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "temperature": 0
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(
        content.len() as u64,
        body["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for entry in content {
        assert!(entry["token"].is_string() && entry["bytes"].is_array());
        assert!(entry["logprob"].as_f64().unwrap() <= 0.0);
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 2);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], entry["token"]);
    }
    // The tokens' raw bytes join into the message, split characters included.
    if body["choices"][0]["finish_reason"] == "length" {
        let bytes: Vec<u8> = content
            .iter()
            .flat_map(|entry| entry["bytes"].as_array().unwrap().clone())
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        let message = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(String::from_utf8(bytes).unwrap(), message);
    }

    let (status, body) = complete(json!({
        "model": MODEL, "prompt": "The sky is", "max_tokens": 3, "logprobs": 1, "temperature": 0
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    let logprobs = &body["choices"][0]["logprobs"];
    let tokens = logprobs["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3);
    assert_eq!(logprobs["token_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(logprobs["text_offset"][0], 0);
    for top in logprobs["top_logprobs"].as_array().unwrap() {
        assert_eq!(top.as_object().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn n_choices_are_indexed_and_counted() {
    let (status, body) = chat(json!({
        "model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 3, "n": 3, "temperature": 1.0, "seed": 11, "priority": "high",
        "user": "someone"
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    let choices = body["choices"].as_array().unwrap();
    let indices: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    let generated: u64 = 3 * 3;
    assert_eq!(
        body["usage"]["completion_tokens"].as_u64().unwrap(),
        generated
    );
    assert_eq!(
        body["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        chat_prompt_tokens("Say something.")
    );
}

#[tokio::test]
async fn models_health_ready_and_metrics_answer() {
    let http = reqwest::Client::new();
    let list: Value = get_json(&http, &server().url("/v1/models")).await.1;
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], MODEL);
    assert_eq!(list["data"][0]["object"], "model");
    let card = http
        .get(server().url("/v1/models/smollm2"))
        .send()
        .await
        .unwrap();
    assert_eq!(card.status(), 200);
    let card: Value = card.json().await.unwrap();
    assert_eq!(card["owned_by"], "heddle");
    for path in ["/health", "/ready"] {
        assert_eq!(
            http.get(server().url(path)).send().await.unwrap().status(),
            200
        );
    }

    let (status, _) = chat(
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200);
    let metrics = fetch_metrics(&http, &server().base).await;
    for family in [
        "heddle_kv_blocks_total",
        "heddle_kv_blocks_used",
        "heddle_kv_blocks_cached",
        "heddle_running_sequences",
        "heddle_prefix_cache_hit_rate",
        "heddle_preemptions_total",
        "heddle_scheduler_refused_total",
        "heddle_prompt_tokens_total",
        "heddle_generation_tokens_total",
        "heddle_time_to_first_token_seconds_count",
        "heddle_inter_token_latency_seconds_count",
        "heddle_end_to_end_latency_seconds_count",
    ] {
        metrics.model_value(family, MODEL);
    }
    assert_eq!(metrics.model_value("heddle_kv_blocks_total", MODEL), 256.0);
    assert!(metrics.model_value("heddle_generation_tokens_total", MODEL) >= 2.0);
    assert!(metrics.model_value("heddle_end_to_end_latency_seconds_count", MODEL) >= 1.0);
    for priority in ["high", "normal", "low"] {
        let labels = format!("model=\"{MODEL}\",priority=\"{priority}\"");
        assert!(metrics.value("heddle_queue_depth", &labels).is_some());
    }
}
