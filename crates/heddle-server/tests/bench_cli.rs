//! `heddle bench` end to end: its command line, against a real heddle server on loopback
//! with the embedded model, checked against what the server itself counted; and the
//! `heddle` binary's own manners: errors in one line, no colour codes off a terminal.

mod api_support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api_support::{model, start, test_config, TestServer};
use clap::Parser;
use heddle_server::bench::{self, BenchArgs};
use serde_json::Value;

const MODEL: &str = "bench-model";

/// The command line as `heddle bench` parses it.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    bench: BenchArgs,
}

fn parse(server: &TestServer, extra: &[&str]) -> BenchArgs {
    let mut argv = vec![
        "bench",
        "--url",
        &server.base,
        "--model",
        MODEL,
        "--ignore-eos",
        "--no-progress",
    ];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).expect("valid flags").bench
}

/// A JSON report path unique to this test, removed on drop.
struct ReportFile(PathBuf);

impl ReportFile {
    fn new(name: &str) -> Self {
        ReportFile(
            std::env::temp_dir().join(format!("heddle-bench-{name}-{}.json", std::process::id())),
        )
    }

    fn read(&self) -> Value {
        serde_json::from_str(&std::fs::read_to_string(&self.0).expect("the report")).expect("JSON")
    }
}

impl Drop for ReportFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A counter of the model; zero before the model is loaded (it is loaded on first use).
async fn counter(server: &TestServer, name: &str) -> f64 {
    server
        .metrics()
        .await
        .value(name, &format!("model=\"{MODEL}\""))
        .unwrap_or(0.0)
}

/// Both counters, once the server's tally has caught up with `expected_output`.
async fn token_counters(server: &TestServer, expected_output: f64) -> (f64, f64) {
    let settled = api_support::eventually(Duration::from_secs(5), || async {
        counter(server, "heddle_generation_tokens_total").await >= expected_output
    })
    .await;
    assert!(settled, "the server never counted {expected_output} tokens");
    (
        counter(server, "heddle_prompt_tokens_total").await,
        counter(server, "heddle_generation_tokens_total").await,
    )
}

fn as_usize(value: &Value) -> usize {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("{value} is not a count")) as usize
}

/// Every figure the report promises is there, and they agree with each other.
fn check_run(run: &Value, requests: usize, output_len: usize) {
    assert_eq!(as_usize(&run["requests"]), requests, "{run}");
    assert_eq!(as_usize(&run["completed"]), requests, "{run}");
    assert_eq!(as_usize(&run["failed"]), 0, "{run}");
    assert_eq!(run["errors"], serde_json::json!({}));
    assert_eq!(as_usize(&run["usage_reported"]), requests);
    assert_eq!(as_usize(&run["output_tokens"]), requests * output_len);
    // heddle tokenizes prompts exactly as the benchmark did, and SmolLM2 adds no BOS.
    assert_eq!(run["input_tokens"], run["expected_input_tokens"]);
    let details = run["request_details"].as_array().expect("request details");
    assert_eq!(details.len(), requests);
    let mut input = 0;
    for detail in details {
        assert_eq!(as_usize(&detail["output_tokens"]), output_len, "{detail}");
        assert_eq!(detail["prompt_tokens"], detail["expected_prompt_tokens"]);
        assert_eq!(detail["usage_reported"], true);
        assert!(detail["error"].is_null());
        let (ttft, e2e) = (
            detail["ttft_ms"].as_f64().unwrap(),
            detail["e2e_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < ttft && ttft <= e2e, "{detail}");
        input += as_usize(&detail["prompt_tokens"]);
    }
    assert_eq!(as_usize(&run["input_tokens"]), input);
    for figure in ["ttft_ms", "tpot_ms", "e2e_ms"] {
        assert_eq!(as_usize(&run[figure]["count"]), requests, "{figure}: {run}");
        let summary = &run[figure];
        let (min, median, p99, max) = (
            summary["min"].as_f64().unwrap(),
            summary["median"].as_f64().unwrap(),
            summary["p99"].as_f64().unwrap(),
            summary["max"].as_f64().unwrap(),
        );
        assert!(
            min <= median && median <= p99 && p99 <= max,
            "{figure}: {summary}"
        );
    }
    // A gap per chunk after the first: at most output_len − 1 per request.
    let gaps = as_usize(&run["itl_ms"]["count"]);
    assert!(gaps > 0 && gaps <= requests * (output_len - 1), "{gaps}");
    let duration = run["duration_s"].as_f64().unwrap();
    let throughput = run["output_throughput"].as_f64().unwrap();
    assert!((throughput * duration - (requests * output_len) as f64).abs() < 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_completions_at_a_concurrency_limit_match_the_servers_counts() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let report_file = ReportFile::new("random");
    let (requests, input_len, output_len) = (6, 24, 6);
    let args = parse(
        &server,
        &[
            "--dataset",
            "random",
            "--input-len",
            "24",
            "--output-len",
            "6",
            "--num-prompts",
            "6",
            "--max-concurrency",
            "3",
            "--request-rate",
            "50",
            "--seed",
            "3",
            "--warmup-requests",
            "1",
            "--wait-ready",
            "30",
            "--json",
            report_file.0.to_str().unwrap(),
        ],
    );
    let workload = bench::prepare(&args).expect("the workload");
    assert!(workload
        .prompts
        .iter()
        .all(|p| p.prompt_tokens == input_len));

    let (prompt_before, generated_before) = (
        counter(&server, "heddle_prompt_tokens_total").await,
        counter(&server, "heddle_generation_tokens_total").await,
    );
    let report = bench::execute(&args, &workload).await.expect("the run");
    report.write_json(&report_file.0).expect("the JSON report");

    // The server counted exactly the tokens the report claims (plus the warm-up's).
    let warmup_output = workload.warmup.iter().map(|p| p.output_len).sum::<usize>() as f64;
    let warmup_input = workload
        .warmup
        .iter()
        .map(|p| p.prompt_tokens)
        .sum::<usize>() as f64;
    let reported_output = report.result.output_tokens as f64;
    let (prompt_after, generated_after) =
        token_counters(&server, generated_before + reported_output + warmup_output).await;
    assert_eq!(
        generated_after - generated_before,
        reported_output + warmup_output
    );
    assert_eq!(
        prompt_after - prompt_before,
        report.result.input_tokens as f64 + warmup_input
    );

    let json = report_file.read();
    check_run(&json["result"], requests, output_len);
    assert!(json["single"].is_null() && json["speedup_vs_single"].is_null());
    let config = &json["config"];
    assert_eq!(config["url"], server.base.as_str());
    assert_eq!(config["endpoint"], "completions");
    assert_eq!(config["request_rate"], 50.0);
    assert_eq!(config["max_concurrency"], 3);
    assert!(
        config.get("api_key").is_none(),
        "the key must not be written"
    );
    assert_eq!(as_usize(&json["prompts"]["count"]), requests);
    assert_eq!(json["prompts"]["prompt_tokens"]["mean"], input_len as f64);
    assert!(report.table().contains("Output token throughput (tok/s)"));

    server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_chat_with_priorities_and_compare_single() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let requests = 6;
    let output_len = 5;
    let args = parse(
        &server,
        &[
            "--endpoint",
            "chat",
            "--dataset",
            "prefix",
            "--prefix-len",
            "48",
            "--input-len",
            "8",
            "--output-len",
            "5",
            "--num-prompts",
            "6",
            "--priority-mix",
            "high:1,low:1",
            "--compare-single",
            "--warmup-requests",
            "0",
        ],
    );
    let workload = bench::prepare(&args).expect("the workload");
    let single = workload
        .single_prompts
        .as_ref()
        .expect("single-run prompts");
    // Same shapes, fresh tokens after the shared prefix.
    for (prompt, copy) in workload.prompts.iter().zip(single) {
        assert_eq!(prompt.prompt_tokens, 56);
        assert_eq!(copy.prompt_tokens, 56);
        assert_eq!(prompt.priority, copy.priority);
        assert_ne!(prompt.text, copy.text);
    }
    let hits_before = counter(&server, "heddle_prefix_cache_hit_tokens_total").await;
    let report = bench::execute(&args, &workload).await.expect("the run");
    let json = serde_json::to_value(&report).unwrap();

    for run in ["single", "result"] {
        let run = &json[run];
        assert_eq!(as_usize(&run["completed"]), requests, "{run}");
        assert_eq!(as_usize(&run["output_tokens"]), requests * output_len);
        assert_eq!(as_usize(&run["usage_reported"]), requests);
        // Chat prompts are wrapped in the template: the server counts more tokens.
        assert!(as_usize(&run["input_tokens"]) > as_usize(&run["expected_input_tokens"]));
        let per_priority = run["per_priority"].as_object().expect("per priority");
        let counted: usize = per_priority
            .values()
            .map(|p| as_usize(&p["completed"]))
            .sum();
        assert_eq!(counted, requests);
        assert!(per_priority.keys().all(|k| k == "high" || k == "low"));
    }
    let speedup = json["speedup_vs_single"].as_f64().expect("a speedup");
    let expected = json["result"]["output_throughput"].as_f64().unwrap()
        / json["single"]["output_throughput"].as_f64().unwrap();
    assert!(speedup > 0.0 && (speedup - expected).abs() < 1e-9);
    // The shared prefix was found in the server's prefix cache.
    let hits_after = counter(&server, "heddle_prefix_cache_hit_tokens_total").await;
    assert!(hits_after > hits_before, "no prefix cache hits");
    assert!(report.table().contains("Speedup"));

    server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_counted_by_status() {
    let server = start(test_config(vec![model(MODEL)])).await;
    // The server does not serve this model: every request is answered 404.
    let mut args = parse(
        &server,
        &[
            "--num-prompts",
            "3",
            "--input-len",
            "4",
            "--output-len",
            "2",
            "--warmup-requests",
            "0",
        ],
    );
    args.model = "no-such-model".into();
    let workload = bench::prepare(&args).expect("the workload");
    let report = bench::execute(&args, &workload).await.expect("the run");
    assert_eq!(report.result.completed, 0);
    assert_eq!(report.result.failed, 3);
    assert_eq!(
        report.result.errors,
        std::collections::BTreeMap::from([("404".to_string(), 3)])
    );
    assert_eq!(report.result.latency.ttft_ms, None);

    server.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_url_may_name_v1_and_end_in_a_slash() {
    let server = start(test_config(vec![model(MODEL)])).await;
    for url in [
        format!("{}/v1", server.base),
        format!("{}/v1/", server.base),
    ] {
        let mut args = parse(
            &server,
            &[
                "--num-prompts",
                "2",
                "--input-len",
                "4",
                "--output-len",
                "2",
                "--warmup-requests",
                "0",
            ],
        );
        args.url = url.clone();
        let workload = bench::prepare(&args).expect("the workload");
        let report = bench::execute(&args, &workload).await.expect("the run");
        assert_eq!(
            report.result.completed, 2,
            "{url}: {:?}",
            report.result.errors
        );
    }
    server.server.shutdown().await.unwrap();
}

/// The `heddle` binary with a clean environment for its output: logs at info, no
/// NO_COLOR to hide colour codes, and backtraces asked for, which an error must not show.
fn heddle() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_heddle"));
    command
        .env("HEDDLE_LOG", "info")
        .env_remove("NO_COLOR")
        .env("RUST_BACKTRACE", "1")
        // Its own batch database, not the user's.
        .env(
            "HEDDLE_DATA_DIR",
            std::env::temp_dir().join(format!("heddle-bench-cli-{}", std::process::id())),
        )
        .stdin(Stdio::null());
    command
}

#[test]
fn an_unreachable_server_is_one_line_and_a_failure() {
    // Nothing listens on port 9 (discard) of loopback.
    for warmup in ["1", "0"] {
        let output = heddle()
            .args([
                "bench",
                "--url",
                "http://127.0.0.1:9/v1",
                "--num-prompts",
                "2",
            ])
            .args(["--input-len", "4", "--output-len", "2", "--no-progress"])
            .args(["--warmup-requests", warmup])
            .output()
            .expect("heddle runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert_eq!(
            stderr.trim_end(),
            "error: cannot connect to http://127.0.0.1:9/v1/models: connection refused",
            "warm-up requests: {warmup}"
        );
        assert!(output.stdout.is_empty());
    }
    // A bad flag value, also one line.
    let output = heddle()
        .args(["bench", "--num-prompts", "0"])
        .output()
        .expect("heddle runs");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr).trim_end(),
        "error: --num-prompts must be at least 1"
    );
}

#[test]
fn logs_carry_no_colour_codes_off_a_terminal() {
    // stderr is a pipe here, as it is under systemd, docker or `2> file`.
    let mut server = heddle()
        .args(["serve", "--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("heddle serve starts");
    let stderr = server.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut log = Vec::new();
    while Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let ready = line.contains("ready");
                log.push(line);
                if ready {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    server.kill().expect("the server stops");
    server.wait().unwrap();
    reader.join().unwrap();
    log.extend(lines.try_iter());
    let log = log.join("\n");
    assert!(log.contains("listening on http://127.0.0.1:"), "{log}");
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "colour codes in: {log:?}");
}
