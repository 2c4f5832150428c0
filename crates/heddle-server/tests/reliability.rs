//! Reliability under a rough crowd, on loopback and bounded in time and count: a few
//! hundred concurrent clients — streaming and not, mixed priorities, many of them leaving
//! early, a fifth of them sending bad input — while model steps fail and the engine panics
//! once. Afterwards the server answers, every accepted sequence ended exactly once, no KV
//! block is in use, the only 5xx are the injected failures', and a greedy request gives
//! the same output as on a fresh server.

mod api_support;

use std::time::{Duration, Instant};

use api_support::{eventually, model, post_json, start, test_config, Metrics, SseReader};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const MODEL: &str = "smollm2";
const CLIENTS: usize = 240;
const REASONS: [&str; 4] = ["stop", "length", "cancelled", "error"];
/// The message of a sequence failed by its engine (an injected step failure or panic).
const ENGINE_FAILURE: &str = "The model failed while generating";

/// What one client saw.
#[derive(Debug)]
enum Outcome {
    /// A complete answer (streams: a finish_reason then `[DONE]`).
    Answered,
    /// The client left on purpose.
    Left,
    /// An error the test expected, with its status.
    ExpectedError(u16),
    /// Anything else: the test fails with it.
    Wrong(String),
}

fn prompt(rng: &mut ChaCha8Rng) -> String {
    const WORDS: [&str; 12] = [
        "loom", "warp", "weft", "shuttle", "heddle", "river", "wool", "linen", "dye", "spindle",
        "cloth", "pattern",
    ];
    let words = rng.random_range(3..40);
    (0..words)
        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
        .collect::<Vec<_>>()
        .join(" ")
}

fn valid_body(rng: &mut ChaCha8Rng, stream: bool) -> Value {
    let priority = ["high", "normal", "low"][rng.random_range(0..3)];
    let temperature = if rng.random_bool(0.5) { 0.0 } else { 0.8 };
    if rng.random_bool(0.5) {
        json!({"model": MODEL, "prompt": prompt(rng), "max_tokens": rng.random_range(2..20),
               "stream": stream, "priority": priority, "temperature": temperature,
               "seed": rng.random_range(0..1000)})
    } else {
        json!({"model": MODEL, "messages": [{"role": "user", "content": prompt(rng)}],
               "max_tokens": rng.random_range(2..20), "stream": stream,
               "priority": priority, "temperature": temperature})
    }
}

/// A bad request and the status it must get.
fn bad_body(rng: &mut ChaCha8Rng) -> (String, u16) {
    let huge_prompt = "loom ".repeat(4000);
    let cases: [(String, u16); 7] = [
        ("{\"model\": ".to_string(), 400),
        (
            json!({"model": "no-such-model", "prompt": "hi"}).to_string(),
            404,
        ),
        (
            json!({"model": MODEL, "prompt": "hi", "max_tokens": -3}).to_string(),
            400,
        ),
        (
            json!({"model": MODEL, "prompt": "hi", "top_p": 0}).to_string(),
            400,
        ),
        (
            json!({"model": MODEL, "prompt": "hi", "priority": "urgent"}).to_string(),
            400,
        ),
        (
            json!({"model": MODEL, "prompt": huge_prompt}).to_string(),
            400,
        ),
        (
            json!({"model": MODEL, "prompt": [[1, 2, 999999999]]}).to_string(),
            400,
        ),
    ];
    cases[rng.random_range(0..cases.len())].clone()
}

fn endpoint(body: &Value) -> &'static str {
    if body.get("messages").is_some() {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    }
}

/// An error body the crowd may get by design: a full queue or displacement (429), or a
/// sequence its engine failed (500).
fn expected_error(status: u16, body: &Value) -> bool {
    let message = body["error"]["message"].as_str().unwrap_or_default();
    match status {
        429 => body["error"]["type"] == "rate_limit_error" || body["error"]["code"].is_string(),
        500 => message.starts_with(ENGINE_FAILURE),
        _ => false,
    }
}

async fn streaming_client(
    http: reqwest::Client,
    url: String,
    body: Value,
    leave_after: Option<usize>,
) -> Outcome {
    let response = match http.post(url).json(&body).send().await {
        Ok(response) => response,
        Err(error) => return Outcome::Wrong(format!("no answer: {error}")),
    };
    let status = response.status().as_u16();
    if status != 200 {
        let body: Value = response.json().await.unwrap_or_default();
        return if expected_error(status, &body) {
            Outcome::ExpectedError(status)
        } else {
            Outcome::Wrong(format!("{status}: {body}"))
        };
    }
    let mut reader = SseReader::new(response);
    let mut events = Vec::new();
    while let Some(data) = reader.next_data().await {
        if leave_after == Some(events.len()) {
            return Outcome::Left;
        }
        events.push(data);
    }
    let (Some(last), Some(before)) = (events.last(), events.iter().rev().nth(1)) else {
        return Outcome::Wrong(format!("a short stream: {events:?}"));
    };
    if last != "[DONE]" {
        return Outcome::Wrong(format!("no [DONE]: {events:?}"));
    }
    let before: Value = serde_json::from_str(before).unwrap_or_default();
    if before.get("error").is_some() {
        let status = if before["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with(ENGINE_FAILURE))
        {
            500
        } else {
            429
        };
        return if expected_error(status, &before) {
            Outcome::ExpectedError(status)
        } else {
            Outcome::Wrong(format!("stream error: {before}"))
        };
    }
    let finished = events.iter().any(|e| {
        serde_json::from_str::<Value>(e).is_ok_and(|c| {
            c["choices"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["finish_reason"].is_string()))
        })
    });
    if finished {
        Outcome::Answered
    } else {
        Outcome::Wrong(format!("no finish_reason: {events:?}"))
    }
}

async fn plain_client(
    http: reqwest::Client,
    url: String,
    body: String,
    patience: Option<Duration>,
    bad: Option<u16>,
) -> Outcome {
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(patience) = patience {
        request = request.timeout(patience);
    }
    let response = match request.send().await {
        Ok(response) => response,
        Err(error) if error.is_timeout() && patience.is_some() => return Outcome::Left,
        Err(error) => return Outcome::Wrong(format!("no answer: {error}")),
    };
    let status = response.status().as_u16();
    let body: Value = match response.json().await {
        Ok(body) => body,
        Err(error) if error.is_timeout() && patience.is_some() => return Outcome::Left,
        Err(error) => return Outcome::Wrong(format!("{status} without a JSON body: {error}")),
    };
    match (bad, status) {
        (Some(expected), status) if status == expected && body["error"]["message"].is_string() => {
            Outcome::ExpectedError(status)
        }
        (None, 200) if body["choices"][0]["finish_reason"].is_string() => Outcome::Answered,
        (None, status) if expected_error(status, &body) => Outcome::ExpectedError(status),
        _ => Outcome::Wrong(format!("{status} (expected {bad:?}): {body}")),
    }
}

fn sum_finished(metrics: &Metrics) -> f64 {
    REASONS
        .iter()
        .filter_map(|reason| {
            metrics.value(
                "heddle_sequences_finished_total",
                &format!("model=\"{MODEL}\",reason=\"{reason}\""),
            )
        })
        .sum()
}

fn greedy_probe() -> Value {
    json!({"model": MODEL, "prompt": "The heddle lifts the warp threads so that", "max_tokens": 16,
           "temperature": 0, "ignore_eos": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rough_crowd_with_failures_and_a_panic_leaves_the_server_whole() {
    let mut spec = model(MODEL);
    spec.pinned = true;
    let mut config = test_config(vec![spec]);
    config.scheduler.max_running = 16;
    config.scheduler.queue_capacity = Some(96);
    let server = start(config).await;
    let faults = server.server.pool().faults().clone();
    let http = reqwest::Client::new();
    let mut rng = ChaCha8Rng::seed_from_u64(2026);
    let started = Instant::now();

    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let delay = Duration::from_millis(rng.random_range(0..4000));
        let kind = rng.random_range(0..10);
        let (http, base) = (http.clone(), server.base.clone());
        let task = match kind {
            // Streams, a third of which leave after a few events.
            0..=4 => {
                let body = valid_body(&mut rng, true);
                let leave = rng.random_bool(0.33).then(|| rng.random_range(0..4));
                let url = format!("{base}{}", endpoint(&body));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    streaming_client(http, url, body, leave).await
                })
            }
            // Plain requests, some of whose clients give up while they wait.
            5..=7 => {
                let body = valid_body(&mut rng, false);
                let patience = rng
                    .random_bool(0.3)
                    .then(|| Duration::from_millis(rng.random_range(50..800)));
                let url = format!("{base}{}", endpoint(&body));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    plain_client(http, url, body.to_string(), patience, None).await
                })
            }
            _ => {
                let (body, status) = bad_body(&mut rng);
                let url = format!("{base}/v1/completions");
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    plain_client(http, url, body, None, Some(status)).await
                })
            }
        };
        clients.push(task);
    }
    // Failures in the middle of the load: two failed steps, one panic, one more failure.
    for (at_ms, panic) in [(800, false), (1600, false), (2400, true), (3200, false)] {
        tokio::time::sleep_until((started + Duration::from_millis(at_ms)).into()).await;
        if panic {
            faults.panic_next_step();
        } else {
            faults.fail_next_steps(1);
        }
    }

    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    let mut wrong = Vec::new();
    for client in clients {
        let outcome = tokio::time::timeout(Duration::from_secs(120), client)
            .await
            .expect("every client is answered within two minutes")
            .unwrap();
        match &outcome {
            Outcome::Wrong(what) => wrong.push(what.clone()),
            Outcome::ExpectedError(status) => {
                *tally.entry(format!("error {status}")).or_default() += 1
            }
            other => *tally.entry(format!("{other:?}")).or_default() += 1,
        }
    }
    eprintln!(
        "outcomes: {tally:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong outcomes: {wrong:#?}",
        wrong.len()
    );
    assert!(
        tally.get("Answered").copied().unwrap_or(0) > CLIENTS / 4,
        "{tally:?}"
    );

    // Drained: nothing running or waiting, no block in use, every accepted sequence ended
    // exactly once, the panic counted, the engine up.
    let drained = eventually(Duration::from_secs(20), || async {
        let metrics = server.metrics().await;
        metrics.model_value("heddle_running_sequences", MODEL) == 0.0
            && metrics.model_value("heddle_kv_blocks_used", MODEL) == 0.0
            && metrics.model_value("heddle_sequences_accepted_total", MODEL)
                == sum_finished(&metrics)
    })
    .await;
    let metrics = server.metrics().await;
    assert!(drained, "not drained:\n{}", metrics.0);
    assert_eq!(
        metrics.model_value("heddle_engine_restarts_total", MODEL),
        1.0
    );
    assert_eq!(metrics.model_value("heddle_engine_up", MODEL), 1.0);
    let failed = metrics
        .value(
            "heddle_sequences_finished_total",
            &format!("model=\"{MODEL}\",reason=\"error\""),
        )
        .unwrap_or(0.0);
    assert!(failed >= 1.0, "the injected failures failed sequences");
    let ready = http.get(server.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let (status, after) = post_json(&http, &server.url("/v1/completions"), &greedy_probe()).await;
    assert_eq!(status, 200, "{after}");
    server.server.shutdown().await.unwrap();

    let fresh = start(test_config(vec![model(MODEL)])).await;
    let (status, expected) =
        post_json(&fresh.http, &fresh.url("/v1/completions"), &greedy_probe()).await;
    assert_eq!(status, 200, "{expected}");
    assert_eq!(after["choices"][0]["text"], expected["choices"][0]["text"]);
    fresh.server.shutdown().await.unwrap();
}
