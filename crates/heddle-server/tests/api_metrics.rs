//! Every request's ending is counted once — finished, abandoned by its client while
//! running or waiting, or displaced from a full queue — and every counted ending has its
//! end-to-end latency, so the counters add up however requests end.

mod api_support;

use std::time::Duration;

use api_support::{eventually, model, start, test_config, SseReader, TestServer};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";
const REASONS: [&str; 4] = ["stop", "length", "cancelled", "error"];

fn completion(priority: &str, max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "Write about looms:", "max_tokens": max_tokens,
           "ignore_eos": true, "stream": stream, "priority": priority, "temperature": 0})
}

fn finished(metrics: &api_support::Metrics, reason: &str) -> f64 {
    metrics
        .value(
            "heddle_sequences_finished_total",
            &format!("model=\"{MODEL}\",reason=\"{reason}\""),
        )
        .unwrap_or(0.0)
}

/// Posts with a client that gives up after `patience`; true if it gave up.
async fn impatient_post(server: &TestServer, body: Value, patience: Duration) -> bool {
    let client = reqwest::Client::builder()
        .timeout(patience)
        .build()
        .unwrap();
    client
        .post(server.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .is_err()
}

#[tokio::test]
async fn every_ending_is_counted_once_whoever_ended_it() {
    let mut config = test_config(vec![model(MODEL)]);
    config.scheduler.max_running = 2;
    config.scheduler.queue_capacity = Some(2);
    let server = start(config).await;

    // One request that finishes normally.
    let (status, _) = api_support::post_json(
        &server.http,
        &server.url("/v1/completions"),
        &completion("normal", 4, false),
    )
    .await;
    assert_eq!(status, 200);

    // Two streams take both seats, then their clients leave mid-generation.
    let mut running = Vec::new();
    for _ in 0..2 {
        let response = reqwest::Client::new()
            .post(server.url("/v1/completions"))
            .json(&completion("normal", 1500, true))
            .send()
            .await
            .unwrap();
        let mut reader = SseReader::new(response);
        reader.next_data().await.expect("a first chunk");
        running.push(reader);
    }
    // Two LOW requests fill the queue; a NORMAL one displaces one of them (429); the other
    // LOW client and the NORMAL one leave while waiting (NORMAL is not more urgent than
    // the running streams, so it never takes a seat).
    let low: Vec<_> = (0..2)
        .map(|_| {
            let http = server.http.clone();
            let url = server.url("/v1/completions");
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .json(&completion("low", 1500, false))
                    .timeout(Duration::from_millis(1500))
                    .send()
                    .await;
                response.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(5), || async {
            server
                .metrics()
                .await
                .value(
                    "heddle_queue_depth",
                    &format!("model=\"{MODEL}\",priority=\"low\""),
                )
                .is_some_and(|waiting| waiting == 2.0)
        })
        .await
    );
    assert!(
        impatient_post(
            &server,
            completion("normal", 1500, false),
            Duration::from_millis(500)
        )
        .await
    );
    let statuses: Vec<u16> = futures_util::future::join_all(low)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        statuses.contains(&429),
        "one LOW request displaced: {statuses:?}"
    );
    drop(running);

    // 1 finished + 2 abandoned streams + 2 LOW (displaced, abandoned) + 1 NORMAL abandoned.
    let expected = 6.0;
    let counted = eventually(Duration::from_secs(10), || async {
        let metrics = server.metrics().await;
        REASONS.iter().map(|r| finished(&metrics, r)).sum::<f64>() == expected
            && metrics.model_value("heddle_running_sequences", MODEL) == 0.0
    })
    .await;
    let metrics = server.metrics().await;
    assert!(counted, "endings:\n{}", metrics.0);
    assert_eq!(finished(&metrics, "length"), 1.0);
    assert_eq!(finished(&metrics, "cancelled"), 5.0);
    assert_eq!(
        metrics.model_value("heddle_end_to_end_latency_seconds_count", MODEL),
        expected
    );
    // Only the finished request and the two streams produced tokens.
    assert_eq!(
        metrics.model_value("heddle_time_to_first_token_seconds_count", MODEL),
        3.0
    );
    assert_eq!(metrics.model_value("heddle_kv_blocks_used", MODEL), 0.0);
    // Every step that ran the model is timed, in the runner and as a whole (the engine
    // may be between the two at the moment of reading).
    let steps = metrics.model_value("heddle_engine_step_seconds_count", MODEL);
    let model_steps = metrics.model_value("heddle_model_step_seconds_count", MODEL);
    assert!(steps >= 1.0, "{}", metrics.0);
    assert!(
        (0.0..=1.0).contains(&(model_steps - steps)),
        "{}",
        metrics.0
    );
    server.server.shutdown().await.unwrap();
}
