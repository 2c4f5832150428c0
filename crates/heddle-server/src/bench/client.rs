//! A streaming client for OpenAI-compatible servers that times every chunk.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::ValueEnum;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};

use super::dataset::BenchPrompt;

/// Which OpenAI API the benchmark calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/v1/completions`, the prompt as text.
    Completions,
    /// `/v1/chat/completions`, the prompt as one user message.
    Chat,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        }
    }
}

/// What the server reported in a stream's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ReportedUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// The timing of one successful streamed response.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamTiming {
    /// From sending the request to the first chunk with generated text.
    pub ttft: Duration,
    /// From sending the request to the end of the stream.
    pub latency: Duration,
    /// Between successive chunks with generated text (one fewer than the chunks).
    pub chunk_gaps: Vec<Duration>,
    /// Chunks with generated text.
    pub content_chunks: usize,
    pub usage: Option<ReportedUsage>,
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestFailure {
    /// The server answered with a non-success HTTP status.
    Status { status: u16, message: String },
    /// No connection could be made (refused, unknown host, ...).
    Connect { url: String, reason: String },
    /// The connection broke, or the server took too long.
    Transport(String),
    /// The stream carried an error event, or a payload that is not JSON.
    Stream(String),
    /// The stream ended without generated text, so it has no time to first token.
    NoOutput,
}

impl RequestFailure {
    /// The key errors are counted under: the HTTP status, or the kind of failure.
    pub fn category(&self) -> String {
        match self {
            RequestFailure::Status { status, .. } => status.to_string(),
            RequestFailure::Connect { .. } => "connect".into(),
            RequestFailure::Transport(_) => "transport".into(),
            RequestFailure::Stream(_) => "stream_error".into(),
            RequestFailure::NoOutput => "no_output".into(),
        }
    }

    pub fn message(&self) -> String {
        match self {
            RequestFailure::Status { status, message } => format!("HTTP {status}: {message}"),
            RequestFailure::Connect { url, reason } => format!("cannot connect to {url}: {reason}"),
            RequestFailure::Transport(message) | RequestFailure::Stream(message) => message.clone(),
            RequestFailure::NoOutput => "the stream ended without generated text".into(),
        }
    }
}

/// How much of an error body a failure keeps.
const ERROR_BODY_CHARS: usize = 300;
/// How often readiness is polled.
const READY_POLL: Duration = Duration::from_millis(250);

/// Request settings shared by every request of a run.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub base_url: String,
    pub endpoint: Endpoint,
    pub model: String,
    pub api_key: Option<String>,
    pub ignore_eos: bool,
    pub temperature: f64,
    pub request_timeout: Duration,
}

/// Sends benchmark requests to one server.
#[derive(Debug, Clone)]
pub struct BenchClient {
    http: reqwest::Client,
    settings: ClientSettings,
    endpoint_url: String,
}

impl BenchClient {
    pub fn new(mut settings: ClientSettings) -> anyhow::Result<Self> {
        settings.base_url = server_root(&settings.base_url).to_string();
        // A fresh connection per request: servers close idle keep-alive connections on
        // their own schedule (llama-server's cpp-httplib after a few requests or
        // seconds), and a request sent on one that is being closed fails for nothing.
        // A loopback connect costs microseconds.
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .pool_max_idle_per_host(0)
            .build()
            .context("building the HTTP client")?;
        let endpoint_url = format!("{}{}", settings.base_url, settings.endpoint.path());
        Ok(Self {
            http,
            settings,
            endpoint_url,
        })
    }

    /// The JSON body of a streamed request for `prompt`.
    pub fn request_body(&self, prompt: &BenchPrompt) -> Value {
        let settings = &self.settings;
        let mut body = json!({
            "model": settings.model,
            "max_tokens": prompt.output_len,
            "temperature": settings.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        match settings.endpoint {
            Endpoint::Completions => body["prompt"] = json!(prompt.text),
            Endpoint::Chat => {
                body["messages"] = json!([{"role": "user", "content": prompt.text}]);
            }
        }
        if settings.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(priority) = prompt.priority {
            body["priority"] = json!(priority.as_str());
        }
        body
    }

    /// Sends one request and reads its stream to the end, timing every chunk.
    pub async fn send(&self, prompt: &BenchPrompt) -> Result<StreamTiming, RequestFailure> {
        let body = self.request_body(prompt);
        let start = Instant::now();
        let response = self
            .authorized(self.http.post(&self.endpoint_url))
            .json(&body)
            .send()
            .await
            .map_err(|e| failure(&self.endpoint_url, &e))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            return Err(RequestFailure::Status {
                status: status.as_u16(),
                message: text.chars().take(ERROR_BODY_CHARS).collect(),
            });
        }

        let mut chunks = response.bytes_stream();
        let mut events = SseDecoder::default();
        let mut timing = ChunkTimer::new(start);
        while let Some(bytes) = chunks.next().await {
            let bytes = bytes.map_err(|e| RequestFailure::Transport(error_chain(&e)))?;
            let now = Instant::now();
            for data in events.push(&bytes) {
                if data == "[DONE]" {
                    continue;
                }
                let chunk: Value = serde_json::from_str(&data).map_err(|e| {
                    RequestFailure::Stream(format!("a chunk that is not JSON ({e}): {data}"))
                })?;
                timing.observe(&chunk, self.settings.endpoint, now)?;
            }
        }
        timing.finish(Instant::now())
    }

    /// Polls `GET /v1/models` until it answers 2xx or `timeout` passes (servers such as
    /// llama-server answer 503 while they load the model).
    pub async fn wait_until_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let url = self.models_url();
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.authorized(self.http.get(&url)).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => format!("{url} answered HTTP {}", response.status()),
                Err(e) => failure(&url, &e).message(),
            };
            if Instant::now() >= deadline {
                anyhow::bail!("not ready after {timeout:?}: {last}");
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Fails with one clear line when the server cannot be reached at all (`GET
    /// /v1/models`; any HTTP answer will do), before a run counts every request as failed.
    pub async fn check_reachable(&self) -> anyhow::Result<()> {
        let url = self.models_url();
        match self.authorized(self.http.get(&url)).send().await {
            Ok(_) => Ok(()),
            Err(e) => anyhow::bail!("{}", failure(&url, &e).message()),
        }
    }

    fn models_url(&self) -> String {
        format!("{}/v1/models", self.settings.base_url)
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.settings.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

/// The server's root from a base URL given with or without `/v1` and a trailing slash
/// (OpenAI clients are configured with `.../v1`).
fn server_root(base_url: &str) -> &str {
    let trimmed = base_url.trim_end_matches('/');
    trimmed
        .strip_suffix("/v1")
        .unwrap_or(trimmed)
        .trim_end_matches('/')
}

/// A request to `url` that got no answer.
fn failure(url: &str, error: &reqwest::Error) -> RequestFailure {
    if !error.is_connect() {
        return RequestFailure::Transport(error_chain(error));
    }
    // The last cause says why ("Connection refused (os error 111)", a DNS failure, ...).
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let reason = match cause.downcast_ref::<std::io::Error>() {
        Some(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => io.kind().to_string(),
        _ => cause.to_string(),
    };
    RequestFailure::Connect {
        url: url.to_string(),
        reason,
    }
}

/// reqwest's errors keep the interesting part (refused, reset, ...) in their sources.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Follows one stream's chunks: when generated text arrives, and the usage.
struct ChunkTimer {
    start: Instant,
    first_content: Option<Instant>,
    last_content: Option<Instant>,
    chunk_gaps: Vec<Duration>,
    content_chunks: usize,
    usage: Option<ReportedUsage>,
}

impl ChunkTimer {
    fn new(start: Instant) -> Self {
        Self {
            start,
            first_content: None,
            last_content: None,
            chunk_gaps: Vec::new(),
            content_chunks: 0,
            usage: None,
        }
    }

    /// Takes one chunk, received at `at`.
    fn observe(
        &mut self,
        chunk: &Value,
        endpoint: Endpoint,
        at: Instant,
    ) -> Result<(), RequestFailure> {
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return Err(RequestFailure::Stream(message));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            let count = |key: &str| usage.get(key).and_then(Value::as_u64).map(|n| n as usize);
            if let (Some(prompt_tokens), Some(completion_tokens)) =
                (count("prompt_tokens"), count("completion_tokens"))
            {
                self.usage = Some(ReportedUsage {
                    prompt_tokens,
                    completion_tokens,
                });
            }
        }
        // Chunks without choices (the usage chunk, servers' own extras) carry no text.
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return Ok(());
        };
        let has_text = choices.iter().any(|choice| {
            let text = match endpoint {
                Endpoint::Completions => choice.get("text"),
                Endpoint::Chat => choice.get("delta").and_then(|d| d.get("content")),
            };
            text.and_then(Value::as_str).is_some_and(|t| !t.is_empty())
        });
        if has_text {
            if let Some(last) = self.last_content {
                self.chunk_gaps.push(at - last);
            }
            self.first_content.get_or_insert(at);
            self.last_content = Some(at);
            self.content_chunks += 1;
        }
        Ok(())
    }

    fn finish(self, end: Instant) -> Result<StreamTiming, RequestFailure> {
        let first = self.first_content.ok_or(RequestFailure::NoOutput)?;
        Ok(StreamTiming {
            ttft: first - self.start,
            latency: end - self.start,
            chunk_gaps: self.chunk_gaps,
            content_chunks: self.content_chunks,
            usage: self.usage,
        })
    }
}

/// Splits a server-sent-event byte stream into the data of its events, however the
/// bytes are cut into network reads.
#[derive(Debug, Default)]
struct SseDecoder {
    pending: Vec<u8>,
}

impl SseDecoder {
    /// Adds bytes; returns the data of every event they complete.
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        // Carriage returns only ever end lines in SSE (JSON escapes its own), so
        // dropping them turns CRLF framing into LF framing.
        self.pending
            .extend(bytes.iter().copied().filter(|&b| b != b'\r'));
        let mut events = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|data| data.strip_prefix(' ').unwrap_or(data))
                .collect();
            if !data.is_empty() {
                events.push(data.join("\n"));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_survive_any_split() {
        let stream = b"data: {\"a\":1}\r\n\r\n: keep-alive\n\ndata: {\"b\":\ndata: 2}\n\nevent: x\ndata: [DONE]\n\n";
        let expected = vec!["{\"a\":1}", "{\"b\":\n2}", "[DONE]"];
        for cut in 1..stream.len() {
            let mut decoder = SseDecoder::default();
            let mut events = decoder.push(&stream[..cut]);
            events.extend(decoder.push(&stream[cut..]));
            assert_eq!(events, expected, "cut at {cut}");
        }
        let mut decoder = SseDecoder::default();
        let one_by_one: Vec<String> = stream.iter().flat_map(|b| decoder.push(&[*b])).collect();
        assert_eq!(one_by_one, expected);
    }

    fn at(start: Instant, millis: u64) -> Instant {
        start + Duration::from_millis(millis)
    }

    #[test]
    fn chunk_timer_measures_ttft_gaps_and_usage() {
        let start = Instant::now();
        let mut timer = ChunkTimer::new(start);
        let chat = Endpoint::Chat;
        // The role-only first chunk of a chat stream carries no text: not the first token.
        timer
            .observe(
                &json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]}),
                chat,
                at(start, 5),
            )
            .unwrap();
        for (millis, text) in [(40, "Hel"), (50, "lo"), (65, " there")] {
            let chunk = json!({"choices": [{"delta": {"content": text}}]});
            timer.observe(&chunk, chat, at(start, millis)).unwrap();
        }
        timer
            .observe(
                &json!({"choices": [{"delta": {}, "finish_reason": "length"}]}),
                chat,
                at(start, 66),
            )
            .unwrap();
        timer
            .observe(
                &json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}}),
                chat,
                at(start, 67),
            )
            .unwrap();
        let timing = timer.finish(at(start, 70)).unwrap();
        assert_eq!(timing.ttft, Duration::from_millis(40));
        assert_eq!(timing.latency, Duration::from_millis(70));
        assert_eq!(
            timing.chunk_gaps,
            [Duration::from_millis(10), Duration::from_millis(15)]
        );
        assert_eq!(timing.content_chunks, 3);
        assert_eq!(
            timing.usage,
            Some(ReportedUsage {
                prompt_tokens: 9,
                completion_tokens: 3
            })
        );
    }

    #[test]
    fn chunk_timer_reads_completion_text_and_reports_failures() {
        let start = Instant::now();
        let mut timer = ChunkTimer::new(start);
        let completions = Endpoint::Completions;
        timer
            .observe(
                &json!({"choices": [{"text": "x"}]}),
                completions,
                at(start, 3),
            )
            .unwrap();
        let error = timer
            .observe(
                &json!({"error": {"message": "out of blocks", "type": "server_error"}}),
                completions,
                at(start, 4),
            )
            .unwrap_err();
        assert_eq!(error, RequestFailure::Stream("out of blocks".into()));
        assert_eq!(error.category(), "stream_error");

        let silent = ChunkTimer::new(start);
        assert_eq!(
            silent.finish(at(start, 9)).unwrap_err(),
            RequestFailure::NoOutput
        );
    }

    #[test]
    fn request_bodies_carry_the_benchmark_fields() {
        let client = BenchClient::new(ClientSettings {
            base_url: "http://127.0.0.1:1/".into(),
            endpoint: Endpoint::Chat,
            model: "m".into(),
            api_key: None,
            ignore_eos: true,
            temperature: 0.0,
            request_timeout: Duration::from_secs(5),
        })
        .unwrap();
        assert_eq!(
            client.endpoint_url,
            "http://127.0.0.1:1/v1/chat/completions"
        );
        let prompt = BenchPrompt {
            text: "hi".into(),
            prompt_tokens: 1,
            output_len: 4,
            priority: Some(heddle_core::Priority::Low),
        };
        let body = client.request_body(&prompt);
        assert_eq!(body["messages"], json!([{"role": "user", "content": "hi"}]));
        assert_eq!(body["max_tokens"], 4);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["ignore_eos"], true);
        assert_eq!(body["priority"], "low");
        assert!(body.get("prompt").is_none());
    }

    #[test]
    fn the_base_url_may_name_v1_and_end_in_a_slash() {
        for url in [
            "http://127.0.0.1:8080",
            "http://127.0.0.1:8080/",
            "http://127.0.0.1:8080/v1",
            "http://127.0.0.1:8080/v1/",
        ] {
            assert_eq!(server_root(url), "http://127.0.0.1:8080", "{url}");
        }
        assert_eq!(server_root("http://host/proxy/v1"), "http://host/proxy");
        assert_eq!(server_root("http://host/v1beta"), "http://host/v1beta");
    }

    #[tokio::test]
    async fn a_refused_connection_is_one_clear_failure() {
        // Port 1 on loopback: nothing listens there.
        let client = BenchClient::new(ClientSettings {
            base_url: "http://127.0.0.1:1/v1/".into(),
            endpoint: Endpoint::Completions,
            model: "m".into(),
            api_key: Some("key".into()),
            ignore_eos: false,
            temperature: 0.0,
            request_timeout: Duration::from_secs(5),
        })
        .unwrap();
        let prompt = BenchPrompt {
            text: "hi".into(),
            prompt_tokens: 1,
            output_len: 1,
            priority: None,
        };
        let failure = client.send(&prompt).await.unwrap_err();
        assert_eq!(failure.category(), "connect", "{failure:?}");
        assert_eq!(
            failure.message(),
            "cannot connect to http://127.0.0.1:1/v1/completions: connection refused"
        );
        let unreachable = client.check_reachable().await.unwrap_err();
        assert_eq!(
            unreachable.to_string(),
            "cannot connect to http://127.0.0.1:1/v1/models: connection refused"
        );
        let not_ready = client
            .wait_until_ready(Duration::from_millis(10))
            .await
            .unwrap_err();
        assert!(not_ready.to_string().ends_with("connection refused"));
    }
}
