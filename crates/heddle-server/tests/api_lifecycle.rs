//! Lifecycle end to end: disconnecting clients, priorities under saturation, the model
//! pool (several models, single loads, LRU eviction, pinning) and graceful shutdown.

mod api_support;

use std::time::{Duration, Instant};

use api_support::{
    assert_error, eventually, model, model_path, post_json, start, test_config, SseReader,
    TestServer, ADMIN_KEY,
};
use heddle_server::pool::estimate_memory;
use serde_json::{json, Value};

const MODEL: &str = "smollm2";

fn streaming_completion(priority: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": "Write about looms:", "max_tokens": max_tokens,
           "ignore_eos": true, "stream": true, "priority": priority, "temperature": 0})
}

/// Reads SSE payloads until one carries generated text.
async fn until_first_text(reader: &mut SseReader) {
    while let Some(data) = reader.next_data().await {
        let chunk: Value = serde_json::from_str(&data).unwrap_or_default();
        if chunk["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
        {
            return;
        }
    }
    panic!("the stream ended before any text");
}

async fn open_stream(server: &TestServer, body: &Value) -> SseReader {
    // A client per stream: its connection closes when the reader is dropped.
    let response = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    SseReader::new(response)
}

#[tokio::test]
async fn clients_that_leave_free_their_seats_and_blocks() {
    let mut config = test_config(vec![model(MODEL)]);
    config.scheduler.max_running = 2;
    let server = start(config).await;
    // Long enough that nothing finishes on its own during the test.
    let long = 1500;
    let mut running = Vec::new();
    for _ in 0..2 {
        let mut reader = open_stream(&server, &streaming_completion("normal", long)).await;
        until_first_text(&mut reader).await;
        running.push(reader);
    }
    let waiting_stream = open_stream(&server, &streaming_completion("normal", long)).await;
    let impatient = (0..2).map(|_| {
        let url = server.url("/v1/completions");
        tokio::spawn(async move {
            let body = json!({"model": MODEL, "prompt": "Hello", "max_tokens": long,
                              "ignore_eos": true});
            let client = reqwest::Client::builder()
                .timeout(Duration::from_millis(400))
                .build()
                .unwrap();
            client.post(url).json(&body).send().await.is_err()
        })
    });
    let impatient: Vec<_> = impatient.collect();

    let saturated = eventually(Duration::from_secs(5), || async {
        let metrics = server.metrics().await;
        metrics.model_value("heddle_running_sequences", MODEL) == 2.0
            && metrics.value(
                "heddle_queue_depth",
                &format!("model=\"{MODEL}\",priority=\"normal\""),
            ) == Some(3.0)
    })
    .await;
    assert!(
        saturated,
        "two running and three waiting:\n{}",
        server.metrics().await.0
    );
    assert!(
        server
            .metrics()
            .await
            .model_value("heddle_kv_blocks_used", MODEL)
            > 0.0
    );

    for gave_up in impatient {
        assert!(gave_up.await.unwrap(), "the impatient client timed out");
    }
    drop(running);
    drop(waiting_stream);
    let drained = eventually(Duration::from_secs(5), || async {
        let metrics = server.metrics().await;
        let waiting: f64 = ["high", "normal", "low"]
            .iter()
            .filter_map(|p| {
                metrics.value(
                    "heddle_queue_depth",
                    &format!("model=\"{MODEL}\",priority=\"{p}\""),
                )
            })
            .sum();
        metrics.model_value("heddle_kv_blocks_used", MODEL) == 0.0
            && metrics.model_value("heddle_running_sequences", MODEL) == 0.0
            && waiting == 0.0
    })
    .await;
    assert!(drained, "left behind:\n{}", server.metrics().await.0);
    server.server.shutdown().await.unwrap();
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    (values[mid - 1] + values[mid]) / 2.0
}

#[tokio::test]
async fn high_priority_overtakes_low_and_low_still_finishes() {
    let mut config = test_config(vec![model(MODEL)]);
    config.scheduler.max_running = 2;
    let server = start(config).await;
    let run = |priority: &'static str, delay: Duration| {
        let url = server.url("/v1/completions");
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let sent = Instant::now();
            let response = reqwest::Client::new()
                .post(url)
                .json(&streaming_completion(priority, 12))
                .send()
                .await
                .unwrap();
            let mut reader = SseReader::new(response);
            until_first_text(&mut reader).await;
            let ttft = sent.elapsed().as_secs_f64();
            let rest = reader.collect().await;
            let finish: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
            (ttft, finish["choices"][0]["finish_reason"].clone())
        })
    };
    // LOW requests saturate the seats first; HIGH ones arrive while LOW ones wait.
    let low: Vec<_> = (0..6).map(|_| run("low", Duration::ZERO)).collect();
    let high: Vec<_> = (0..6)
        .map(|_| run("high", Duration::from_millis(300)))
        .collect();
    let mut low_ttft = Vec::new();
    for task in low {
        let (ttft, finish) = task.await.unwrap();
        assert_eq!(finish, "length", "every LOW request completes");
        low_ttft.push(ttft);
    }
    let mut high_ttft = Vec::new();
    for task in high {
        let (ttft, finish) = task.await.unwrap();
        assert_eq!(finish, "length");
        high_ttft.push(ttft);
    }
    let (high_median, low_median) = (median(&mut high_ttft), median(&mut low_ttft));
    assert!(
        high_median < low_median,
        "HIGH median TTFT {high_median:.3}s should be below LOW's {low_median:.3}s \
         (high {high_ttft:?}, low {low_ttft:?})"
    );
    server.server.shutdown().await.unwrap();
}

async fn admin_models(server: &TestServer) -> Vec<Value> {
    let list: Value = server
        .http
        .get(server.url("/admin/models"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"].as_array().unwrap().clone()
}

async fn loaded_ids(server: &TestServer) -> Vec<String> {
    admin_models(server)
        .await
        .iter()
        .filter(|m| m["loaded"] == true)
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

async fn chat_with(server: &TestServer, model: &str) -> (reqwest::StatusCode, Value) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Hi"}],
                      "max_tokens": 2});
    post_json(&server.http, &server.url("/v1/chat/completions"), &body).await
}

#[tokio::test]
async fn two_models_serve_at_once_and_first_requests_share_one_load() {
    let server = start(test_config(vec![model("left"), model("right")])).await;
    assert!(loaded_ids(&server).await.is_empty(), "nothing is pinned");
    // Concurrent first requests for each model.
    let requests =
        ["left", "right", "left", "right", "left", "right"].map(|id| chat_with(&server, id));
    for (status, body) in futures_util::future::join_all(requests).await {
        assert_eq!(status, 200, "{body}");
    }
    let models = admin_models(&server).await;
    for model in &models {
        assert_eq!(model["loaded"], true, "{model}");
        assert_eq!(
            model["loads"], 1,
            "one load for concurrent first requests: {model}"
        );
    }
    let metrics = server.metrics().await;
    for id in ["left", "right"] {
        assert_eq!(metrics.model_value("heddle_model_loaded", id), 1.0);
    }

    let unloaded: Value = server
        .http
        .post(server.url("/admin/models/left/unload"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(unloaded["unloaded"], true);
    assert_eq!(loaded_ids(&server).await, ["right"]);
    let loaded = server
        .http
        .post(server.url("/admin/models/left/load"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(loaded.status(), 200);
    let mut ids = loaded_ids(&server).await;
    ids.sort();
    assert_eq!(ids, ["left", "right"]);
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_least_recently_used_model_is_evicted_and_pinned_ones_never() {
    let mut config = test_config(vec![model("a"), model("b"), model("c")]);
    let one_model = estimate_memory(&model_path(), &config.scheduler).unwrap();
    config.memory_budget = Some(one_model * 5 / 2);
    let server = start(config).await;

    for id in ["a", "b"] {
        assert_eq!(chat_with(&server, id).await.0, 200);
    }
    let mut ids = loaded_ids(&server).await;
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(chat_with(&server, "c").await.0, 200);
    let mut ids = loaded_ids(&server).await;
    ids.sort();
    assert_eq!(ids, ["b", "c"], "a was least recently used");
    assert_eq!(chat_with(&server, "b").await.0, 200);
    assert_eq!(chat_with(&server, "a").await.0, 200);
    let mut ids = loaded_ids(&server).await;
    ids.sort();
    assert_eq!(ids, ["a", "b"], "c was least recently used");
    server.server.shutdown().await.unwrap();

    let mut pinned = model("pinned");
    pinned.pinned = true;
    let mut config = test_config(vec![pinned, model("other")]);
    config.memory_budget = Some(one_model * 3 / 2);
    let server = start(config).await;
    assert_eq!(
        loaded_ids(&server).await,
        ["pinned"],
        "pinned models load at start"
    );
    let (status, error) = chat_with(&server, "other").await;
    assert_error(status, &error, 503, "server_error");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("pinned"),
        "{error}"
    );
    assert_eq!(chat_with(&server, "pinned").await.0, 200);
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_running_requests_finish_within_the_grace_period() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let mut reader = open_stream(&server, &streaming_completion("normal", 24)).await;
    until_first_text(&mut reader).await;
    server.server.begin_shutdown();
    let rest = reader.collect().await;
    assert_eq!(rest.last().unwrap(), "[DONE]");
    let finish: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    let addr = server.server.local_addr();
    tokio::time::timeout(Duration::from_secs(10), server.server.shutdown())
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(
        reqwest::get(format!("http://{addr}/health")).await.is_err(),
        "the port is closed"
    );
}

#[tokio::test]
async fn shutdown_cancels_what_outlasts_the_grace_period() {
    let mut config = test_config(vec![model(MODEL)]);
    config.shutdown_grace = Duration::from_millis(300);
    let server = start(config).await;
    let mut reader = open_stream(&server, &streaming_completion("normal", 1500)).await;
    until_first_text(&mut reader).await;
    let started = Instant::now();
    let shutdown = tokio::spawn(server.server.shutdown());
    let rest = tokio::time::timeout(Duration::from_secs(10), reader.collect())
        .await
        .expect("the stream ends after the grace period");
    assert_eq!(rest.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&rest[rest.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], "shutting_down", "{error}");
    tokio::time::timeout(Duration::from_secs(10), shutdown)
        .await
        .expect("shutdown completes")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(8));
}
