//! The Batch API end to end: the real embedded model behind the real HTTP server, and for
//! the restart test the real `heddle serve` binary, killed hard mid-batch.

mod api_support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use api_support::{
    assert_error, get_json, model, model_path, post_json, start, test_config, ADMIN_KEY,
};
use heddle_server::api::auth::{ApiKey, KeyTier};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";
/// How long any batch here may take to finish on two slow cores.
const BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Uploads `content` as a multipart form, as the openai client does.
async fn upload(
    http: &reqwest::Client,
    base: &str,
    purpose: &str,
    content: &[u8],
) -> (reqwest::StatusCode, Value) {
    let boundary = "heddle-test-boundary-7f3a";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
             Content-Type: application/jsonl\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(content);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let response = http
        .post(format!("{base}/v1/files"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("answered");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

fn jsonl(lines: &[Value]) -> Vec<u8> {
    lines
        .iter()
        .map(|line| format!("{line}\n"))
        .collect::<String>()
        .into_bytes()
}

fn chat_line(custom_id: &str, body: Value) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})
}

fn greedy_chat(question: &str, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

async fn create_batch(http: &reqwest::Client, base: &str, file_id: &str, endpoint: &str) -> Value {
    let (status, batch) = post_json(
        http,
        &format!("{base}/v1/batches"),
        &json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                "metadata": {"suite": "api_batches"}}),
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["object"], "batch");
    assert!(batch["id"].as_str().unwrap().starts_with("batch_"));
    assert_eq!(batch["metadata"]["suite"], "api_batches");
    batch
}

/// Polls a batch until its status is one of `statuses`.
async fn wait_for(http: &reqwest::Client, base: &str, id: &str, statuses: &[&str]) -> Value {
    let deadline = Instant::now() + BATCH_TIMEOUT;
    loop {
        let (status, batch) = get_json(http, &format!("{base}/v1/batches/{id}")).await;
        assert_eq!(status, 200, "{batch}");
        if statuses.contains(&batch["status"].as_str().unwrap()) {
            return batch;
        }
        assert!(Instant::now() < deadline, "still {batch}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A file's lines as JSON.
async fn file_lines(http: &reqwest::Client, base: &str, id: &Value) -> Vec<Value> {
    let id = id.as_str().expect("a file id");
    let response = http
        .get(format!("{base}/v1/files/{id}/content"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    text.lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

fn by_custom_id<'a>(lines: &'a [Value], custom_id: &str) -> &'a Value {
    lines
        .iter()
        .find(|line| line["custom_id"] == custom_id)
        .unwrap_or_else(|| panic!("no line {custom_id} in {lines:?}"))
}

#[tokio::test]
async fn a_batch_answers_like_the_interactive_api_and_bad_lines_fail_alone() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let (http, base) = (&server.http, server.base.as_str());
    let questions = [
        "What is a heddle?",
        "Name a colour.",
        "Say hello.",
        "Count to three.",
    ];
    let mut lines: Vec<Value> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| chat_line(&format!("q{i}"), greedy_chat(q, 8)))
        .collect();
    let mut negative = greedy_chat("x", 4);
    negative["temperature"] = json!(-1);
    lines.push(chat_line("bad-temperature", negative));
    let mut unknown = greedy_chat("x", 4);
    unknown["model"] = json!("no-such-model");
    lines.push(chat_line("unknown-model", unknown));
    lines.push(chat_line(
        "streaming",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": true}),
    ));

    let (status, file) = upload(http, base, "batch", &jsonl(&lines)).await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["bytes"], jsonl(&lines).len());
    let batch = create_batch(
        http,
        base,
        file["id"].as_str().unwrap(),
        "/v1/chat/completions",
    )
    .await;
    assert_eq!(batch["status"], "validating");
    let done = wait_for(
        http,
        base,
        batch["id"].as_str().unwrap(),
        &["completed", "failed"],
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 7, "completed": 4, "failed": 3})
    );
    for field in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[field].as_u64().is_some(), "{field}: {done}");
    }

    let output = file_lines(http, base, &done["output_file_id"]).await;
    assert_eq!(output.len(), 4);
    for (i, question) in questions.iter().enumerate() {
        let line = by_custom_id(&output, &format!("q{i}"));
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(line["error"].is_null());
        assert_eq!(line["response"]["status_code"], 200);
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        // The same request, sent interactively, answers the same (greedy).
        let (status, interactive) = post_json(
            http,
            &server.url("/v1/chat/completions"),
            &greedy_chat(question, 8),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            body["choices"][0]["message"]["content"],
            interactive["choices"][0]["message"]["content"],
            "{question}"
        );
        assert_eq!(
            body["usage"]["completion_tokens"],
            interactive["usage"]["completion_tokens"]
        );
        assert_eq!(
            body["usage"]["prompt_tokens"],
            interactive["usage"]["prompt_tokens"]
        );
    }

    let errors = file_lines(http, base, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 3);
    let expect = [
        ("bad-temperature", 400, "temperature"),
        ("unknown-model", 404, "model"),
        ("streaming", 400, "stream"),
    ];
    for (custom_id, status, param) in expect {
        let line = by_custom_id(&errors, custom_id);
        assert_eq!(line["response"]["status_code"], status, "{line}");
        assert_eq!(line["response"]["body"]["error"]["param"], param, "{line}");
        assert_eq!(
            line["response"]["body"]["error"]["type"],
            "invalid_request_error"
        );
    }

    let metrics = server.metrics().await;
    assert_eq!(
        metrics.model_value("heddle_batch_lines_completed_total", MODEL),
        4.0
    );
    assert_eq!(
        metrics.model_value("heddle_batch_lines_failed_total", MODEL),
        2.0
    );
    assert_eq!(
        metrics.model_value("heddle_batch_lines_failed_total", "unknown"),
        1.0
    );
    assert_eq!(
        metrics.model_value("heddle_batch_lines_running", MODEL),
        0.0
    );
    assert_eq!(metrics.model_value("heddle_batch_lines_queued", MODEL), 0.0);
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_completions_batch_answers_like_the_interactive_api() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let (http, base) = (&server.http, server.base.as_str());
    let body =
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0});
    let line =
        json!({"custom_id": "story", "method": "POST", "url": "/v1/completions", "body": body});
    let (_, file) = upload(http, base, "batch", &jsonl(&[line])).await;
    let batch = create_batch(http, base, file["id"].as_str().unwrap(), "/v1/completions").await;
    let done = wait_for(
        http,
        base,
        batch["id"].as_str().unwrap(),
        &["completed", "failed"],
    )
    .await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 1, "completed": 1, "failed": 0}),
        "{done}"
    );
    assert!(done["error_file_id"].is_null());
    let output = file_lines(http, base, &done["output_file_id"]).await;
    let (_, interactive) = post_json(http, &server.url("/v1/completions"), &body).await;
    let answered = &output[0]["response"]["body"];
    assert_eq!(answered["object"], "text_completion");
    assert_eq!(
        answered["choices"][0]["text"],
        interactive["choices"][0]["text"]
    );
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_invalid_input_file_fails_the_batch_with_every_line_error() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let (http, base) = (&server.http, server.base.as_str());
    let content = [
        chat_line("a", greedy_chat("x", 2)).to_string(),
        "{not json".to_string(),
        chat_line("a", greedy_chat("y", 2)).to_string(),
        json!({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {}})
            .to_string(),
    ]
    .join("\n");
    let (_, file) = upload(http, base, "batch", content.as_bytes()).await;
    let batch = create_batch(
        http,
        base,
        file["id"].as_str().unwrap(),
        "/v1/chat/completions",
    )
    .await;
    let done = wait_for(
        http,
        base,
        batch["id"].as_str().unwrap(),
        &["completed", "failed"],
    )
    .await;
    assert_eq!(done["status"], "failed");
    assert!(done["failed_at"].as_u64().is_some());
    assert!(done["output_file_id"].is_null() && done["error_file_id"].is_null());
    assert_eq!(
        done["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );
    assert_eq!(done["errors"]["object"], "list");
    let found: Vec<(String, u64)> = done["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["code"].as_str().unwrap().to_string(),
                e["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("invalid_json_line".to_string(), 2),
            ("duplicate_custom_id".to_string(), 3),
            ("invalid_url".to_string(), 4)
        ]
    );
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_batch_keeps_what_ran_and_lists_what_did_not() {
    let mut config = test_config(vec![model(MODEL)]);
    config.batch_lines_in_flight = 2;
    let server = start(config).await;
    let (http, base) = (&server.http, server.base.as_str());
    let lines: Vec<Value> = (0..40)
        .map(|i| {
            let mut body = greedy_chat(&format!("Tell me a long story number {i}."), 48);
            body["ignore_eos"] = json!(true);
            chat_line(&format!("s{i}"), body)
        })
        .collect();
    let (_, file) = upload(http, base, "batch", &jsonl(&lines)).await;
    let batch = create_batch(
        http,
        base,
        file["id"].as_str().unwrap(),
        "/v1/chat/completions",
    )
    .await;
    let id = batch["id"].as_str().unwrap();
    wait_for(http, base, id, &["in_progress"]).await;
    // Two slots: never more than two of its lines in the engine at once (the runner may
    // not have counted its lines yet at the first look).
    for _ in 0..5 {
        let metrics = server.metrics().await;
        let running = metrics.value("heddle_batch_lines_running", "model=\"smollm2\"");
        assert!(running.unwrap_or(0.0) <= 2.0, "{}", metrics.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, cancelling) =
        post_json(http, &format!("{base}/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(status, 200, "{cancelling}");
    assert!(["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()));
    let done = wait_for(http, base, id, &["cancelled"]).await;
    assert!(done["cancelled_at"].as_u64().is_some());
    let counts = &done["request_counts"];
    let completed = counts["completed"].as_u64().unwrap();
    assert!(completed < 40, "{done}");
    assert_eq!(counts["total"], 40);
    // Every line is accounted for once: in the output, or in the error file as cancelled.
    let mut seen = HashSet::new();
    if !done["output_file_id"].is_null() {
        for line in file_lines(http, base, &done["output_file_id"]).await {
            assert!(seen.insert(line["custom_id"].to_string()));
        }
    }
    let errors = file_lines(http, base, &done["error_file_id"]).await;
    for line in &errors {
        assert_eq!(line["error"]["code"], "batch_cancelled", "{line}");
        assert!(line["response"].is_null());
        assert!(seen.insert(line["custom_id"].to_string()));
    }
    assert_eq!(seen.len(), 40);
    assert_eq!(errors.len() as u64, 40 - completed);
    // Once cancelled, the engine holds none of its lines.
    let metrics = server.metrics().await;
    assert_eq!(
        metrics.model_value("heddle_batch_lines_running", MODEL),
        0.0
    );
    assert_eq!(metrics.model_value("heddle_batch_lines_queued", MODEL), 0.0);
    // Cancelling again answers the batch as it is; a completed batch cannot be cancelled.
    let (status, again) =
        post_json(http, &format!("{base}/v1/batches/{id}/cancel"), &json!({})).await;
    assert_eq!(
        (status.as_u16(), again["status"].as_str()),
        (200, Some("cancelled"))
    );
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn files_and_batches_list_page_and_refuse_what_they_do_not_take() {
    let mut config = test_config(vec![model(MODEL)]);
    config.max_body_bytes = 64 * 1024;
    let server = start(config).await;
    let (http, base) = (&server.http, server.base.as_str());
    let content = jsonl(&[chat_line("a", greedy_chat("Hi.", 2))]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, file) = upload(http, base, "batch", &content).await;
        assert_eq!(status, 200);
        ids.push(file["id"].as_str().unwrap().to_string());
    }
    // Newest first, two per page.
    let (_, page) = get_json(http, &format!("{base}/v1/files?limit=2")).await;
    assert_eq!(page["object"], "list");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["first_id"], ids[2]);
    assert_eq!(page["last_id"], ids[1]);
    let (_, rest) = get_json(http, &format!("{base}/v1/files?limit=2&after={}", ids[1])).await;
    assert_eq!(rest["data"].as_array().unwrap().len(), 1);
    assert_eq!(rest["data"][0]["id"], ids[0]);
    assert_eq!(rest["has_more"], false);
    let (_, oldest) = get_json(http, &format!("{base}/v1/files?order=asc&limit=1")).await;
    assert_eq!(oldest["data"][0]["id"], ids[0]);
    let (status, body) = get_json(http, &format!("{base}/v1/files?colour=red")).await;
    assert_error(status, &body, 400, "invalid_request_error");
    assert_eq!(body["error"]["param"], "colour");

    let (status, file) = get_json(http, &format!("{base}/v1/files/{}", ids[0])).await;
    assert_eq!(
        (status.as_u16(), file["filename"].as_str()),
        (200, Some("input.jsonl"))
    );
    let content_back = http
        .get(format!("{base}/v1/files/{}/content", ids[0]))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(content_back.as_ref(), content.as_slice());
    let deleted = http
        .delete(format!("{base}/v1/files/{}", ids[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let deleted: Value = deleted.json().await.unwrap();
    assert_eq!(
        deleted,
        json!({"id": ids[0], "object": "file", "deleted": true})
    );
    let (status, body) = get_json(http, &format!("{base}/v1/files/{}", ids[0])).await;
    assert_error(status, &body, 404, "invalid_request_error");

    // Over the body limit: 413 before the upload is read.
    let (status, body) = upload(http, base, "batch", &vec![b'x'; 100 * 1024]).await;
    assert_error(status, &body, 413, "invalid_request_error");
    let (status, body) = upload(http, base, "fine-tune", &content).await;
    assert_error(status, &body, 400, "invalid_request_error");
    assert_eq!(body["error"]["param"], "purpose");

    let batches = format!("{base}/v1/batches");
    let create = |fields: Value| {
        let mut body = json!({"input_file_id": ids[1], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
        body.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        body
    };
    for (fields, status, param) in [
        (json!({"input_file_id": "file-none"}), 404, "id"),
        (json!({"endpoint": "/v1/embeddings"}), 400, "endpoint"),
        (json!({"completion_window": "1h"}), 400, "completion_window"),
        (json!({"metadata": {"k": 1}}), 400, "metadata"),
        (
            json!({"output_expires_after": {"anchor": "created_at", "seconds": 3600}}),
            400,
            "output_expires_after",
        ),
    ] {
        let (got, body) = post_json(http, &batches, &create(fields.clone())).await;
        assert_error(got, &body, status, "invalid_request_error");
        assert_eq!(body["error"]["param"], param, "{fields}");
    }
    let mut batch_ids = Vec::new();
    for file in &ids[1..] {
        let batch = create_batch(http, base, file, "/v1/chat/completions").await;
        batch_ids.push(batch["id"].as_str().unwrap().to_string());
    }
    let (_, page) = get_json(http, &format!("{batches}?limit=1")).await;
    assert_eq!(page["data"][0]["id"], batch_ids[1]);
    assert_eq!(page["has_more"], true);
    let (_, rest) = get_json(http, &format!("{batches}?limit=1&after={}", batch_ids[1])).await;
    assert_eq!(rest["data"][0]["id"], batch_ids[0]);
    assert_eq!(rest["has_more"], false);
    let (status, body) = get_json(http, &format!("{batches}?limit=101")).await;
    assert_error(status, &body, 400, "invalid_request_error");
    let (status, body) = get_json(http, &format!("{batches}/batch_none")).await;
    assert_error(status, &body, 404, "invalid_request_error");
    for id in &batch_ids {
        wait_for(http, base, id, &["completed"]).await;
    }
    let (status, body) = post_json(
        http,
        &format!("{batches}/{}/cancel", batch_ids[0]),
        &json!({}),
    )
    .await;
    assert_error(status, &body, 409, "invalid_request_error");
    server.server.shutdown().await.unwrap();
}

/// A client that sends `key` with every request.
fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = format!("Bearer {key}").parse().expect("a header value");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("a client")
}

#[tokio::test]
async fn each_api_key_sees_only_its_own_files_and_batches() {
    let mut config = test_config(vec![model(MODEL)]);
    config.api_keys = ["sk-alice", "sk-bob"]
        .map(|key| ApiKey {
            key: key.into(),
            tier: KeyTier::any(),
        })
        .to_vec();
    let server = start(config).await;
    let base = server.base.as_str();
    let (alice, bob, admin) = (
        client_with_key("sk-alice"),
        client_with_key("sk-bob"),
        client_with_key(ADMIN_KEY),
    );
    let content = jsonl(&[chat_line("a", greedy_chat("Hi.", 2))]);
    let (status, file) = upload(&alice, base, "batch", &content).await;
    assert_eq!(status, 200, "{file}");
    let file_id = file["id"].as_str().unwrap();
    let batch = create_batch(&alice, base, file_id, "/v1/chat/completions").await;
    let batch_id = batch["id"].as_str().unwrap();

    // To another key, alice's file and batch do not exist.
    for path in [
        format!("/v1/files/{file_id}"),
        format!("/v1/files/{file_id}/content"),
        format!("/v1/batches/{batch_id}"),
    ] {
        let response = bob.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    let response = bob
        .delete(format!("{base}/v1/files/{file_id}"))
        .send()
        .await;
    assert_eq!(response.unwrap().status(), 404);
    let cancel = format!("{base}/v1/batches/{batch_id}/cancel");
    let (status, body) = post_json(&bob, &cancel, &json!({})).await;
    assert_error(status, &body, 404, "invalid_request_error");
    let (status, body) = post_json(
        &bob,
        &format!("{base}/v1/batches"),
        &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                "completion_window": "24h"}),
    )
    .await;
    assert_error(status, &body, 404, "invalid_request_error");
    for list in ["/v1/files", "/v1/batches"] {
        let (_, page) = get_json(&bob, &format!("{base}{list}")).await;
        assert_eq!(page["data"], json!([]), "{list}");
        let (_, page) = get_json(&admin, &format!("{base}{list}")).await;
        assert_eq!(page["data"].as_array().unwrap().len(), 1, "{list}");
    }

    // Alice's results are hers too.
    let done = wait_for(&alice, base, batch_id, &["completed"]).await;
    let output = done["output_file_id"].as_str().unwrap();
    assert_eq!(
        file_lines(&alice, base, &done["output_file_id"])
            .await
            .len(),
        1
    );
    let response = bob
        .get(format!("{base}/v1/files/{output}/content"))
        .send()
        .await;
    assert_eq!(response.unwrap().status(), 404);
    let (status, _) = get_json(&admin, &format!("{base}/v1/files/{output}")).await;
    assert_eq!(status, 200);
    server.server.shutdown().await.unwrap();
}

/// A `heddle serve` child process on a free loopback port.
struct ServeProcess {
    child: Child,
    base: String,
}

impl ServeProcess {
    fn start(data_dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_heddle"))
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .arg("--model")
            .arg(format!("{MODEL}={}", model_path().display()))
            .args([
                "--pin",
                MODEL,
                "--batch-lines-in-flight",
                "4",
                "--max-running",
                "8",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .env("HEDDLE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("heddle serve starts");
        let stderr = child.stderr.take().unwrap();
        let (address_tx, address_rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(address) = line.split("listening on ").nth(1) {
                    let _ = address_tx.send(address.trim().to_string());
                }
            }
        });
        let base = address_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server says where it listens");
        ServeProcess { child, base }
    }

    /// SIGKILL: no shutdown, no flush, nothing but what is already committed survives.
    fn kill_hard(mut self) {
        self.child.kill().expect("the kill is delivered");
        self.child.wait().expect("the child is reaped");
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("heddle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test]
async fn a_batch_survives_kill_9_with_every_line_answered_exactly_once() {
    const LINES: usize = 32;
    let data_dir = temp_dir("batch-restart");
    let http = reqwest::Client::new();
    let first = ServeProcess::start(&data_dir);
    let lines: Vec<Value> = (0..LINES)
        .map(|i| {
            let mut body = greedy_chat(&format!("Write line {i} of a poem."), 16);
            body["ignore_eos"] = json!(true);
            chat_line(&format!("line-{i}"), body)
        })
        .collect();
    let (status, file) = upload(&http, &first.base, "batch", &jsonl(&lines)).await;
    assert_eq!(status, 200, "{file}");
    let batch = create_batch(
        &http,
        &first.base,
        file["id"].as_str().unwrap(),
        "/v1/chat/completions",
    )
    .await;
    let id = batch["id"].as_str().unwrap().to_string();
    // Kill it once some lines have results and others are still to run.
    let deadline = Instant::now() + BATCH_TIMEOUT;
    let completed_at_kill = loop {
        let (_, now) = get_json(&http, &format!("{}/v1/batches/{id}", first.base)).await;
        let completed = now["request_counts"]["completed"].as_u64().unwrap();
        if completed >= 4 {
            break completed;
        }
        assert!(Instant::now() < deadline, "no progress: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    first.kill_hard();
    assert!(
        completed_at_kill < LINES as u64,
        "the kill came too late to test a resume"
    );

    let second = ServeProcess::start(&data_dir);
    let done = wait_for(&http, &second.base, &id, &["completed", "failed"]).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": LINES, "completed": LINES, "failed": 0})
    );
    assert!(done["error_file_id"].is_null());
    let output = file_lines(&http, &second.base, &done["output_file_id"]).await;
    assert_eq!(output.len(), LINES, "one result per line");
    let custom_ids: HashSet<String> = output
        .iter()
        .map(|line| line["custom_id"].as_str().unwrap().to_string())
        .collect();
    let expected: HashSet<String> = (0..LINES).map(|i| format!("line-{i}")).collect();
    assert_eq!(custom_ids, expected, "no line lost, none twice");
    for line in &output {
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["response"]["body"]["usage"]["completion_tokens"], 16);
    }
    drop(second);
    std::fs::remove_dir_all(&data_dir).unwrap();
}
