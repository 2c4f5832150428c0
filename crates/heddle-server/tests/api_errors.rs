//! Every error class, checked by status and OpenAI-format body, against the real server.

mod api_support;

use std::sync::OnceLock;
use std::time::Duration;

use api_support::{
    assert_error, eventually, model, post_json, shared_server, start, test_config, SharedServer,
};
use heddle_core::Priority;
use heddle_server::api::auth::{ApiKey, KeyTier};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";
const ADMIN_KEY: &str = "sk-admin";
const LOW_KEY: &str = "sk-low";
const BODY_LIMIT: usize = 16 * 1024;

/// A server with an admin key, an API key and a small body limit.
fn server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    shared_server(&SERVER, || {
        let mut config = test_config(vec![model(MODEL)]);
        config.max_body_bytes = BODY_LIMIT;
        config.admin_api_keys = vec![ADMIN_KEY.into()];
        config.api_keys = vec![ApiKey {
            key: LOW_KEY.into(),
            tier: KeyTier::at(Priority::Low),
        }];
        config
    })
}

async fn send(
    path: &str,
    key: Option<&str>,
    body: reqwest::Body,
    content_type: Option<&str>,
) -> (reqwest::StatusCode, Value) {
    let mut request = reqwest::Client::new().post(server().url(path)).body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.expect("answered");
    let status = response.status();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, body)
}

async fn chat_as(key: &str, body: Value) -> (reqwest::StatusCode, Value) {
    send(
        "/v1/chat/completions",
        Some(key),
        body.to_string().into(),
        Some("application/json"),
    )
    .await
}

/// The status of a GET of `path`, with `key` as bearer token when given.
async fn get_status(path: &str, key: Option<&str>) -> reqwest::StatusCode {
    let request = reqwest::Client::new().get(server().url(path));
    let request = match key {
        Some(key) => request.bearer_auth(key),
        None => request,
    };
    request.send().await.unwrap().status()
}

fn valid_chat() -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
}

fn with(field: &str, value: Value) -> Value {
    let mut body = valid_chat();
    body[field] = value;
    body
}

#[tokio::test]
async fn malformed_bodies_are_400_whatever_the_content_type() {
    for (body, content_type) in [
        ("{not json", Some("application/json")),
        ("", Some("application/json")),
        ("[1, 2]", Some("application/json")),
        (
            r#"{"model": "smollm2", "messages": "hi"}"#,
            Some("application/json"),
        ),
        (
            r#"{"model": "smollm2", "messages": [{"content": "no role"}]}"#,
            None,
        ),
        (
            r#"{"model": "smollm2", "temperature": "hot", "messages": []}"#,
            Some("text/plain"),
        ),
    ] {
        let (status, error) = send(
            "/v1/chat/completions",
            Some(ADMIN_KEY),
            body.to_string().into(),
            content_type,
        )
        .await;
        assert_error(status, &error, 400, "invalid_request_error");
    }
    // A valid body needs no JSON content type either (curl -d sends a form type).
    let (status, body) = send(
        "/v1/chat/completions",
        Some(ADMIN_KEY),
        valid_chat().to_string().into(),
        Some("application/x-www-form-urlencoded"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn values_of_the_wrong_type_are_400_naming_their_place() {
    let cases = [
        (with("temperature", json!("hot")), "temperature"),
        (with("max_tokens", json!(1.5)), "max_tokens"),
        (with("stream", json!("yes")), "stream"),
        (
            with("messages", json!([{"role": "user", "content": 7}])),
            "messages[0].content",
        ),
        (
            with("messages", json!([{"content": "no role"}])),
            "messages[0]",
        ),
    ];
    for (body, param) in cases {
        let (status, error) = chat_as(ADMIN_KEY, body.clone()).await;
        assert_error(status, &error, 400, "invalid_request_error");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
    }
    // Not JSON at all, or trailing characters after it: no field to name.
    for body in ["{not json", "{} {}"] {
        let (status, error) = send(
            "/v1/chat/completions",
            Some(ADMIN_KEY),
            body.to_string().into(),
            Some("application/json"),
        )
        .await;
        assert_error(status, &error, 400, "invalid_request_error");
        assert_eq!(error["error"]["param"], Value::Null, "{body}: {error}");
    }
}

#[tokio::test]
async fn invalid_values_are_400_naming_the_field() {
    let cases = [
        (with("temperature", json!(-0.1)), "temperature"),
        (with("top_p", json!(0)), "top_p"),
        (with("top_p", json!(1.01)), "top_p"),
        (with("max_tokens", json!(0)), "max_tokens"),
        (with("max_completion_tokens", json!(-5)), "max_tokens"),
        (with("max_tokens", json!(100_000)), "max_tokens"),
        (with("n", json!(0)), "n"),
        (with("priority", json!("urgent")), "priority"),
        (with("messages", json!([])), "messages"),
        (with("stop", json!(vec!["a"; 17])), "stop"),
        (with("top_logprobs", json!(3)), "top_logprobs"),
        (with("model", Value::Null), "model"),
    ];
    for (body, param) in cases {
        let (status, error) = chat_as(ADMIN_KEY, body.clone()).await;
        assert_error(status, &error, 400, "invalid_request_error");
        assert_eq!(error["error"]["param"], param, "{body}");
    }
    let (status, error) = chat_as(ADMIN_KEY, with("max_tokens", json!(100_000))).await;
    assert_error(status, &error, 400, "invalid_request_error");
    assert_eq!(error["error"]["code"], "context_length_exceeded");

    let long_prompt = "word ".repeat(2100);
    let (status, error) = send(
        "/v1/completions",
        Some(ADMIN_KEY),
        json!({"model": MODEL, "prompt": long_prompt})
            .to_string()
            .into(),
        None,
    )
    .await;
    assert_error(status, &error, 400, "invalid_request_error");
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    let (status, error) = send(
        "/v1/completions",
        Some(ADMIN_KEY),
        json!({"model": MODEL, "prompt": ["a", "b", "c"], "n": 50})
            .to_string()
            .into(),
        None,
    )
    .await;
    assert_error(status, &error, 400, "invalid_request_error");
    assert_eq!(error["error"]["param"], "n");
    for prompt in [json!([]), json!([49152]), json!({"text": "x"}), json!("")] {
        let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 1});
        let (status, error) = send(
            "/v1/completions",
            Some(ADMIN_KEY),
            body.to_string().into(),
            None,
        )
        .await;
        assert_error(status, &error, 400, "invalid_request_error");
        assert_eq!(error["error"]["param"], "prompt", "{prompt}");
    }
}

#[tokio::test]
async fn missing_or_wrong_keys_are_401() {
    let body = valid_chat().to_string();
    for key in [None, Some("sk-wrong")] {
        let (status, error) = send("/v1/chat/completions", key, body.clone().into(), None).await;
        assert_error(status, &error, 401, "authentication_error");
        assert_eq!(error["error"]["code"], "invalid_api_key");
    }
    assert_eq!(get_status("/v1/models", None).await, 401);
    // Probes stay open.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(get_status(path, None).await, 200, "{path}");
    }
}

#[tokio::test]
async fn a_key_may_not_exceed_its_tier() {
    let (status, error) = chat_as(LOW_KEY, with("priority", json!("high"))).await;
    assert_error(status, &error, 403, "permission_error");
    assert_eq!(error["error"]["param"], "priority");
    let (status, body) = chat_as(LOW_KEY, valid_chat()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get_status("/admin/models", Some(LOW_KEY)).await, 403);
    assert_eq!(get_status("/admin/models", Some(ADMIN_KEY)).await, 200);
}

#[tokio::test]
async fn unknown_models_and_routes_are_404() {
    let (status, error) = chat_as(ADMIN_KEY, with("model", json!("gpt-17"))).await;
    assert_error(status, &error, 404, "invalid_request_error");
    assert_eq!(error["error"]["code"], "model_not_found");
    let (status, error) = send("/v1/nothing", Some(ADMIN_KEY), "{}".into(), None).await;
    assert_error(status, &error, 404, "invalid_request_error");
    assert_eq!(get_status("/v1/models/gpt-17", Some(ADMIN_KEY)).await, 404);
    assert_eq!(
        get_status("/v1/chat/completions", Some(ADMIN_KEY)).await,
        405
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let big = json!({"model": MODEL, "prompt": "x".repeat(BODY_LIMIT * 2)}).to_string();
    let (status, error) = send("/v1/completions", Some(ADMIN_KEY), big.into(), None).await;
    assert_error(status, &error, 413, "invalid_request_error");
}

#[tokio::test]
async fn a_burst_beyond_the_queue_gets_429s_and_loses_no_request() {
    let mut config = test_config(vec![model(MODEL)]);
    config.scheduler.max_running = 2;
    config.scheduler.queue_capacity = Some(3);
    let server = start(config).await;
    let burst = 16;
    let requests = (0..burst).map(|i| {
        let (http, url) = (server.http.clone(), server.url("/v1/completions"));
        async move {
            let body = json!({"model": MODEL, "prompt": format!("Count to {i}:"),
                              "max_tokens": 6, "ignore_eos": true});
            let response = http.post(url).json(&body).send().await.unwrap();
            let status = response.status();
            let retry_after = response.headers().get("retry-after").cloned();
            let body: Value = response.json().await.unwrap();
            (status, retry_after, body)
        }
    });
    let answers = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join_all(requests),
    )
    .await
    .expect("no request is stuck");
    let mut refused = 0;
    for (status, retry_after, body) in &answers {
        match status.as_u16() {
            200 => assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}"),
            429 => {
                refused += 1;
                assert_error(*status, body, 429, "rate_limit_error");
                assert!(retry_after.is_some(), "429 without Retry-After");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(refused > 0, "the burst should overflow a queue of 3");
    assert!(refused < burst, "some requests are served");
    let metrics = server.metrics().await;
    assert_eq!(
        metrics.model_value("heddle_requests_rejected_total", MODEL),
        refused as f64
    );
    let idle = eventually(Duration::from_secs(5), || async {
        let metrics = server.metrics().await;
        metrics.model_value("heddle_kv_blocks_used", MODEL) == 0.0
            && metrics.model_value("heddle_running_sequences", MODEL) == 0.0
    })
    .await;
    assert!(idle, "blocks or seats still in use after the burst");
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_model_that_does_not_fit_the_budget_is_503() {
    let mut config = test_config(vec![model(MODEL)]);
    config.memory_budget = Some(1024 * 1024);
    let server = start(config).await;
    let (status, error) = post_json(
        &server.http,
        &server.url("/v1/chat/completions"),
        &valid_chat(),
    )
    .await;
    assert_error(status, &error, 503, "server_error");
    assert_eq!(error["error"]["code"], "insufficient_memory");
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn requests_during_shutdown_are_503() {
    let server = start(test_config(vec![model(MODEL)])).await;
    server.server.pool().begin_shutdown();
    let (status, error) = post_json(
        &server.http,
        &server.url("/v1/chat/completions"),
        &valid_chat(),
    )
    .await;
    assert_error(status, &error, 503, "server_error");
    assert_eq!(error["error"]["code"], "shutting_down");
    let ready = server.http.get(server.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    server.server.shutdown().await.unwrap();
}
