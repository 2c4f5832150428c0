//! What routers read from a replica, end to end on the real embedded model: the served
//! model's names (`/server_info`, `/v1/models`, aliases), the gauges under vLLM's names,
//! and the KV-cache events, read by a ZeroMQ subscriber in Python (pyzmq and msgspec,
//! laid out as vLLM's consumers lay them out: tests/python/kv_events_subscriber.py, from
//! the environment scripts/router-tools.sh makes, HEDDLE_ROUTER_PYTHON).

mod api_support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api_support::{
    eventually, get_json, model, post_json, start, test_config, SseReader, ADMIN_KEY,
};
use heddle_core::kv::block_hash;
use heddle_server::kv_events::KvEventsConfig;
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[tokio::test]
async fn server_info_and_models_name_the_served_model_and_its_aliases() {
    let mut spec = model("org/smollm2-135m");
    spec.aliases = vec!["smollm2".into()];
    let server = start(test_config(vec![spec])).await;
    let info: Value = get_json(&server.http, &server.url("/server_info")).await.1;
    assert_eq!(info["served_model_name"], "org/smollm2-135m", "{info}");
    assert_eq!(
        info["served_model_names"],
        json!(["org/smollm2-135m", "smollm2"])
    );
    assert_eq!(info["max_running_requests"], 8);

    let models: Value = get_json(&server.http, &server.url("/v1/models")).await.1;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["org/smollm2-135m", "smollm2"]);

    // A request may use the alias; the answer names the model by its id.
    let (status, body) = post_json(
        &server.http,
        &server.url("/v1/completions"),
        &json!({"model": "smollm2", "prompt": "Hello", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "org/smollm2-135m");
    server.server.shutdown().await.unwrap();

    // With two models no single name is the served one.
    let server = start(test_config(vec![model("a"), model("b")])).await;
    let info: Value = get_json(&server.http, &server.url("/server_info")).await.1;
    assert!(info.get("served_model_name").is_none(), "{info}");
    assert_eq!(info["served_model_names"], json!(["a", "b"]));
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn vllm_named_gauges_follow_the_scheduler() {
    let mut config = test_config(vec![model("m")]);
    config.scheduler.max_running = 1;
    let server = start(config).await;
    let stream_body = json!({"model": "m", "prompt": "Count:", "max_tokens": 1500, "stream": true,
                             "ignore_eos": true});
    let response = server
        .http
        .post(server.url("/v1/completions"))
        .json(&stream_body)
        .send()
        .await
        .unwrap();
    let mut running = SseReader::new(response);
    running.next_data().await.expect("a first chunk");
    // A second request waits for the only seat.
    let waiting = {
        let (http, url) = (server.http.clone(), server.url("/v1/completions"));
        tokio::spawn(async move {
            http.post(url)
                .json(&json!({"model": "m", "prompt": "Hi", "max_tokens": 1}))
                .timeout(Duration::from_secs(2))
                .send()
                .await
        })
    };
    let seen = eventually(Duration::from_secs(10), || async {
        let metrics = server.metrics().await;
        let vllm = |name: &str| metrics.value(name, "model_name=\"m\"");
        vllm("vllm:num_requests_running") == Some(1.0)
            && vllm("vllm:num_requests_waiting") == Some(1.0)
            && vllm("vllm:kv_cache_usage_perc").is_some_and(|usage| usage > 0.0 && usage < 1.0)
    })
    .await;
    let metrics = server.metrics().await;
    assert!(seen, "{}", metrics.0);
    // The same values as heddle's own families.
    let used = metrics.model_value("heddle_kv_blocks_used", "m");
    let total = metrics.model_value("heddle_kv_blocks_total", "m");
    let usage = metrics
        .value("vllm:kv_cache_usage_perc", "model_name=\"m\"")
        .unwrap();
    assert!(
        (usage - used / total).abs() < 0.02,
        "{usage} vs {used}/{total}"
    );
    drop(running);
    let _ = waiting.await;
    server.server.shutdown().await.unwrap();
}

/// The interpreter with pyzmq and msgspec.
fn router_python() -> PathBuf {
    if let Some(python) = std::env::var_os("HEDDLE_ROUTER_PYTHON") {
        return python.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/router-venv/bin/python");
    assert!(
        venv.exists(),
        "this test needs pyzmq and msgspec: run `bash scripts/test.sh`, or \
         `bash scripts/router-tools.sh` once before `cargo test`"
    );
    venv
}

/// The Python subscriber, its events arriving as JSON values on a channel.
struct Subscriber {
    child: Child,
    events: mpsc::UnboundedReceiver<Value>,
}

impl Subscriber {
    fn start(mode: &str, endpoint: &str, topic: &str) -> Subscriber {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/python/kv_events_subscriber.py");
        let mut child = Command::new(router_python())
            .arg(script)
            .args([mode, endpoint, topic, "120"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python runs");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (sender, events) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                let event = if line == "subscribed" {
                    json!({"type": "subscribed"})
                } else {
                    serde_json::from_str(&line).expect("a JSON event")
                };
                if sender.send(event).is_err() {
                    return;
                }
            }
        });
        Subscriber { child, events }
    }

    /// Events until one satisfies `wanted` (returned last), or None after `patience`.
    /// Awaits them: the server's publisher runs on the test's runtime.
    async fn until(
        &mut self,
        patience: Duration,
        wanted: impl Fn(&Value) -> bool,
    ) -> Option<Vec<Value>> {
        let deadline = Instant::now() + patience;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(Some(event)) = tokio::time::timeout(left, self.events.recv()).await else {
                return None;
            };
            let done = wanted(&event);
            seen.push(event);
            if done {
                return Some(seen);
            }
        }
        None
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// 40 token ids (two full blocks of 16 and a tail) of their own for request `n`.
fn prompt(n: u32) -> Vec<u32> {
    (0..40).map(|i| 300 + n * 50 + i).collect()
}

/// The chained hashes of a prompt's full blocks, as heddle computes them.
fn full_block_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut parent = None;
    tokens
        .chunks_exact(16)
        .map(|block| {
            let hash = block_hash(parent, block);
            parent = Some(hash);
            hash
        })
        .collect()
}

fn hashes(event: &Value) -> Vec<u64> {
    event["block_hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_u64().unwrap())
        .collect()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn kv_events_reach_a_subscriber_that_connects_to_a_bound_endpoint() {
    let port = free_port();
    let heddle_binds = format!("tcp://*:{port}");
    let subscriber_connects = format!("tcp://127.0.0.1:{port}");
    kv_events_reach_a_subscriber(&heddle_binds, "connect", &subscriber_connects).await;
}

#[tokio::test]
async fn kv_events_reach_a_subscriber_that_binds() {
    let endpoint = format!("tcp://127.0.0.1:{}", free_port());
    kv_events_reach_a_subscriber(&endpoint, "bind", &endpoint).await;
}

/// KV events of a server publishing on `endpoint`, read by a subscriber that `mode`s
/// (binds or connects) `subscriber_endpoint`, are vLLM's events of the blocks heddle
/// cached, evicted and cleared.
async fn kv_events_reach_a_subscriber(endpoint: &str, mode: &str, subscriber_endpoint: &str) {
    // A subscriber that binds is there before the server connects.
    let bound_first =
        (mode == "bind").then(|| Subscriber::start(mode, subscriber_endpoint, "heddle"));
    let mut config = test_config(vec![model("m")]);
    // Room for three requests' blocks: the fourth evicts cached ones.
    config.scheduler.num_blocks = 9;
    config.kv_events = Some(KvEventsConfig {
        endpoint: endpoint.to_string(),
        topic: "heddle".into(),
    });
    let server = start(config).await;
    let mut subscriber =
        bound_first.unwrap_or_else(|| Subscriber::start(mode, subscriber_endpoint, "heddle"));
    let patience = Duration::from_secs(30);
    assert!(subscriber
        .until(patience, |e| e["type"] == "subscribed")
        .await
        .is_some());

    let complete = |n: u32| {
        let (http, url) = (server.http.clone(), server.url("/v1/completions"));
        async move {
            let body = json!({"model": "m", "prompt": prompt(n), "max_tokens": 1});
            let (status, body) = post_json(&http, &url, &body).await;
            assert_eq!(status, 200, "{body}");
        }
    };
    // A subscription takes effect a moment after the connection (ZeroMQ's slow joiner):
    // the first requests' events may pass before it does.
    let mut sent = 0;
    let stored = loop {
        assert!(sent < 20, "no BlockStored event arrived");
        complete(sent).await;
        let first_two = prompt(sent)[..32].to_vec();
        let events = subscriber
            .until(Duration::from_secs(1), |e| {
                e["type"] == "BlockStored" && e["token_ids"] == json!(first_two)
            })
            .await;
        sent += 1;
        if let Some(events) = events {
            break events.last().unwrap().clone();
        }
    };
    let n = sent - 1;
    assert_eq!(stored["topic"], "heddle");
    assert_eq!(hashes(&stored), full_block_hashes(&prompt(n)[..32]));
    assert_eq!(stored["parent_block_hash"], Value::Null);
    assert_eq!(stored["block_size"], 16);
    assert_eq!(stored["lora_id"], Value::Null);
    assert_eq!(stored["medium"], "CPU");

    // New prompts evict the least recently used blocks: each removed hash is one of a
    // prompt sent, and the sequence numbers only grow.
    let all_sent: Vec<u64> = (0..sent + 4)
        .flat_map(|n| full_block_hashes(&prompt(n)[..32]))
        .collect();
    for extra in sent..sent + 4 {
        complete(extra).await;
    }
    let events = subscriber
        .until(patience, |e| e["type"] == "BlockRemoved")
        .await
        .expect("evictions reported");
    let removed = events.last().unwrap();
    assert!(
        hashes(removed).iter().all(|h| all_sent.contains(h)),
        "{removed}"
    );
    let seqs: Vec<u64> = std::iter::once(&stored)
        .chain(&events)
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");

    // An engine that panics restarts with an empty cache, and goes on publishing.
    server.server.pool().faults().panic_next_step();
    let body = json!({"model": "m", "prompt": prompt(100), "max_tokens": 1});
    let _failed_in_the_panic = post_json(&server.http, &server.url("/v1/completions"), &body).await;
    assert!(
        subscriber
            .until(patience, |e| e["type"] == "AllBlocksCleared")
            .await
            .is_some(),
        "no AllBlocksCleared after the restart"
    );
    complete(101).await;
    let after_restart = full_block_hashes(&prompt(101)[..32]);
    assert!(
        subscriber
            .until(patience, |e| e["type"] == "BlockStored"
                && hashes(e) == after_restart)
            .await
            .is_some(),
        "no BlockStored after the restart"
    );

    // Unloading the model empties its cache.
    let unloaded = server
        .http
        .post(server.url("/admin/models/m/unload"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert!(unloaded.status().is_success());
    assert!(
        subscriber
            .until(patience, |e| e["type"] == "AllBlocksCleared")
            .await
            .is_some(),
        "no AllBlocksCleared after the unload"
    );
    server.server.shutdown().await.unwrap();
}
