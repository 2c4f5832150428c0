//! Engine failures end to end, with faults armed in the real server's engines (see
//! `heddle_server::faults`): a failed step fails its requests and leaves nothing in the
//! prefix cache that was never computed; a panic fails every live request, streams get an
//! error event then `[DONE]`, `/ready` and the metrics show the restart, and the model then
//! answers exactly as a fresh server does.

mod api_support;

use std::time::Duration;

use api_support::{
    assert_error, eventually, get_json, model, post_json, start, test_config, SseReader, TestServer,
};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";

/// A prompt of several KV blocks (16 tokens each in the test configuration).
const LONG_PROMPT: &str = "The weaver sat at the loom before dawn, threading the warp through \
    the heddles one by one, counting each thread twice, because a single mistake in the warp \
    shows in every row of cloth that follows it. Outside, the river ran high with the spring \
    melt, and the mill wheel turned. She lifted the shed, passed the shuttle, and";

fn greedy(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
           "ignore_eos": true})
}

/// Starts `body` as a stream and checks that it started.
async fn open_stream(server: &TestServer, mut body: Value) -> SseReader {
    body["stream"] = json!(true);
    let response = server
        .http
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    SseReader::new(response)
}

async fn completion_text(http: &reqwest::Client, base: &str, body: &Value) -> String {
    let (status, reply) = post_json(http, &format!("{base}/v1/completions"), body).await;
    assert_eq!(status, 200, "{reply}");
    reply["choices"][0]["text"].as_str().unwrap().to_string()
}

/// The same completion on a server that never failed.
async fn fresh_server_text(body: &Value) -> String {
    let fresh = start(test_config(vec![model(MODEL)])).await;
    let text = completion_text(&fresh.http, &fresh.base, body).await;
    fresh.server.shutdown().await.unwrap();
    text
}

#[tokio::test]
async fn a_failed_step_fails_its_requests_and_never_poisons_the_prefix_cache() {
    let server = start(test_config(vec![model(MODEL)])).await;
    // Loads the model, so that the armed fault hits the prompt's own prefill.
    completion_text(&server.http, &server.base, &greedy("Hello", 2)).await;
    let body = greedy(LONG_PROMPT, 12);

    server.server.pool().faults().fail_next_steps(1);
    let (status, reply) = post_json(&server.http, &server.url("/v1/completions"), &body).await;
    assert_error(status, &reply, 500, "server_error");

    // A stream whose step fails ends with an error event, then [DONE].
    server.server.pool().faults().fail_next_steps(1);
    let streamed = greedy(&format!("{LONG_PROMPT} Then"), 12);
    let events = open_stream(&server, streamed).await.collect().await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["type"], "server_error", "{events:?}");

    // The same prompt again: nothing of the failed prefill may be reused.
    let after_failure = completion_text(&server.http, &server.base, &body).await;
    let metrics = server.metrics().await;
    assert_eq!(
        metrics.value(
            "heddle_sequences_finished_total",
            &format!("model=\"{MODEL}\",reason=\"error\"")
        ),
        Some(2.0)
    );
    assert_eq!(metrics.model_value("heddle_kv_blocks_used", MODEL), 0.0);
    server.server.shutdown().await.unwrap();

    assert_eq!(after_failure, fresh_server_text(&body).await);
}

#[tokio::test]
async fn a_panicking_engine_fails_its_requests_restarts_and_answers_as_before() {
    let mut spec = model(MODEL);
    spec.pinned = true;
    let mut config = test_config(vec![spec]);
    config.scheduler.max_running = 3;
    let server = start(config).await;
    let body = greedy(LONG_PROMPT, 12);
    let before = completion_text(&server.http, &server.base, &body).await;
    let faults = server.server.pool().faults().clone();

    // Two streams and one plain request in flight when the engine panics.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut reader = open_stream(&server, greedy("Write about looms:", 1500)).await;
        reader.next_data().await.expect("a first chunk");
        streams.push(reader);
    }
    let plain = {
        let (http, url) = (server.http.clone(), server.url("/v1/completions"));
        tokio::spawn(
            async move { post_json(&http, &url, &greedy("Tell me of rivers.", 1500)).await },
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            server
                .metrics()
                .await
                .model_value("heddle_running_sequences", MODEL)
                == 3.0
        })
        .await
    );
    // One more waits for a seat: it has produced nothing, so it survives the panic.
    let queued = {
        let (http, base, body) = (server.http.clone(), server.base.clone(), body.clone());
        tokio::spawn(async move { completion_text(&http, &base, &body).await })
    };
    assert!(
        eventually(Duration::from_secs(10), || async {
            server.metrics().await.value(
                "heddle_queue_depth",
                &format!("model=\"{MODEL}\",priority=\"normal\""),
            ) == Some(1.0)
        })
        .await
    );

    faults.hold_restarts(true);
    faults.panic_next_step();
    for reader in streams {
        let events = reader.collect().await;
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{events:?}"
        );
        let error: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(error["error"]["type"], "server_error", "{events:?}");
    }
    let (status, reply) = plain.await.unwrap();
    assert_error(status, &reply, 500, "server_error");

    // While it restarts, /ready and the metrics say so; a request sent now waits for it.
    let (status, reply) = get_json(&server.http, &server.url("/ready")).await;
    assert_error(status, &reply, 503, "server_error");
    assert_eq!(reply["error"]["code"], "model_not_serving");
    let metrics = server.metrics().await;
    assert_eq!(metrics.model_value("heddle_engine_up", MODEL), 0.0);
    assert_eq!(
        metrics.model_value("heddle_engine_restarts_total", MODEL),
        1.0
    );
    let waiting = {
        let (http, base, body) = (server.http.clone(), server.base.clone(), body.clone());
        tokio::spawn(async move { completion_text(&http, &base, &body).await })
    };
    faults.hold_restarts(false);

    assert_eq!(waiting.await.unwrap(), before);
    assert_eq!(queued.await.unwrap(), before);
    let (status, _) = get_json(&server.http, &server.url("/ready")).await;
    assert_eq!(status, 200);
    let metrics = server.metrics().await;
    assert_eq!(metrics.model_value("heddle_engine_up", MODEL), 1.0);
    assert_eq!(
        metrics.value(
            "heddle_sequences_finished_total",
            &format!("model=\"{MODEL}\",reason=\"error\"")
        ),
        Some(3.0)
    );
    assert_eq!(
        completion_text(&server.http, &server.base, &body).await,
        before
    );
    server.server.shutdown().await.unwrap();
}
