//! Bounded work per connection, end to end: header, body and idle timeouts, the
//! connection cap, oversized bodies, shutdown with stalled clients, and SSE keep-alive
//! comments. (Thousands of stalled connections under a low open-file limit:
//! api_stalled_connections.rs.)

mod api_support;

use std::time::{Duration, Instant};

use api_support::{closed_within, model, read_response, start, test_config, SseReader, TestServer};
use axum::body::Bytes;
use futures_util::FutureExt;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const MODEL: &str = "smollm2";

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.server.local_addr())
        .await
        .expect("connects")
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: heddle\r\n\r\n";

#[tokio::test]
async fn silent_half_sent_and_trickled_heads_are_cut_at_the_header_timeout() {
    let mut config = test_config(vec![model(MODEL)]);
    config.http.header_read_timeout = Duration::from_millis(400);
    let server = start(config).await;

    let started = Instant::now();
    let mut silent = connect(&server).await;
    let mut half = connect(&server).await;
    half.write_all(b"GET /health HTTP/1.1\r\nHost: heddle\r\nUser-Ag")
        .await
        .unwrap();
    // One byte every 100 ms: each read is quick, the head never ends.
    let mut trickle = connect(&server).await;
    let (mut reader, mut writer) = trickle.split();
    let trickling = async {
        for byte in b"GET /health HTTP/1.1\r\nHost: heddle\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa" {
            if writer.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let closed = async {
        let mut sink = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(3), async {
            use tokio::io::AsyncReadExt;
            while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await
        .is_ok()
    };
    let (trickle_closed, ()) = tokio::join!(closed, trickling);
    assert!(
        trickle_closed,
        "a trickled head outlives the header timeout"
    );
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    assert!(closed_within(&mut half, Duration::from_secs(3)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(350),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn keep_alive_connections_get_the_idle_timeout_between_requests() {
    let mut config = test_config(vec![model(MODEL)]);
    config.http.header_read_timeout = Duration::from_millis(300);
    config.http.idle_timeout = Duration::from_millis(1500);
    let server = start(config).await;

    let mut stream = connect(&server).await;
    stream.write_all(HEALTH).await.unwrap();
    assert_eq!(read_response(&mut stream).await.unwrap().status, 200);
    // Idle for longer than the header timeout, shorter than the idle timeout.
    tokio::time::sleep(Duration::from_millis(700)).await;
    stream.write_all(HEALTH).await.unwrap();
    assert_eq!(read_response(&mut stream).await.unwrap().status, 200);
    let idle_from = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
    let idled = idle_from.elapsed();
    assert!(
        idled >= Duration::from_millis(1300) && idled < Duration::from_secs(4),
        "closed after {idled:?} of idleness"
    );
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_body_that_stalls_or_trickles_is_408() {
    let mut config = test_config(vec![model(MODEL)]);
    config.http.body_read_timeout = Duration::from_millis(500);
    let server = start(config).await;

    let head = "POST /v1/completions HTTP/1.1\r\nHost: heddle\r\n\
                Content-Type: application/json\r\nContent-Length: 100\r\n\r\n";
    let mut stalled = connect(&server).await;
    stalled
        .write_all(format!("{head}{{\"model\": ").as_bytes())
        .await
        .unwrap();
    let mut trickled = connect(&server).await;
    trickled.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let trickling = async {
        for _ in 0..30 {
            if trickled.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        read_response(&mut trickled).await.unwrap()
    };
    let (stalled_answer, trickled_answer) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(3), read_response(&mut stalled)),
        tokio::time::timeout(Duration::from_secs(5), trickling),
    );
    for answer in [stalled_answer.unwrap().unwrap(), trickled_answer.unwrap()] {
        assert_eq!(answer.status, 408);
        let body = answer.json();
        assert_eq!(body["error"]["code"], "request_timeout", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    assert!(started.elapsed() >= Duration::from_millis(450));
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_declared_oversized_body_is_413_before_it_is_sent() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let mut stream = connect(&server).await;
    // Headers only: a server that waited for the body would never answer.
    stream
        .write_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: heddle\r\n\
              Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(3), read_response(&mut stream))
        .await
        .expect("answered before the body")
        .unwrap();
    assert_eq!(answer.status, 413);
    assert_eq!(answer.header("connection"), Some("close"));
    assert_eq!(answer.json()["error"]["code"], "request_too_large");
    server.server.shutdown().await.unwrap();
}

/// Posts a 5 MB body the way many clients do: all of it, then reads the answer; a write
/// error ends the attempt. A small send buffer keeps most of the body in the client while
/// the server answers, so a server that closed with unread data would break the pipe.
async fn post_all_then_read(address: std::net::SocketAddr, body: Bytes) -> Result<Value, String> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(64 * 1024).unwrap();
    let mut stream = socket.connect(address).await.map_err(|e| e.to_string())?;
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: heddle\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| format!("sending the head: {e}"))?;
    stream
        .write_all(&body)
        .await
        .map_err(|e| format!("sending the body: {e}"))?;
    let answer = read_response(&mut stream)
        .await
        .map_err(|e| format!("reading the answer: {e}"))?;
    match answer.status {
        413 => Ok(answer.json()),
        other => Err(format!(
            "{other}: {}",
            String::from_utf8_lossy(&answer.body)
        )),
    }
}

async fn post_with_reqwest(
    http: reqwest::Client,
    url: String,
    body: Bytes,
) -> Result<Value, String> {
    let response = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|error| format!("{error:?}"))?;
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .map_err(|error| format!("{error:?}"))?;
    match status {
        413 => serde_json::from_str(&text).map_err(|_| text),
        other => Err(format!("{other}: {text}")),
    }
}

#[tokio::test]
async fn forty_concurrent_oversized_posts_all_read_their_413() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let body = Bytes::from(vec![b'x'; 5 * 1024 * 1024]);
    let address = server.server.local_addr();
    let raw =
        futures_util::future::join_all((0..40).map(|_| post_all_then_read(address, body.clone())));
    let with_reqwest = futures_util::future::join_all((0..40).map(|_| {
        post_with_reqwest(
            server.http.clone(),
            server.url("/v1/completions"),
            body.clone(),
        )
    }));
    for (client, posts) in [("raw", raw.boxed()), ("reqwest", with_reqwest.boxed())] {
        let answers = tokio::time::timeout(Duration::from_secs(30), posts)
            .await
            .expect("every post is answered");
        let failures: Vec<String> = answers
            .into_iter()
            .filter_map(|answer| match answer {
                Ok(body) if body["error"]["code"] == "request_too_large" => None,
                Ok(body) => Some(body.to_string()),
                Err(error) => Some(error),
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{} of 40 {client} posts did not read their 413: {failures:?}",
            failures.len()
        );
    }
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_is_413() {
    let mut config = test_config(vec![model(MODEL)]);
    config.max_body_bytes = 64 * 1024;
    let server = start(config).await;
    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b' '; 16 * 1024])));
    let response = server
        .http
        .post(server.url("/v1/completions"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    server.server.shutdown().await.unwrap();
}

fn streaming_completion(max_tokens: usize, priority: &str) -> Value {
    json!({"model": MODEL, "prompt": "Write about looms:", "max_tokens": max_tokens,
           "ignore_eos": true, "stream": true, "priority": priority})
}

async fn open_stream(server: &TestServer, body: &Value) -> reqwest::Response {
    // A client per stream: its connection closes when the response is dropped.
    let response = reqwest::Client::new()
        .post(server.url("/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response
}

async fn health_within(server: &TestServer, limit: Duration) -> bool {
    let client = reqwest::Client::builder().timeout(limit).build().unwrap();
    client
        .get(server.url("/health"))
        .send()
        .await
        .is_ok_and(|response| response.status() == 200)
}

#[tokio::test]
async fn at_the_connection_cap_waiting_clients_make_room_and_busy_ones_do_not() {
    let mut config = test_config(vec![model(MODEL)]);
    config.http.max_connections = 2;
    config.scheduler.max_running = 2;
    let server = start(config).await;

    // Two connections that send nothing hold both slots.
    let mut oldest = connect(&server).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut newer = connect(&server).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        health_within(&server, Duration::from_secs(2)).await,
        "a new client waits behind idle ones"
    );
    assert!(
        closed_within(&mut oldest, Duration::from_secs(1)).await,
        "the longest-waiting connection made room"
    );
    assert!(
        !closed_within(&mut newer, Duration::from_millis(300)).await,
        "only one connection was closed for one newcomer"
    );

    // Two streams the server is working on hold both slots: a newcomer waits.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut reader =
            SseReader::new(open_stream(&server, &streaming_completion(1500, "normal")).await);
        reader.next_data().await.expect("the stream runs");
        streams.push(reader);
    }
    assert!(
        !health_within(&server, Duration::from_secs(1)).await,
        "a connection the server is responding on was closed for room"
    );
    streams.pop();
    assert!(
        health_within(&server, Duration::from_secs(5)).await,
        "a freed slot goes to the waiting client"
    );
    drop(streams);
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_client_waiting_for_a_slot_gets_the_one_of_a_finished_response() {
    let mut config = test_config(vec![model(MODEL)]);
    config.http.max_connections = 2;
    config.http.idle_timeout = Duration::from_secs(30);
    config.scheduler.max_running = 2;
    let server = start(config).await;

    let mut stream =
        SseReader::new(open_stream(&server, &streaming_completion(1500, "normal")).await);
    stream.next_data().await.expect("the stream runs");
    // A keep-alive client whose connection stays open, idle, after its answer. The answer
    // is short: what is measured is the hand-over of its connection's slot after it, not
    // the generation (which a loaded 2-core machine can stretch past any fixed limit).
    let keeper = reqwest::Client::new();
    let finite = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 48,
                        "ignore_eos": true});
    let answered = tokio::spawn(
        keeper
            .post(server.url("/v1/completions"))
            .json(&finite)
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waited = Instant::now();
    assert!(
        health_within(&server, Duration::from_secs(20)).await,
        "the waiting client is answered"
    );
    let response = answered.await.unwrap().unwrap();
    assert_eq!(response.status(), 200);
    // Well before the idle timeout would free the keep-alive connection's slot.
    assert!(
        waited.elapsed() < Duration::from_secs(15),
        "waited {:?}",
        waited.elapsed()
    );
    drop((stream, keeper));
    server.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_does_not_wait_for_clients_between_requests() {
    let server = start(test_config(vec![model(MODEL)])).await;
    let mut half = connect(&server).await;
    half.write_all(b"GET /health HTTP/1.1\r\nHost: heddle\r\nUser-Ag")
        .await
        .unwrap();
    let mut kept_alive = connect(&server).await;
    kept_alive.write_all(HEALTH).await.unwrap();
    assert_eq!(read_response(&mut kept_alive).await.unwrap().status, 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), server.server.shutdown())
        .await
        .expect("shutdown completes")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?} for idle clients",
        started.elapsed()
    );
    assert!(closed_within(&mut half, Duration::from_secs(1)).await);
    assert!(closed_within(&mut kept_alive, Duration::from_secs(1)).await);
}

#[tokio::test]
async fn a_stream_waiting_in_the_queue_sends_keep_alive_comments() {
    let mut config = test_config(vec![model(MODEL)]);
    config.scheduler.max_running = 1;
    let server = start(config).await;
    // One request runs and four wait ahead of the stream, 2,000 tokens each (10,000 in a
    // row with one seat): the stream waits well past the keep-alive interval (15 s), also
    // on CPUs several times faster than CI's.
    let mut running =
        SseReader::new(open_stream(&server, &streaming_completion(2000, "high")).await);
    running.next_data().await.expect("the first request runs");
    let mut ahead = Vec::new();
    for _ in 0..4 {
        ahead.push(open_stream(&server, &streaming_completion(2000, "high")).await);
    }
    let mut waiting = open_stream(&server, &streaming_completion(4, "low")).await;

    let started = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(25), waiting.chunk())
        .await
        .expect("something arrives within 25 s")
        .unwrap()
        .expect("the stream is open");
    let first = String::from_utf8_lossy(&first);
    assert_eq!(first, ": keep-alive\n\n", "after {:?}", started.elapsed());
    assert!(started.elapsed() >= Duration::from_secs(10));
    drop((running, ahead, waiting));
    server.server.shutdown().await.unwrap();
}
