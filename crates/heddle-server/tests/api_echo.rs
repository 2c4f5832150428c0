//! `echo` with `logprobs` on /v1/completions (what lm-evaluation-harness's loglikelihood
//! tasks send), on the real embedded model behind the real server: the scored prompt
//! agrees with the generation's own log-probabilities, whatever the chunking, the prefix
//! cache or the batch around it.

mod api_support;

use std::sync::OnceLock;

use api_support::{
    assert_error, model, post_json, shared_server, test_config, SharedServer, SseReader,
};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";
const PROMPT: &str = "The capital of France is Paris. The capital of Italy is";

fn server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    shared_server(&SERVER, || test_config(vec![model(MODEL)]))
}

/// A server whose prefills are cut into chunks of 16 tokens.
fn chunked_server() -> &'static SharedServer {
    static SERVER: OnceLock<SharedServer> = OnceLock::new();
    shared_server(&SERVER, || {
        let mut config = test_config(vec![model(MODEL)]);
        config.scheduler.max_batched_tokens = 16;
        config.scheduler.prefill_chunk = 16;
        config
    })
}

async fn complete(server: &SharedServer, fields: Value) -> (u16, Value) {
    let mut body = json!({"model": MODEL, "temperature": 0});
    body.as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server.url("/v1/completions"),
        &body,
    )
    .await;
    (status.as_u16(), body)
}

async fn tokenize(text: &str) -> Vec<u64> {
    let (status, body) = post_json(
        &reqwest::Client::new(),
        &server().url("/tokenize"),
        &json!({"model": MODEL, "prompt": text}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// The scored `token_logprobs` of an echo request with `max_tokens: 0`.
async fn score(server: &SharedServer, prompt: Value) -> Vec<Option<f64>> {
    let (status, body) = complete(
        server,
        json!({"prompt": prompt, "echo": true, "logprobs": 2, "max_tokens": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    token_logprobs(&body["choices"][0])
}

fn token_logprobs(choice: &Value) -> Vec<Option<f64>> {
    choice["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs in {choice}"))
        .iter()
        .map(Value::as_f64)
        .collect()
}

fn assert_close(a: &[Option<f64>], b: &[Option<f64>], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        match (x, y) {
            (Some(x), Some(y)) => assert!((x - y).abs() < 1e-4, "{what}: token {i}: {x} vs {y}"),
            (None, None) => {}
            _ => panic!("{what}: token {i}: {x:?} vs {y:?}"),
        }
    }
}

#[tokio::test]
async fn max_tokens_zero_echoes_the_scored_prompt_and_generates_nothing() {
    let tokens = tokenize(PROMPT).await;
    let (status, body) = complete(
        server(),
        json!({"prompt": PROMPT, "echo": true, "logprobs": 3, "max_tokens": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["text"], PROMPT);
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 0);
    assert_eq!(body["usage"]["prompt_tokens"], tokens.len());
    let logprobs = &choice["logprobs"];
    let pieces: Vec<&str> = logprobs["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(pieces.len(), tokens.len());
    assert!(logprobs["token_logprobs"][0].is_null(), "{logprobs}");
    assert!(logprobs["top_logprobs"][0].is_null(), "{logprobs}");
    let scored = token_logprobs(choice);
    assert!(scored[1..].iter().all(|l| l.is_some_and(|l| l <= 0.0)));
    for top in &logprobs["top_logprobs"].as_array().unwrap()[1..] {
        assert_eq!(top.as_object().unwrap().len(), 3, "{top}");
    }
    // Each token's text starts at its offset in the echoed text.
    let offsets: Vec<usize> = logprobs["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    let chars: Vec<char> = PROMPT.chars().collect();
    let mut expected = 0;
    for (piece, &offset) in pieces.iter().zip(&offsets) {
        assert_eq!(offset, expected, "{offsets:?}");
        let text: String = chars[offset..].iter().take(piece.chars().count()).collect();
        // Byte-level pieces show a space as 'Ġ'.
        assert_eq!(piece.replace('Ġ', " "), text);
        expected += piece.chars().count();
    }
    assert_eq!(expected, chars.len());
}

#[tokio::test]
async fn scored_tokens_have_the_log_probabilities_their_generation_had() {
    let (status, generated) = complete(
        server(),
        json!({"prompt": PROMPT, "logprobs": 2, "max_tokens": 8}),
    )
    .await;
    assert_eq!(status, 200, "{generated}");
    let generated = &generated["choices"][0];
    let generated_logprobs = token_logprobs(generated);
    let generated_text = generated["text"].as_str().unwrap();

    // Echo with generation: the prompt's entries, then the generated ones as without echo.
    let mut prompt = tokenize(PROMPT).await;
    let prompt_len = prompt.len();
    let (status, echoed) = complete(
        server(),
        json!({"prompt": PROMPT, "logprobs": 2, "max_tokens": 8, "echo": true}),
    )
    .await;
    assert_eq!(status, 200, "{echoed}");
    let echoed = &echoed["choices"][0];
    assert_eq!(echoed["text"], format!("{PROMPT}{generated_text}"));
    let with_echo = token_logprobs(echoed);
    assert_eq!(with_echo.len(), prompt_len + generated_logprobs.len());
    assert_close(
        &with_echo[prompt_len..],
        &generated_logprobs,
        "echo with generation",
    );
    let offsets = echoed["logprobs"]["text_offset"].as_array().unwrap();
    assert_eq!(offsets[prompt_len], PROMPT.chars().count(), "{offsets:?}");

    // Scoring prompt + generated tokens (given by id) gives the generation's numbers.
    prompt.extend(tokenize_ids(&generated["logprobs"]["tokens"]).await);
    let scored = score(server(), json!(prompt)).await;
    assert_eq!(scored[0], None);
    assert_close(
        &scored[prompt_len..],
        &generated_logprobs,
        "scored against generated",
    );
    assert_close(
        &scored[..prompt_len],
        &with_echo[..prompt_len],
        "the prompt's own",
    );
}

/// The ids of generated tokens, from their pieces: each piece is one token.
async fn tokenize_ids(pieces: &Value) -> Vec<u64> {
    let mut ids = Vec::new();
    for piece in pieces.as_array().unwrap() {
        let text = piece.as_str().unwrap().replace('Ġ', " ").replace('Ċ', "\n");
        let tokens = tokenize(&text).await;
        assert_eq!(tokens.len(), 1, "{piece} is one token");
        ids.push(tokens[0]);
    }
    ids
}

#[tokio::test]
async fn chunking_the_prefix_cache_and_a_busy_batch_change_nothing() {
    // 60-odd tokens: four chunks of 16 on the chunked server.
    let long = format!("{PROMPT} Rome. ").repeat(4);
    let alone = score(server(), json!(long)).await;
    assert!(alone.len() > 48, "{}", alone.len());
    assert_close(
        &score(chunked_server(), json!(long)).await,
        &alone,
        "chunked",
    );
    // The same prompt again: its blocks are cached now, but it is computed anew.
    assert_close(&score(server(), json!(long)).await, &alone, "repeated");
    // Inside a batch of other requests, generating and scoring.
    let busy = (0..4).map(|i| {
        complete(
            server(),
            json!({"prompt": format!("Story {i}: once upon a time"), "max_tokens": 24,
                   "temperature": 0.8, "seed": i}),
        )
    });
    let (scored, others) = tokio::join!(
        score(server(), json!(long)),
        futures_util::future::join_all(busy)
    );
    assert!(others.iter().all(|(status, _)| *status == 200));
    assert_close(&scored, &alone, "in a busy batch");
}

#[tokio::test]
async fn streamed_echo_sends_the_prompt_first() {
    let response = reqwest::Client::new()
        .post(server().url("/v1/completions"))
        .json(
            &json!({"model": MODEL, "prompt": PROMPT, "echo": true, "logprobs": 1,
                      "max_tokens": 3, "temperature": 0, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let chunks = SseReader::new(response).collect().await;
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["choices"][0]["text"], PROMPT);
    assert!(first["choices"][0]["logprobs"]["token_logprobs"][0].is_null());
    let text: String = chunks
        .iter()
        .filter(|c| c.as_str() != "[DONE]")
        .map(|c| {
            serde_json::from_str::<Value>(c).unwrap()["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let (_, whole) = complete(
        server(),
        json!({"prompt": PROMPT, "echo": true, "max_tokens": 3}),
    )
    .await;
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
}

#[tokio::test]
async fn max_tokens_zero_needs_echo() {
    let (status, body) = complete(server(), json!({"prompt": PROMPT, "max_tokens": 0})).await;
    assert_error(
        reqwest::StatusCode::from_u16(status).unwrap(),
        &body,
        400,
        "invalid_request_error",
    );
    assert_eq!(body["error"]["param"], "max_tokens");
    // Echo without logprobs: the prompt alone.
    let (status, body) = complete(
        server(),
        json!({"prompt": PROMPT, "echo": true, "max_tokens": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["text"], PROMPT);
    assert!(body["choices"][0]["logprobs"].is_null());
}
