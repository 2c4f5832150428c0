//! What the end-to-end API tests share: servers on free loopback ports with the real
//! embedded model, an SSE reader, and /metrics parsing.
#![allow(dead_code)] // each test binary uses its own part of this module

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use heddle_core::SchedulerConfig;
use heddle_server::config::ServerConfig;
use heddle_server::pool::ModelSpec;
use heddle_server::serve::{self, RunningServer};
use serde_json::Value;

/// The embedded model (fetched by scripts/fetch-model.sh, which scripts/test.sh runs).
pub fn model_path() -> PathBuf {
    heddle_model::embedded_model_path().expect("the embedded model; run scripts/fetch-model.sh")
}

pub fn model(id: &str) -> ModelSpec {
    ModelSpec {
        id: id.into(),
        path: model_path(),
        pinned: false,
        aliases: Vec::new(),
    }
}

/// The admin key of [`test_config`]'s servers.
pub const ADMIN_KEY: &str = "sk-test-admin";

/// A configuration for tests: a free loopback port, small scheduler limits, a short
/// shutdown grace, an admin key, and no API keys (the /v1 routes are open).
pub fn test_config(models: Vec<ModelSpec>) -> ServerConfig {
    let mut config = ServerConfig::with_models(models);
    config.port = 0;
    config.admin_api_keys = vec![ADMIN_KEY.into()];
    config.shutdown_grace = Duration::from_secs(5);
    config.scheduler = SchedulerConfig {
        max_running: 8,
        max_batched_tokens: 512,
        prefill_chunk: 256,
        num_blocks: 256,
        block_size: 16,
        queue_capacity: Some(64),
        max_model_len: 2048,
        ..SchedulerConfig::default()
    };
    config
}

/// A server owned by one test, on that test's runtime.
pub struct TestServer {
    pub server: RunningServer,
    pub base: String,
    pub http: reqwest::Client,
}

pub async fn start(config: ServerConfig) -> TestServer {
    let server = serve::start(config).await.expect("the server starts");
    let base = format!("http://{}", server.local_addr());
    TestServer {
        server,
        base,
        http: reqwest::Client::new(),
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn metrics(&self) -> Metrics {
        fetch_metrics(&self.http, &self.base).await
    }
}

/// A server shared by every test of one test binary. It runs on its own runtime, which
/// outlives the tests' per-test runtimes.
pub struct SharedServer {
    pub base: String,
    _server: RunningServer,
    _runtime: tokio::runtime::Runtime,
}

pub fn shared_server(
    cell: &'static OnceLock<SharedServer>,
    config: impl FnOnce() -> ServerConfig,
) -> &'static SharedServer {
    cell.get_or_init(|| {
        let config = config();
        // Built on a thread of its own: tests call this from inside their runtime, where
        // another runtime cannot block.
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a runtime");
            let server = runtime
                .block_on(serve::start(config))
                .expect("the server starts");
            SharedServer {
                base: format!("http://{}", server.local_addr()),
                _server: server,
                _runtime: runtime,
            }
        })
        .join()
        .expect("the shared server starts")
    })
}

impl SharedServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// Posts JSON and returns the status and the body as JSON.
pub async fn post_json(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> (reqwest::StatusCode, Value) {
    let response = http.post(url).json(body).send().await.expect("answered");
    let status = response.status();
    let body = response.json().await.expect("a JSON body");
    (status, body)
}

/// Gets a URL and returns the status and the body as JSON.
pub async fn get_json(http: &reqwest::Client, url: &str) -> (reqwest::StatusCode, Value) {
    let response = http.get(url).send().await.expect("answered");
    let status = response.status();
    (status, response.json().await.expect("a JSON body"))
}

/// Asserts an OpenAI-format error body with the given status and type.
pub fn assert_error(status: reqwest::StatusCode, body: &Value, expected: u16, kind: &str) {
    assert_eq!(status.as_u16(), expected, "{body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], kind, "{body}");
    assert!(
        error.get("param").is_some() && error.get("code").is_some(),
        "{body}"
    );
}

/// Reads `data:` payloads of a server-sent-event response as they arrive.
pub struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    /// The next event's data, or None at the end of the body.
    pub async fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|line| line.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() {
                    return Some(data.join("\n"));
                }
                continue;
            }
            let chunk = self.response.chunk().await.expect("the stream reads")?;
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Every remaining payload, `[DONE]` included.
    pub async fn collect(mut self) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(data) = self.next_data().await {
            all.push(data);
        }
        all
    }
}

/// The samples of a /metrics page.
pub struct Metrics(pub String);

pub async fn fetch_metrics(http: &reqwest::Client, base: &str) -> Metrics {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("metrics text");
    Metrics(text)
}

impl Metrics {
    /// The value of the sample `name{labels}` (labels written as in the page).
    pub fn value(&self, name: &str, labels: &str) -> Option<f64> {
        let key = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{labels}}}")
        };
        self.0.lines().find_map(|line| {
            let (sample, value) = line.rsplit_once(' ')?;
            (sample == key).then(|| value.parse().ok()).flatten()
        })
    }

    pub fn model_value(&self, name: &str, model: &str) -> f64 {
        self.value(name, &format!("model=\"{model}\""))
            .unwrap_or_else(|| panic!("{name} for {model} in:\n{}", self.0))
    }
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One HTTP/1 response read off a raw connection.
pub struct RawResponse {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// Reads one response with a Content-Length body.
pub async fn read_response(stream: &mut tokio::net::TcpStream) -> std::io::Result<RawResponse> {
    use tokio::io::AsyncReadExt;
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        data.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().expect("a length"));
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        body.extend_from_slice(&chunk[..read]);
    }
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// Whether the server closes the connection within `limit` (what it sends is discarded).
pub async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 4096];
    let until_closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, until_closed).await.is_ok()
}
