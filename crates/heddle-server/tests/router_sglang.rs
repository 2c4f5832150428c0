//! Two heddle replicas behind sglang-router, the router people already run: each replica
//! is the `heddle` binary serving the real embedded model on a loopback port, the router
//! is the PyPI package (scripts/router-tools.sh installs it into target/router-venv and
//! scripts/test.sh points HEDDLE_ROUTER_PYTHON there).
//!
//! - The router learns the model's id from the replicas (`/server_info`) and requests
//!   naming it succeed through the router.
//! - On a workload of several shared system prompts, the cache-aware policy sends each
//!   prompt back to the replica that cached it, so a higher share of prompt tokens comes
//!   from the replicas' prefix caches (heddle's own counters) than under round robin.
//! - A replica killed (SIGKILL) in the middle of a load fails none of the requests: they
//!   are not streamed, so the router can retry each one on the other replica.

mod api_support;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_support::{eventually, fetch_metrics, get_json};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

/// The replicas serve the embedded model under this name (`--served-model-name`).
const MODEL: &str = "heddle-smollm2";
/// How long a process may take to come up.
const STARTUP: Duration = Duration::from_secs(90);

/// The interpreter that has the `sglang-router` package.
fn router_python() -> PathBuf {
    if let Some(python) = std::env::var_os("HEDDLE_ROUTER_PYTHON") {
        return python.into();
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/router-venv/bin/python");
    assert!(
        venv.exists(),
        "this test needs sglang-router: run `bash scripts/test.sh`, or \
         `bash scripts/router-tools.sh` once before `cargo test`"
    );
    venv
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A child process, killed when dropped, whose output goes to a log file.
struct Process {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Process {
    fn spawn(mut command: Command, port: u16, log: PathBuf) -> Process {
        let file = File::create(&log).expect("a log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("the log file again"))
            .stderr(file)
            .spawn()
            .expect("the process starts");
        Process {
            child,
            base: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// SIGKILL: no graceful shutdown, connections reset mid-request.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch folder of this test run.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("heddle-router-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

async fn start_replica(http: &reqwest::Client, dir: &Path, name: &str) -> Process {
    let port = free_port();
    let mut command = Command::new(env!("CARGO_BIN_EXE_heddle"));
    command
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--served-model-name", MODEL, "--kv-blocks", "1024"])
        .arg("--data-dir")
        .arg(dir.join(name))
        .env("HEDDLE_LOG", "warn");
    let replica = Process::spawn(command, port, dir.join(format!("{name}.log")));
    let ready = eventually(STARTUP, || async {
        let response = http.get(format!("{}/ready", replica.base)).send().await;
        response.is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(
        ready,
        "replica {name} never got ready:\n{}",
        replica.log_text()
    );
    replica
}

async fn start_router(
    http: &reqwest::Client,
    dir: &Path,
    policy: &str,
    workers: &[&Process],
    extra_args: &[&str],
) -> Process {
    let port = free_port();
    let mut command = Command::new(router_python());
    command
        .args(["-m", "sglang_router.launch_router"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        // Its own Prometheus exporter would take a fixed port otherwise.
        .args(["--prometheus-host", "127.0.0.1"])
        .args(["--prometheus-port", &free_port().to_string()])
        .args(["--policy", policy, "--log-level", "warn"])
        .args(extra_args)
        .arg("--worker-urls")
        .args(workers.iter().map(|w| w.base.as_str()));
    let router = Process::spawn(command, port, dir.join(format!("router-{policy}.log")));
    // Registered: every worker listed, healthy, under the model id it told the router.
    let registered = eventually(STARTUP, || async {
        let Ok(response) = http.get(format!("{}/workers", router.base)).send().await else {
            return false;
        };
        let listing: Value = response.json().await.unwrap_or_default();
        let listed = listing["workers"].as_array().cloned().unwrap_or_default();
        listed.len() == workers.len()
            && listed
                .iter()
                .all(|w| w["is_healthy"] == true && w["model_id"] == MODEL)
    })
    .await;
    assert!(
        registered,
        "the router did not register the replicas under {MODEL}:\n{}",
        router.log_text()
    );
    router
}

/// A small deterministic generator (splitmix64), for prompts and request orders.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "amber", "harbor", "lantern", "meadow", "copper", "falcon", "orchard", "glacier", "velvet",
    "canyon", "ember", "willow", "quartz", "saffron", "tundra", "beacon", "cobalt", "prairie",
    "marble", "thistle", "juniper", "summit", "ripple", "granite", "hollow", "maple", "citadel",
    "lagoon", "pepper", "ivory", "comet", "basalt", "fern", "kestrel", "mosaic", "pebble",
];

/// `count` system prompts of about 300 tokens each, different from their first words.
fn system_prompts(count: usize, seed: u64) -> Vec<String> {
    let mut mix = Mix(seed);
    (0..count)
        .map(|_| {
            let words: Vec<&str> = (0..220).map(|_| WORDS[mix.below(WORDS.len())]).collect();
            format!("{}. Answer briefly.", words.join(" "))
        })
        .collect()
}

/// One chat request through `base`; Err says how it failed.
async fn chat(
    http: &reqwest::Client,
    base: &str,
    system: &str,
    question: &str,
    max_tokens: u32,
) -> Result<(), String> {
    let body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    let response = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .map_err(|error| format!("no answer: {error}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("{status}: {e}"))?;
    let reply: Value = serde_json::from_str(&text).unwrap_or_default();
    if status.is_success() && reply["choices"][0]["message"]["content"].is_string() {
        Ok(())
    } else {
        Err(format!("{status}: {text}"))
    }
}

/// Every prompt `per_prompt` times, in a shuffled order, `concurrency` at a time through
/// `base`; `done` counts the answered requests as they end.
async fn run_workload(
    http: &reqwest::Client,
    base: &str,
    prompts: &[String],
    per_prompt: usize,
    concurrency: usize,
    max_tokens: u32,
    done: Arc<AtomicUsize>,
) -> Vec<Result<(), String>> {
    let mut order: Vec<usize> = (0..prompts.len())
        .flat_map(|p| std::iter::repeat_n(p, per_prompt))
        .collect();
    let mut mix = Mix(prompts.len() as u64 * 7919 + per_prompt as u64);
    for i in (1..order.len()).rev() {
        order.swap(i, mix.below(i + 1));
    }
    stream::iter(order.into_iter().enumerate())
        .map(|(n, p)| {
            let done = done.clone();
            async move {
                let question = format!("Question {n}: which word comes first?");
                let result = chat(http, base, &prompts[p], &question, max_tokens).await;
                done.fetch_add(1, Ordering::Relaxed);
                result
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Prompt tokens served from the replicas' prefix caches, and computed, summed.
async fn prefix_tokens(http: &reqwest::Client, replicas: &[&Process]) -> (f64, f64) {
    let mut totals = (0.0, 0.0);
    for replica in replicas {
        let metrics = fetch_metrics(http, &replica.base).await;
        totals.0 += metrics.model_value("heddle_prefix_cache_hit_tokens_total", MODEL);
        totals.1 += metrics.model_value("heddle_prefix_cache_miss_tokens_total", MODEL);
    }
    totals
}

/// Sequences a replica accepted, and those that ended, since it started.
async fn accepted_and_finished(http: &reqwest::Client, replica: &Process) -> (f64, f64) {
    let metrics = fetch_metrics(http, &replica.base).await;
    let finished = ["stop", "length", "cancelled", "error"]
        .iter()
        .map(|reason| {
            let labels = format!("model=\"{MODEL}\",reason=\"{reason}\"");
            metrics
                .value("heddle_sequences_finished_total", &labels)
                .unwrap_or(0.0)
        })
        .sum();
    (
        metrics.model_value("heddle_sequences_accepted_total", MODEL),
        finished,
    )
}

/// The share of prompt tokens served from the prefix caches while one router (policy)
/// ran the shared-system-prompt workload on its own prompts.
async fn hit_share_under(
    http: &reqwest::Client,
    dir: &Path,
    policy: &str,
    replicas: &[&Process],
    seed: u64,
) -> f64 {
    let router = start_router(http, dir, policy, replicas, &[]).await;
    let before = prefix_tokens(http, replicas).await;
    let prompts = system_prompts(5, seed);
    let done = Arc::new(AtomicUsize::new(0));
    let results = run_workload(http, &router.base, &prompts, 6, 2, 2, done).await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{policy}: requests failed through the router: {failed:?}\n{}",
        router.log_text()
    );
    let after = prefix_tokens(http, replicas).await;
    let (hits, misses) = (after.0 - before.0, after.1 - before.1);
    assert!(hits + misses > 0.0, "{policy}: the replicas saw no prompt");
    let share = hits / (hits + misses);
    println!(
        "{policy}: {hits} of {} prompt tokens from the prefix caches ({share:.3})",
        hits + misses
    );
    share
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_behind_sglang_router() {
    let started = Instant::now();
    let dir = scratch();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let a = start_replica(&http, &dir, "replica-a").await;
    let mut b = start_replica(&http, &dir, "replica-b").await;

    // The router lists the model under the replicas' served name, and serves it.
    let router = start_router(&http, &dir, "cache_aware", &[&a, &b], &[]).await;
    let models: Value = get_json(&http, &format!("{}/v1/models", router.base))
        .await
        .1;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec![MODEL], "{models}");
    chat(&http, &router.base, "You are brief.", "Say hi.", 4)
        .await
        .unwrap_or_else(|error| panic!("{error}\n{}", router.log_text()));
    drop(router);

    // Each policy on prompts of its own, so that neither reuses the other's cache.
    let round_robin = hit_share_under(&http, &dir, "round_robin", &[&a, &b], 1).await;
    let cache_aware = hit_share_under(&http, &dir, "cache_aware", &[&a, &b], 2).await;
    assert!(
        cache_aware > round_robin + 0.05,
        "cache-aware routing served {cache_aware:.3} of prompt tokens from the prefix \
         caches, round robin {round_robin:.3}"
    );

    // Kill one replica mid-load: the router retries what it had sent there elsewhere.
    // By default its circuit breaker opens after 10 failures in a row, and the
    // cache-aware policy keeps choosing the dead replica for its prompts until then, so
    // a request can spend all 5 retries there (docs/DEPLOY.md); opened after 2, the
    // later retries go to the live replica.
    let failover = ["--cb-failure-threshold", "2"];
    let router = start_router(&http, &dir, "cache_aware", &[&a, &b], &failover).await;
    let b_before = accepted_and_finished(&http, &b).await;
    let prompts = system_prompts(4, 3);
    let done = Arc::new(AtomicUsize::new(0));
    let load = {
        let (http, base, done) = (http.clone(), router.base.clone(), done.clone());
        tokio::spawn(async move { run_workload(&http, &base, &prompts, 6, 4, 16, done).await })
    };
    let under_way = eventually(Duration::from_secs(60), || async {
        done.load(Ordering::Relaxed) >= 6
    })
    .await;
    assert!(
        under_way,
        "the load did not get going:\n{}",
        router.log_text()
    );
    let b_at_kill = accepted_and_finished(&http, &b).await;
    b.kill();
    let killed_after = done.load(Ordering::Relaxed);
    let results = load.await.unwrap();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let b_accepted = b_at_kill.0 - b_before.0;
    println!(
        "killed replica b after {killed_after} of {} requests; b had accepted {b_accepted} \
         of them and was working on {} at its last scrape; {} failed",
        results.len(),
        b_at_kill.0 - b_at_kill.1,
        failed.len()
    );
    assert!(
        b_accepted > 0.0,
        "the router sent nothing to the replica killed"
    );
    assert!(
        killed_after < results.len(),
        "the load ended before the kill"
    );
    assert!(
        failed.is_empty(),
        "requests failed after a replica was killed: {failed:?}\n{}",
        router.log_text()
    );
    println!("took {:.1} s", started.elapsed().as_secs_f64());
    drop(router);
    drop(a);
    let _ = std::fs::remove_dir_all(&dir);
}
